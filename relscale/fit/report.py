"""run_fit: load inputs, run the requested fits, write tidy tables (CSV, Markdown) and figures.

This is the function behind `relscale fit` and the end of `relscale demo`. It returns a FitReport
holding every result object; its `summary` is the printed table (group, beta, delta_beta with its
interval, verdict) with the FLOP convention spelled out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from relscale.atomic import atomic_write_text
from relscale.errors import DataError

from .diagnostics import FitWarning
from .io import FitData, flop_note, from_table, load
from .isoflop import IsoFlopResult, fit_isoflop
from .laws import (
    ErrorMatrix,
    GroupLaws,
    RelativeLaws,
    constant_rows,
    error_matrix,
    fit_group_laws,
    fit_relative_laws,
)
from .parametric import DERIVED_NAMES, ParametricFit, fit_parametric

WHAT = ("isoflop", "parametric", "groups", "relative")


@dataclass(frozen=True, eq=False)
class FitReport:
    """Everything ``run_fit`` produced: the data, each fit that ran (or why it was skipped in
    ``skipped``), the files written, the printed summary and the warnings, once each."""
    data: FitData
    isoflop: IsoFlopResult | None = None
    parametric: ParametricFit | None = None
    groups: GroupLaws | None = None
    relative: RelativeLaws | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # fit -> why it was not run
    files: tuple[Path, ...] = ()
    summary: str = ""
    warnings: tuple[str, ...] = ()  # every FitWarning raised by the fits, once each, in words
    out_dir: Path | None = None


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""

    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else format(float(v), floatfmt)
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def _write_table(frame: pd.DataFrame, out_dir: Path, stem: str, footnote: str) -> list[Path]:
    csv = _write_text(out_dir / f"{stem}.csv", frame.to_csv(index=False))
    md = _write_text(out_dir / f"{stem}.md", markdown_table(frame) + f"\n\n{footnote}\n")
    return [csv, md]


def _fmt_ci(lo: float, hi: float, fmt: str = ".3f") -> str:
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def _n_text(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def summary_table(rel: RelativeLaws | None, groups: GroupLaws | None = None) -> pd.DataFrame:
    """group, n (models behind each law), beta, delta_beta with interval, verdict, parity F* with its
    interval: the table `relscale fit` and `relscale demo` print."""
    if rel is not None:
        level = f"{int(rel.level * 100)}% CI"
        parity = []
        for p, (lo, hi) in zip(rel.parity_flops, rel.parity_ci):
            parity.append(f"{p:.2e} [{lo:.2e}, {hi:.2e}]" if np.isfinite(p) else "")
        return pd.DataFrame(
            {
                "group": rel.groups,
                "n": rel.n_models,
                "beta": [f"{b:.3f}" if np.isfinite(b) else "-" for b in rel.beta],
                "delta_beta": [f"{d:+.3f}" if np.isfinite(d) else "-" for d in rel.delta_beta],
                level: [
                    _fmt_ci(lo, hi, "+.3f") if np.isfinite(lo) and np.isfinite(hi) else "-"
                    for lo, hi in rel.delta_beta_ci
                ],
                "verdict": rel.verdict,
                f"parity F* [{level}]": parity,
            }
        )
    if groups is not None:
        return pd.DataFrame(
            {
                "group": groups.groups,
                "n": groups.n_models,
                "beta": [f"{b:.3f}" if np.isfinite(b) else "-" for b in groups.beta],
                f"{int(groups.level * 100)}% CI": [
                    _fmt_ci(lo, hi) if np.isfinite(lo) else "-" for lo, hi in groups.beta_ci
                ],
            }
        )
    return pd.DataFrame()


def _law_text(law, n_budgets: int, flag: str | None) -> str:
    interval = (
        _fmt_ci(*law.exponent_ci) if np.all(np.isfinite(law.exponent_ci)) else "(no interval)"
    )
    text = f"C^{law.exponent:.3f} {interval} from {_n_text(n_budgets, 'budget')}"
    return text + (f" -- NOT A RESULT: {flag}" if flag else "")


def format_summary(report: FitReport) -> str:
    """The printed report: data, IsoFLOP frontier, approach 3, the relative-law table, warnings in
    words (each once), what was skipped, where the tables went, and the FLOP convention."""
    lines = []
    data = report.data
    lines.append(
        f"relscale fit: {len(data.frame['model_id'].unique())} models, {len(data.groups)} groups; "
        f"metric {data.metric}, transform {data.transform}; F in {data.flop_convention}"
    )
    iso = report.isoflop
    if iso is not None:
        flag = iso.frontier_flag
        if iso.n_opt_law is not None:
            lines.append(
                f"IsoFLOP frontier (C in {iso.budget_convention}): N* = {iso.n_opt_law.coef:.3g} "
                + _law_text(iso.n_opt_law, iso.n_opt_law.n_points, flag)
            )
            if iso.d_opt_law is not None:
                d_law = iso.d_opt_law
                lines.append(f"  D* = {d_law.coef:.3g} " + _law_text(d_law, d_law.n_points, flag))
        else:
            n_min = _n_text(len(iso.frontier_budgets), "budget")
            lines.append(f"IsoFLOP: no frontier ({n_min} with a minimum)")
        from .isoflop import _budget_flag

        for b in iso.budgets:
            why = _budget_flag(b)
            if why:
                out = "" if b.budget in iso.frontier_budgets else "; left out of the frontier"
                lines.append(f"  budget {b.budget:.3g} ({b.n_points} models): {why}{out}")
    if report.parametric is not None:
        p = report.parametric
        ci = p.ci.get("alpha", (np.nan, np.nan)), p.ci.get("beta", (np.nan, np.nan))
        lines.append(
            f"Approach 3 ({p.n_points} models): E={p.E:.4g} A={p.A:.4g} B={p.B:.4g} alpha={p.alpha:.4f} "
            f"{_fmt_ci(*ci[0])} beta={p.beta:.4f} {_fmt_ci(*ci[1])} objective={p.objective:.4g} "
            f"converged={p.converged}"
        )
        flag = parametric_flag(p)
        if flag:
            lines.append(f"  approach 3 -- NOT A RESULT: {flag}")
    table = summary_table(report.relative, report.groups)
    if not table.empty:
        if report.relative is not None:
            r = report.relative
            lines.append(
                f"Relative laws G(F) = E_group / E_{r.baseline} against baseline '{r.baseline}' "
                f"({r.selection} models, n = models behind each law, {r.n_boot} paired-bootstrap draws, "
                f"seed {r.seed}; F from {r.flop_range[0]:.3g} to {r.flop_range[1]:.3g}):"
            )
        lines.append(table.to_string(index=False))
    if report.warnings:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in report.warnings]
    for what, why in report.skipped.items():
        lines.append(f"skipped {what}: {why}")
    if report.out_dir is None:
        lines.append(
            "(no --out given: nothing was written; add --out DIR for the CSV/Markdown tables and figures)"
        )
    else:
        lines.append(f"tables and figures: {report.out_dir}/")
    lines.append(flop_note(data.flop_convention))
    if iso is not None and iso.budget_convention != data.flop_convention:
        lines.append(f"IsoFLOP budgets C are {iso.budget_convention}.")
    return "\n".join(lines)


def _can_isoflop(data: FitData) -> str | None:
    frame = data.per_model()
    if constant_rows(frame["loss"].to_numpy(float)[None])[0]:
        return "the loss does not vary across models"
    budget = frame["budget"].to_numpy(float)
    if not np.isfinite(budget).all():
        return None  # budgets will be snapped from flops; fit_isoflop decides
    sizes = frame.groupby("budget")["params"].nunique()
    return None if (sizes >= 3).any() else "no budget has 3 or more model sizes"


def run_fit(
    source: FitData | pd.DataFrame | str | Path | Sequence[str | Path],
    *,
    what: str | Iterable[str] = "all",
    kind: str = "auto",
    metric: str = "bpb",
    transform: str | None = None,
    flops: str | None = None,
    columns: Mapping[str, str] | None = None,
    wide: str | Sequence[str] | None = None,
    where: str | None = None,
    budget_convention: str | None = None,
    declared_budgets: Sequence[float] | None = None,
    baseline: str = "pooled",
    grouping: str | None = None,
    targets: Sequence[str] | None = None,
    select: str = "all",
    optimal_by: str | None = None,
    irreducible: bool = False,
    isoflop_var: str = "params",
    isoflop_group: str | None = None,
    robust: str | None = None,
    frontier: str = "all",
    n_boot: int = 1000,
    parametric_boot: int = 100,
    parametric_starts: int | None = 64,
    seed: int = 0,
    level: float = 0.95,
    project_at: Sequence[float] = (),
    out_dir: str | Path | None = None,
    plots: bool = True,
    overwrite: bool = False,
    echo: Callable[[str], None] | None = print,
) -> FitReport:
    """Run the fits named in `what` ('all' or any of isoflop, parametric, groups, relative).

    Inputs: see io.load (flops, columns, wide, where, budget_convention). Every FitWarning the fits
    raise is collected, de-duplicated and listed in words in the summary and in FitReport.warnings,
    then re-emitted once each. Raises DataError (the CLI exits 2) on unusable input.
    """
    wanted = set(WHAT) if what == "all" else ({what} if isinstance(what, str) else set(what))
    unknown = wanted - set(WHAT)
    if unknown:
        raise DataError(f"unknown fit(s) {sorted(unknown)}; choose from {WHAT} or 'all'")
    explicit = what != "all"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitWarning)
        report, em = _run_fits(
            source, wanted=wanted, explicit=explicit, kind=kind, metric=metric, transform=transform,
            flops=flops, columns=columns, wide=wide, where=where, budget_convention=budget_convention,
            declared_budgets=declared_budgets, baseline=baseline, grouping=grouping, targets=targets,
            select=select, optimal_by=optimal_by, irreducible=irreducible, isoflop_var=isoflop_var,
            isoflop_group=isoflop_group, robust=robust, frontier=frontier, n_boot=n_boot,
            parametric_boot=parametric_boot,
            parametric_starts=parametric_starts, seed=seed, level=level, project_at=project_at,
            out_dir=out_dir, overwrite=overwrite,
        )
    messages: dict[str, type[Warning]] = {}
    for w in caught:
        if issubclass(w.category, FitWarning):
            messages.setdefault(str(w.message), w.category)
        else:  # not ours: pass it on untouched
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    report = replace(report, warnings=tuple(messages))
    out = report.out_dir
    files: list[Path] = []
    if out is not None:
        files = _write_outputs(report, em, out, plots)
    summary = format_summary(report)
    if out is not None:
        files.append(_write_text(out / "summary.txt", summary + "\n"))
    report = replace(report, files=tuple(files), summary=summary)
    for message, category in messages.items():
        warnings.warn(message, category, stacklevel=2)
    if echo is not None:
        echo(summary)
    return report


def _run_fits(
    source, *, wanted, explicit, kind, metric, transform, flops, columns, wide, where, budget_convention,
    declared_budgets, baseline, grouping, targets, select, optimal_by, irreducible, isoflop_var,
    isoflop_group, robust, frontier, n_boot, parametric_boot, parametric_starts, seed, level, project_at,
    out_dir, overwrite,
) -> tuple[FitReport, ErrorMatrix]:
    if isinstance(source, FitData):
        data = source
    elif isinstance(source, pd.DataFrame):
        data = from_table(
            source, columns=columns, transform=transform or "identity", wide=wide, where=where,
            budget_convention=budget_convention,
        )
    else:
        data = load(
            source, kind=kind, metric=metric, transform=transform, flops=flops, columns=columns,
            grouping=grouping, wide=wide, where=where, budget_convention=budget_convention,
        )

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in out.iterdir() if p.stem in _OUTPUT_STEMS)
        if existing and not overwrite:
            raise DataError(
                f"output folder {str(out)!r} already holds fit results {existing[:6]}; "
                "choose another folder (finished results are never overwritten)"
            )

    skipped: dict[str, str] = {}
    results: dict[str, object] = {}

    def attempt(name: str, reason: str | None, fn: Callable[[], object]) -> None:
        if name not in wanted:
            return
        if reason is not None:
            if explicit:
                raise DataError(f"cannot run the {name} fit: {reason}")
            skipped[name] = reason
            return
        results[name] = fn()

    attempt(
        "isoflop",
        _can_isoflop(data),
        lambda: fit_isoflop(
            data,
            fit_var=isoflop_var,
            group=isoflop_group,
            robust=robust,
            n_boot=n_boot,
            seed=seed,
            level=level,
            declared_budgets=None if declared_budgets is None else np.asarray(declared_budgets, float),
            frontier=frontier,
        ),
    )
    per_model = data.per_model(isoflop_group)
    few_points = (
        "needs at least 5 models with distinct params and tokens"
        if (per_model[["params", "tokens"]].drop_duplicates().shape[0] < 5)
        else "the loss does not vary across models"
        if constant_rows(per_model["loss"].to_numpy(float)[None])[0]
        else None
    )
    attempt(
        "parametric",
        few_points,
        lambda: fit_parametric(
            per_model["params"],
            per_model["tokens"],
            per_model["loss"],
            n_boot=parametric_boot,
            seed=seed,
            level=level,
            n_starts=parametric_starts,
        ),
    )
    em: ErrorMatrix = error_matrix(data)
    attempt(
        "groups",
        None if em.flops.size >= 3 else "fewer than 3 models",
        lambda: fit_group_laws(
            em,
            select=select,
            optimal_by=optimal_by or "pooled",
            irreducible=irreducible,
            n_boot=n_boot,
            seed=seed,
            level=level,
        ),
    )
    attempt(
        "relative",
        "fewer than 2 groups" if len(em.groups) < 2 else None,
        lambda: fit_relative_laws(
            em,
            baseline=baseline,
            targets=targets,
            select=select,
            optimal_by=optimal_by,
            n_boot=n_boot,
            seed=seed,
            level=level,
            project_at=project_at,
        ),
    )

    report = FitReport(
        data=data,
        isoflop=results.get("isoflop"),
        parametric=results.get("parametric"),
        groups=results.get("groups"),
        relative=results.get("relative"),
        skipped=skipped,
        out_dir=out,
    )
    return report, em


_OUTPUT_STEMS = {
    "isoflop_budgets",
    "isoflop_laws",
    "parametric",
    "group_laws",
    "relative_laws",
    "isoflop",
    "group_laws_plot",
    "relative_trajectories",
    "relative_forest",
    "summary",
}


def parametric_flag(p: ParametricFit) -> str:
    """Why an approach-3 fit is not a result ('' when it is): too few models for 5 parameters,
    parameters ended on their search box (set by the box, not the data), a zero-width bootstrap
    interval for an exponent (every draw found the same value: not identified, e.g. N and D
    collinear across the models), or no convergence."""
    why = []
    if p.n_points <= 5:
        why.append(f"{p.n_points} models for 5 parameters")
    if p.at_bound:
        why.append(f"parameters {', '.join(p.at_bound)} ended on their bounds")
    for name in ("alpha", "beta"):
        lo, hi = p.ci.get(name, (np.nan, np.nan))
        if np.isfinite(lo) and np.isfinite(hi) and hi - lo <= 1e-9 * max(1.0, abs(hi)):
            why.append(f"{name}'s interval has zero width (not identified by these models)")
    if not p.converged:
        why.append("the fit did not converge")
    return "; ".join(why)


def _parametric_frame(p: ParametricFit) -> pd.DataFrame:
    values = p.summary()
    rows = [
        {
            "parameter": k,
            "value": values[k],
            "lo": p.ci.get(k, (np.nan,) * 2)[0],
            "hi": p.ci.get(k, (np.nan,) * 2)[1],
        }
        for k in DERIVED_NAMES
    ]
    frame = pd.DataFrame(rows)
    frame["objective"] = p.objective
    frame["converged"] = p.converged
    frame["n_points"] = p.n_points
    frame["n_boot"] = p.n_boot
    frame["flops_per_param_token"] = p.flops_per_param_token
    frame["flag"] = parametric_flag(p)
    return frame


def _write_outputs(report: FitReport, em: ErrorMatrix, out: Path, plots: bool) -> list[Path]:
    conv = report.data.flop_convention
    note = flop_note(conv)
    files: list[Path] = []
    if report.isoflop is not None:
        conv_c = report.isoflop.budget_convention
        iso_note = f"Budgets C: {conv_c}. " + flop_note(conv_c)
        files += _write_table(report.isoflop.table(), out, "isoflop_budgets", iso_note)
        files += _write_table(report.isoflop.laws_table(), out, "isoflop_laws", iso_note)
    if report.parametric is not None:
        files += _write_table(
            _parametric_frame(report.parametric),
            out,
            "parametric",
            "L(N, D) = E + A/N^alpha + B/D^beta; N_opt(C) = G (C/k)^a_opt with C = k N D "
            f"(k = {report.parametric.flops_per_param_token:g}: the 6ND training-FLOP "
            "convention, whatever convention the inputs' FLOP column uses).",
        )
    if report.groups is not None:
        files += _write_table(report.groups.table(), out, "group_laws", note)
    if report.relative is not None:
        files += _write_table(report.relative.table(), out, "relative_laws", note)
    if plots:
        from . import plots as P

        figures = []
        if report.isoflop is not None:
            points = report.data.per_model(report.isoflop.group)
            if not np.isfinite(points["budget"]).all():
                from .isoflop import snap_budgets

                points = points.assign(budget=snap_budgets(points["flops"].to_numpy(float), report=False))
            figures.append((P.plot_isoflop(report.isoflop, points), "isoflop"))
        if report.groups is not None:
            figures.append((P.plot_group_laws(report.groups, em), "group_laws_plot"))
        if report.relative is not None:
            figures.append((P.plot_relative_trajectories(report.relative, em), "relative_trajectories"))
            figures.append((P.plot_relative_forest(report.relative), "relative_forest"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tight_layout.*|.*constrained_layout.*")
            for fig, stem in figures:
                files += P.save_figure(fig, out / stem)
    return files
