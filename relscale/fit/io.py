"""Inputs of the fits: per-example eval dumps, the sweep results index, or any CSV / DataFrame.

Every loader returns a FitData: one row per (model, group) with the model's size, data and compute
and an *error* (lower is better, > 0) made from a metric by an explicit transform, plus the FLOP
convention the `flops` column is in. The metric aggregation over a group's examples is a ratio of
sums where that is what the metric means (NLL per token, bits per byte), a plain mean otherwise.
"""

from __future__ import annotations

import ast
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from relscale.errors import DataError
from relscale.eval import dump as eval_dump  # the eval-dump contract (torch-free)
from relscale.sweep import layout as sweep_layout  # torch-free (tests/sweep/test_layout.py)

from .diagnostics import DroppedDataWarning, warn

# metric -> (per-example columns it needs, default transform to an error)
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "nll": (("nll", "n_tokens"), "identity"),  # mean NLL per token, nats: sum nll / sum n_tokens
    "bpb": (("nll", "n_bytes"), "identity"),  # bits per byte: sum nll / (ln 2 * sum n_bytes)
    "acc": (("acc",), "one_minus"),
    "prob_correct": (("prob_correct",), "neg_log"),
    "logprob_correct": (("logprob_correct",), "neg"),
}

TRANSFORMS = {
    "identity": lambda v: v,
    "neg": lambda v: -v,
    "neg_log": lambda v: -np.log(v),  # probability -> cross-entropy-like error
    "one_minus": lambda v: 1.0 - v,  # accuracy -> error rate
}

MODEL_COLUMNS = ("params", "tokens", "flops_train", "flops_marin")
FLOP_COLUMNS = ("flops_marin", "flops_train")
OK_STATUSES = ("done", "completed", "complete", "finished", "ok", "success", "succeeded")
FLOP_NOTE = (
    "FLOP conventions: flops_marin (forward-only, Marin accounting; the sweep budgets) is about 3x smaller "
    "than flops_train (6ND-style training FLOPs). Changing F by one constant factor rescales the intercepts "
    "(gamma, coefficients) and leaves the exponents (beta, delta_beta) unchanged; conventions whose ratio "
    "varies between models (e.g. 6ND against FLOPs that count attention) change the exponents too."
)


def flop_note(convention: str) -> str:
    """The footnote under every table: which convention F is in, and what a change of it does."""
    return (
        f"FLOP convention: F (compute) is in {convention}. Another convention that differs from it by one "
        "constant factor rescales the intercepts (gamma, coefficients) and leaves the exponents (beta, "
        "delta_beta) unchanged; one whose ratio to it varies between models (e.g. 6ND against FLOPs "
        "that count attention) changes the exponents too, so refit in that convention."
    )


@dataclass(frozen=True, eq=False)
class FitData:
    """Long table, one row per (model, group): model_id, params, tokens, flops, budget, group, value, error.

    value is the aggregated metric, error = transform(value) > 0. flops is in flop_convention;
    budget (nominal IsoFLOP budget, may be NaN) is in budget_convention.
    """

    frame: pd.DataFrame
    flop_convention: str
    metric: str
    transform: str
    source: str
    budget_convention: str = "flops_marin"

    @property
    def groups(self) -> list[str]:
        return sorted(self.frame["group"].unique())

    def per_model(self, group: str | None = None) -> pd.DataFrame:
        """One row per model with column loss: the error of one group, or the mean over groups (None)."""
        frame = self.frame
        if group is not None:
            if group not in set(frame["group"]):
                raise DataError(f"group {group!r} not in {self.source}; groups: {self.groups[:20]}")
            frame = frame[frame["group"] == group]
        keys = ["model_id", "params", "tokens", "flops", "budget"]
        out = frame.groupby("model_id", sort=True, dropna=False).agg(
            {k: "first" for k in keys[1:]} | {"error": "mean"}
        )
        return out.rename(columns={"error": "loss"}).reset_index()


def _user_columns(frame: pd.DataFrame) -> list[str]:
    """The file's own column names, for error messages (not the internal row-label column)."""
    return sorted(c for c in map(str, frame.columns) if c != "_where")


def apply_transform(values: np.ndarray, transform: str) -> np.ndarray:
    """``values`` mapped by one of :data:`TRANSFORMS` (identity, log, ...) in float64; DataError for
    an unknown name. Invalid results (log of 0) become inf/NaN and are dropped later with a warning."""
    if transform not in TRANSFORMS:
        raise DataError(f"unknown transform {transform!r}; choose one of {sorted(TRANSFORMS)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return TRANSFORMS[transform](np.asarray(values, dtype=float))


def _check_columns(frame: pd.DataFrame, needed: Iterable[str], where: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; columns present: {_user_columns(frame)}"
        )


def _check_finite(
    frame: pd.DataFrame, columns: Iterable[str], where: str, rows: pd.Series | None = None
) -> None:
    """Raise naming the rows (file row numbers when given) where a required column is NaN/inf."""
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            where_bad = (rows[bad] if rows is not None else frame.index[bad]).tolist()
            raise DataError(f"{where}: column {col!r} is NaN, inf or not a number in {_rows_text(where_bad)}")


def _group_labels(frame: pd.DataFrame) -> pd.Series:
    """group, or dataset where group is empty; 'dataset/group' for every group when there are several
    datasets."""
    if "group" in frame.columns:
        group = frame["group"].astype("string")
    else:
        group = pd.Series(pd.NA, index=frame.index, dtype="string")
    dataset = (
        frame["dataset"].astype("string")
        if "dataset" in frame.columns
        else pd.Series("all", index=frame.index, dtype="string")
    )
    label = group.fillna(dataset).fillna("all")
    if "dataset" in frame.columns and dataset.nunique() > 1:
        # Several eval sets: every group is labelled with its set, so no group (and no pooled
        # baseline, see ErrorMatrix.pooled_rows) mixes datasets.
        label = (dataset.fillna("?") + "/" + label).where(group.notna(), label)
    return label.astype(str)


def _expand_paths(paths: str | Path | Iterable[str | Path], pattern: str) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob(pattern)))
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"input {str(p)!r} does not exist")
    if not files:
        raise DataError(f"no {pattern} files found in {[str(p) for p in map(Path, paths)]}")
    return files


def read_dumps(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate per-example eval dumps (Parquet files or folders of them), recording file and row."""
    frames = []
    for path in _expand_paths(paths, f"*{eval_dump.SUFFIX}"):
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read eval dump {str(path)!r}: {exc}") from exc
        frame["_file"] = str(path)
        frame["_row"] = np.arange(len(frame))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def aggregate_dumps(
    examples: pd.DataFrame,
    *,
    metric: str = "bpb",
    transform: str | None = None,
    flops: str = "flops_marin",
    source: str = "eval dumps",
    grouping: str | None = None,
) -> FitData:
    """Aggregate per-example rows to one error per (model, group); see METRICS for the aggregation.

    Dumps of `relscale eval` hold one row per example and grouping field (column `grouping`, e.g.
    century or sotu_type). `grouping` keeps one field's groups; without it, several fields in the
    dumps are kept apart by labelling groups 'grouping=group' (a pooled baseline then counts each
    example once per field).
    """
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    needed, default_transform = METRICS[metric]
    transform = transform or default_transform
    if flops not in FLOP_COLUMNS:
        raise DataError(f"eval dumps carry FLOPs as {FLOP_COLUMNS}, not {flops!r}")
    _check_columns(examples, ("model_id", *MODEL_COLUMNS, *needed), source)
    examples = _select_grouping(examples, grouping, source)
    rows = None
    if "_file" in examples.columns:
        rows = examples["_file"].map(lambda f: Path(f).name) + ":" + examples["_row"].astype(str)
    _check_finite(examples, (*MODEL_COLUMNS, *needed), source, rows)

    frame = examples.assign(group=_group_labels(examples), model_id=examples["model_id"].astype(str))
    if "budget" not in frame.columns:
        frame["budget"] = np.nan
    distinct = frame.groupby("model_id", sort=True)[list(MODEL_COLUMNS)].nunique(dropna=False)
    varying = [c for c in MODEL_COLUMNS if (distinct[c] > 1).any()]
    if varying:
        raise DataError(f"{source}: columns {varying} differ between rows of the same model_id")

    grouped = frame.groupby(["model_id", "group"], sort=True)
    if metric == "nll":
        value = grouped["nll"].sum() / grouped["n_tokens"].sum()
    elif metric == "bpb":
        value = grouped["nll"].sum() / (math.log(2) * grouped["n_bytes"].sum())
    else:
        value = grouped[needed[0]].mean()
    out = grouped[[*MODEL_COLUMNS, "budget"]].first()
    if "dataset" in frame.columns:
        out["dataset"] = grouped["dataset"].first().astype(str)
    out["n_examples"] = grouped.size()
    out["value"] = value
    out = out.reset_index()
    out["flops"] = out[flops].astype(float)
    out["error"] = apply_transform(out["value"].to_numpy(), transform)
    _check_errors(out, source, f"{metric} -> {transform}")
    return FitData(out, flop_convention=flops, metric=metric, transform=transform, source=source)


def _select_grouping(examples: pd.DataFrame, grouping: str | None, source: str) -> pd.DataFrame:
    if "grouping" not in examples.columns:
        if grouping is not None:
            raise DataError(f"{source}: grouping {grouping!r} asked for; the dumps have no grouping column")
        return examples
    present = sorted(examples["grouping"].dropna().astype(str).unique())
    if grouping is not None:
        if grouping not in present:
            raise DataError(f"{source}: no rows with grouping {grouping!r} (present: {present})")
        return examples[examples["grouping"].astype(str) == grouping]
    if len(present) > 1:
        labelled = examples["grouping"].astype("string") + "=" + examples["group"].astype("string")
        return examples.assign(group=labelled.fillna(examples["group"].astype("string")))
    return examples


def _check_errors(frame: pd.DataFrame, source: str, what: str) -> None:
    bad = ~(np.isfinite(frame["error"]) & (frame["error"] > 0))
    if bad.any():
        shown = ["row"] * ("row" in frame.columns) + ["model_id", "group", "value"]
        examples = frame.loc[bad, shown].head(5).to_dict("records")
        raise DataError(
            f"{source}: error ({what}) must be finite and > 0 for log-log fits; "
            f"{int(bad.sum())} (model, group) cells are not, e.g. {examples}"
        )


def read_results_index(
    path: str | Path,
    *,
    loss: str = "final_val_loss",
    flops: str = "flops_marin",
    statuses: Iterable[str] = OK_STATUSES,
    where: str | None = None,
) -> FitData:
    """The sweep's results.parquet (one row per run); only runs whose status is finished are used.

    where: an optional row filter (row_filter), applied before the status filter."""
    path = Path(path)
    sweep_dir = path if path.is_dir() else path.parent
    if path.is_dir():
        path = sweep_layout.results_path(path)
    in_sweep = (sweep_dir / sweep_layout.MARKS_DIR).is_dir()
    if not path.exists() and not in_sweep:
        raise DataError(f"sweep results index {str(path)!r} does not exist")
    if path.name == sweep_layout.RESULTS_INDEX and in_sweep:
        frame = sweep_layout.read_results(sweep_dir).to_pandas()  # rebuilt from the marks if damaged
    else:
        frame = pd.read_parquet(path)  # a results table outside a sweep folder: read as it is
    if where:
        frame = frame[row_filter(frame, where, str(path))]
    if frame.empty:
        raise DataError(f"{path}: no runs" + (f" satisfy --where {where!r}" if where else ""))
    _check_columns(frame, ("run_id", "params", "tokens", flops, loss), str(path))
    if "status" in frame.columns:
        ok = frame["status"].astype(str).str.lower().isin({s.lower() for s in statuses})
        if not ok.any():
            raise DataError(
                f"{path}: no run has a finished status {tuple(statuses)}; "
                f"statuses found: {sorted(frame['status'].astype(str).unique())}"
            )
        frame = frame[ok]
    _check_finite(frame, ("params", "tokens", flops, loss), str(path))
    out = pd.DataFrame(
        {
            "model_id": frame["run_id"].astype(str),
            "params": frame["params"].astype(float),
            "tokens": frame["tokens"].astype(float),
            "flops": frame[flops].astype(float),
            "budget": frame["budget"].astype(float) if "budget" in frame.columns else np.nan,
            "group": frame["dataset"].astype(str) if "dataset" in frame.columns else "all",
            "value": frame[loss].astype(float),
        }
    ).reset_index(drop=True)
    out["error"] = out["value"]
    _check_errors(out, str(path), loss)
    return FitData(out, flop_convention=flops, metric=loss, transform="identity", source=str(path))


def from_table(
    table: pd.DataFrame | str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    flop_convention: str | None = None,
    transform: str = "identity",
    flops_per_param_token: float = 6.0,
    dropna: bool = False,
    source: str | None = None,
    budget_convention: str | None = None,
    wide: str | Sequence[str] | None = None,
    where: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> FitData:
    """Any table with params, tokens and/or flops, loss, and optionally group, model and budget.

    columns maps the canonical names (params, tokens, flops, loss, group, model_id, budget) to the
    table's column names. Missing flops are 6ND (k = flops_per_param_token); missing tokens are
    flops / (k N). NaN rows raise naming the rows (the file's own line numbers for a CSV), or are
    dropped with a warning when dropna.

    wide: one error column per group (a list of column names and/or fnmatch globs, or one
    comma-separated string): those columns become the groups (OLMo-ladder / W&B layout).
    where: a row filter such as ``source == 'x' and params > 1e6`` (see row_filter).
    Model key: the model column; without one, (params, tokens) identify a model (or (params, flops)
    when there is no tokens column); a key that repeats within a group raises a DataError naming
    --model-col / --group-col rather than treating every row as its own model.
    """
    source = source or (str(table) if not isinstance(table, pd.DataFrame) else "DataFrame")
    if not isinstance(table, pd.DataFrame):
        path = Path(table)
        if not path.exists():
            raise DataError(f"table {source!r} does not exist")
        table = read_table_file(path)
        row_labels = [f"line {i + 2}" for i in range(len(table))] if path.suffix != ".parquet" else None
    if row_labels is None:
        row_labels = list(range(len(table)))
    table = table.assign(_where=np.asarray(row_labels, dtype=object))
    if len(table) == 0:
        raise DataError(f"{source}: the table has no data rows (header only?)")
    if where:
        table = table[row_filter(table, where, source)]
        if len(table) == 0:
            raise DataError(f"{source}: no row satisfies --where {where!r}")
    columns = dict(columns or {})
    if wide:
        table, columns = _melt_wide(table, wide, columns, source)
    names = {
        "params": "params",
        "tokens": "tokens",
        "flops": "flops",
        "loss": "loss",
        "group": "group",
        "model_id": "model_id",
        "budget": "budget",
    }
    unknown = set(columns) - set(names)
    if unknown:
        raise DataError(f"unknown column role(s) {sorted(unknown)}; roles: {sorted(names)}")
    names.update(columns)
    explicit = set(columns)
    # Roles named explicitly must exist; default names are optional where a role is optional.
    _check_columns(table, [names[r] for r in explicit], source)
    _check_columns(table, [names["loss"], names["params"]], source)
    has = {role: names[role] in table.columns for role in names}
    if not has["tokens"] and not has["flops"]:
        raise DataError(
            f"{source}: need a tokens column ({names['tokens']!r}) or a flops column "
            f"({names['flops']!r}); columns present: {_user_columns(table)}"
        )
    required = [names[r] for r in ("params", "loss", "tokens", "flops") if has[r]]
    bad = np.zeros(len(table), dtype=bool)
    for col in required:
        bad |= ~np.isfinite(pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float))
    if bad.any():
        if not dropna:
            _check_finite(table, required, source, table["_where"])
        warn(
            DroppedDataWarning,
            f"{source}: dropped {_rows_text(table['_where'][bad])} with NaN in {required}",
        )
        table = table[~bad]
    table = table.reset_index(drop=True)

    params = table[names["params"]].astype(float).to_numpy()
    k = flops_per_param_token
    if has["tokens"]:
        tokens = table[names["tokens"]].astype(float).to_numpy()
    else:
        tokens = table[names["flops"]].astype(float).to_numpy() / (k * params)
    if has["flops"]:
        flops = table[names["flops"]].astype(float).to_numpy()
        convention = flop_convention or names["flops"]
    else:
        flops = k * params * tokens
        convention = flop_convention or f"{k:g}ND (computed as {k:g} x params x tokens)"
    if has["group"]:
        group = table[names["group"]].astype(str)
    elif "dataset" in table.columns:
        group = table["dataset"].astype(str)
    else:
        group = pd.Series("all", index=table.index)
    if has["model_id"]:
        model_id = table[names["model_id"]].astype(str)
    else:
        # No model column: a model is what (params, tokens) identify, the same in every group.
        key = names["tokens"] if has["tokens"] else names["flops"]
        model_id = pd.Series([f"N={n:.6g},{key}={v:.6g}" for n, v in zip(params, table[key].astype(float))])
    out = pd.DataFrame(
        {
            "model_id": model_id.to_numpy(),
            "params": params,
            "tokens": tokens,
            "flops": flops,
            "budget": table[names["budget"]].astype(float) if has["budget"] else np.nan,
            "group": group.to_numpy(),
            "value": table[names["loss"]].astype(float),
            "row": table["_where"].to_numpy(),
        }
    )
    if "dataset" in table.columns:
        out["dataset"] = table["dataset"].astype(str).to_numpy()
    dup = out.duplicated(["model_id", "group"], keep=False)
    if dup.any():
        rows = _rows_text(out.loc[dup, "row"])
        if has["model_id"]:
            hint = (
                f"the model column {names['model_id']!r} repeats within a group; if the table holds "
                f"several groups, name the group column with --group-col (columns={{'group': ...}})"
            )
        elif not has["group"]:
            text_cols = [c for c in table.columns if c != "_where" and not is_numeric_dtype(table[c])]
            hint = (
                f"no model column ({names['model_id']!r}) and no group column ({names['group']!r}): "
                f"the same (params, {key}) appears more than once; name the group column with "
                "--group-col (columns={'group': ...})"
                + (f", e.g. one of {text_cols[:8]}," if text_cols else "")
                + " or the model column with --model-col"
            )
        else:
            hint = (
                f"no model column ({names['model_id']!r}), and (params, {key}) does not identify a "
                "model within a group; name the column that identifies each model with --model-col "
                "(columns={'model_id': ...})"
            )
        raise DataError(f"{source}: (model, group) pairs repeat in {rows}: {hint}")
    out["error"] = apply_transform(out["value"].to_numpy(), transform)
    _check_errors(out, source, f"{names['loss']} -> {transform}")
    if has["budget"] and budget_convention is None:
        # A budget column shares the FLOP column's convention only when there is a FLOP column.
        budget_convention = (
            convention if has["flops"] or flop_convention
            else f"as given in column {names['budget']!r} (convention not stated)"
        )
    return FitData(
        out,
        flop_convention=convention,
        metric=names["loss"] if not wide else "loss (wide columns)",
        transform=transform,
        source=source,
        budget_convention=budget_convention or convention,
    )


def _rows_text(labels: Iterable, limit: int = 20) -> str:
    """'rows [1, 4]' for positions, 'line 3, line 7' for a file's own line labels."""
    labels = list(labels)
    more = f" (and {len(labels) - limit} more)" if len(labels) > limit else ""
    if all(isinstance(v, (int, np.integer)) for v in labels):
        return f"rows {[int(v) for v in labels[:limit]]}{more}"
    return ", ".join(map(str, labels[:limit])) + more


def read_table_file(path: Path) -> pd.DataFrame:
    """A CSV (or Parquet) table; an empty or header-only file raises a one-line DataError."""
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"table {str(path)!r} is empty") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read table {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if len(table) == 0:
        raise DataError(f"table {str(path)!r} has no data rows (header only)")
    return table


def _melt_wide(
    table: pd.DataFrame, wide: str | Sequence[str], columns: dict[str, str], source: str
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One error column per group -> long rows (group = column name, loss = value)."""
    patterns = [p.strip() for p in (wide.split(",") if isinstance(wide, str) else wide) if p.strip()]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [c for c in map(str, table.columns) if c != "_where" and fnmatch.fnmatchcase(c, pattern)]
        if not hits:
            raise DataError(
                f"{source}: --wide {pattern!r} matches no column; columns present: "
                f"{_user_columns(table)}"
            )
        chosen += [c for c in hits if c not in chosen]
    for role in ("loss", "group"):
        if role in columns:
            raise DataError(f"{source}: --wide makes the groups and losses; do not also give --{role}-col")
    roles = {r: columns.get(r, r) for r in ("params", "tokens", "flops", "model_id", "budget")}
    clash = [c for c in chosen if c in roles.values()]
    if clash:
        raise DataError(f"{source}: --wide columns {clash} are also model columns (params/tokens/flops/...)")
    ids = [c for c in table.columns if c not in chosen]
    long = table.melt(id_vars=ids, value_vars=chosen, var_name="_group", value_name="_loss")
    return long, {**columns, "group": "_group", "loss": "_loss"}


def row_filter(table: pd.DataFrame, expression: str, source: str = "table") -> np.ndarray:
    """Boolean mask of the rows satisfying a small filter language (never eval()).

    Grammar: comparisons ``col == 'x'``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, chained ones
    (``1e6 <= params < 1e8``), ``col in ['a', 'b']`` / ``not in``, combined with ``and``, ``or``,
    ``not`` and parentheses. Operands are column names (Python identifiers) and number, string,
    True/False literals or lists of them. It is parsed with the ``ast`` module and only these node
    types are evaluated, against pandas columns. Raises DataError naming the unknown column or the
    construct that is not allowed.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise DataError(f"--where {expression!r}: not a valid filter ({exc.msg})") from None

    def operand(node: ast.AST):
        if isinstance(node, ast.Name):
            if node.id not in table.columns:
                raise DataError(
                    f"--where: no column {node.id!r} in {source}; columns present: "
                    f"{_user_columns(table)}"
                )
            return table[node.id]
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(
            node.operand, ast.Constant
        ) and isinstance(node.operand.value, (int, float)):
            return -node.operand.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return [operand(e) for e in node.elts]
        raise DataError(f"--where: {ast.unparse(node)!r} is not allowed (columns, literals, lists only)")

    def truth(node: ast.AST) -> pd.Series:
        if isinstance(node, ast.BoolOp):
            parts = [truth(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~truth(node.operand)
        if isinstance(node, ast.Compare):
            result = pd.Series(True, index=table.index)
            left = operand(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = operand(right_node)
                result &= _compare(op, left, right, expression)
                left = right
            return result
        raise DataError(
            f"--where {expression!r}: {ast.unparse(node)!r} is not a comparison (use ==, !=, <, in, and, or)"
        )

    mask = truth(tree.body)
    return np.asarray(pd.Series(mask, index=table.index).fillna(False), dtype=bool)


def _compare(op: ast.cmpop, left, right, expression: str) -> pd.Series:
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(right, list) or not isinstance(left, pd.Series):
            raise DataError(f"--where {expression!r}: use `column in [values]`")
        hit = left.isin(right)
        return ~hit if isinstance(op, ast.NotIn) else hit
    ops = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__",
           ast.Gt: "__gt__", ast.GtE: "__ge__"}
    if type(op) not in ops or isinstance(left, list) or isinstance(right, list):
        raise DataError(f"--where {expression!r}: operator {type(op).__name__} is not allowed here")
    if not isinstance(left, pd.Series):  # literal on the left: flip the comparison
        flipped = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}
        op = flipped.get(type(op), type(op))()
        left, right = right, left
    try:
        result = getattr(left, ops[type(op)])(right)
    except TypeError as exc:
        raise DataError(f"--where {expression!r}: cannot compare ({exc})") from None
    if result is NotImplemented:
        raise DataError(f"--where {expression!r}: cannot compare these operands")
    return result


def read_tables(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """Several CSV/Parquet tables (files or folders of *.csv) -> one table and each row's label."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.csv")) + sorted(p.glob("*.parquet"))
            if not found:
                raise DataError(f"folder {str(p)!r} holds no *.csv or *.parquet table")
            files += found
        else:
            files.append(p)
    frames, labels = [], []
    for f in files:
        table = read_table_file(f)
        frames.append(table.assign(file=f.stem) if len(files) > 1 and "file" not in table.columns else table)
        line = (lambda i: f"line {i + 2}") if f.suffix != ".parquet" else (lambda i: f"row {i}")  # noqa: E731
        prefix = f"{f.name} " if len(files) > 1 else ""
        labels += [prefix + line(i) for i in range(len(table))]
    return pd.concat(frames, ignore_index=True), labels


def load(
    inputs: str | Path | Iterable[str | Path],
    *,
    kind: str = "auto",
    metric: str = "bpb",
    transform: str | None = None,
    flops: str | None = None,
    columns: Mapping[str, str] | None = None,
    flop_convention: str | None = None,
    dropna: bool = False,
    grouping: str | None = None,
    wide: str | Sequence[str] | None = None,
    where: str | None = None,
    budget_convention: str | None = None,
) -> FitData:
    """Load dumps, a results index, or tables; kind='auto' decides from the files' columns.

    flops: the FLOP column / convention (dumps and index: flops_marin by default). For a table it
    names a column that must exist (a DataError otherwise, never silently ignored). Several CSV
    files, or a folder of them, are concatenated (column `file` says which file a row came from).
    wide / where: see from_table (tables) and row_filter (every kind).
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if kind == "auto":
        kind = _detect_kind(paths)
    if kind == "dumps":
        examples = read_dumps(paths)
        if where:
            examples = examples[row_filter(examples, where, "eval dumps")]
            if examples.empty:
                raise DataError(f"eval dumps: no row satisfies --where {where!r}")
        return aggregate_dumps(
            examples,
            metric=metric,
            transform=transform,
            flops=flops or "flops_marin",
            source=", ".join(map(str, paths)),
            grouping=grouping,
        )
    if kind == "index":
        if len(paths) != 1:
            raise DataError(f"a sweep results index is one file or sweep folder, got {len(paths)}")
        return read_results_index(paths[0], flops=flops or "flops_marin", where=where)
    if kind == "table":
        table, labels = read_tables(paths)
        columns = dict(columns or {})
        if flops is not None:
            if flops not in table.columns:
                raise DataError(
                    f"--flops {flops!r}: the table has no such column (columns: "
                    f"{sorted(map(str, table.columns))}); name a table's FLOP column with --flops-col"
                )
            if "flops" in columns and columns["flops"] != flops:
                raise DataError(f"--flops {flops!r} and --flops-col {columns['flops']!r} disagree")
            columns["flops"] = flops
        elif "flops" not in columns and "flops" not in table.columns and "flops_marin" in table.columns:
            # A CSV export of a sweep results index: its budgets are in flops_marin.
            columns["flops"] = "flops_marin"
        return from_table(
            table,
            columns=columns,
            transform=transform or "identity",
            dropna=dropna,
            flop_convention=flop_convention,
            source=", ".join(map(str, paths)),
            budget_convention=budget_convention,
            wide=wide,
            where=where,
            row_labels=labels,
        )
    raise DataError(f"unknown input kind {kind!r}; choose auto, dumps, index or table")


def _detect_kind(paths: list[Path]) -> str:
    for p in paths:
        if not p.exists():
            raise DataError(f"input {str(p)!r} does not exist")
    first = paths[0]
    if first.is_dir():
        if sweep_layout.results_path(first).exists():
            return "index"
        if any(first.rglob(f"*{eval_dump.SUFFIX}")) or not any(first.glob("*.csv")):
            return "dumps"
        return "table"
    if first.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = set(pq.read_schema(first).names)
        if eval_dump.has_dump_columns(names):
            return "dumps"
        if "run_id" in names:
            return "index"
    return "table"
