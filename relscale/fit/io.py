"""Inputs of the fits: per-example eval dumps, the sweep results index, or any CSV / DataFrame.

Every loader returns a FitData: one row per (model, group) with the model's size, data and compute
and an *error* (lower is better, > 0) made from a metric by an explicit transform, plus the FLOP
convention the `flops` column is in. The metric aggregation over a group's examples is a ratio of
sums where that is what the metric means (NLL per token, bits per byte), a plain mean otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from relscale.errors import DataError

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
    "FLOP convention: flops_marin (forward-only, Marin accounting; the sweep budgets) is about 3x smaller "
    "than flops_train (6ND-style training FLOPs). The intercepts (gamma, coefficients) depend on the "
    "convention; the exponents (beta, delta_beta) do not."
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


def apply_transform(values: np.ndarray, transform: str) -> np.ndarray:
    if transform not in TRANSFORMS:
        raise DataError(f"unknown transform {transform!r}; choose one of {sorted(TRANSFORMS)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return TRANSFORMS[transform](np.asarray(values, dtype=float))


def _check_columns(frame: pd.DataFrame, needed: Iterable[str], where: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; columns present: {sorted(map(str, frame.columns))}"
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
            more = f" (and {len(where_bad) - 20} more)" if len(where_bad) > 20 else ""
            raise DataError(
                f"{where}: column {col!r} is NaN, inf or not a number in rows {where_bad[:20]}{more}"
            )


def _group_labels(frame: pd.DataFrame) -> pd.Series:
    """group, or dataset where group is empty; 'dataset/group' where one group name spans datasets."""
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
    if "dataset" in frame.columns:
        spans = pd.DataFrame({"label": label, "dataset": dataset}).groupby("label")["dataset"].nunique()
        clash = label.isin(spans.index[spans > 1])
        label = label.where(~clash, dataset + "/" + label)
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
    for path in _expand_paths(paths, "*.parquet"):
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
        examples = frame.loc[bad, ["model_id", "group", "value"]].head(5).to_dict("records")
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
) -> FitData:
    """The sweep's results.parquet (one row per run); only runs whose status is finished are used."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.parquet"
    if not path.exists():
        raise DataError(f"sweep results index {str(path)!r} does not exist")
    frame = pd.read_parquet(path)
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
) -> FitData:
    """Any table with params, tokens and/or flops, loss, and optionally group, model and budget.

    columns maps the canonical names (params, tokens, flops, loss, group, model_id, budget) to the
    table's column names. Missing flops are 6ND (k = flops_per_param_token); missing tokens are
    flops / (k N). NaN rows raise naming the rows, or are dropped with a warning when dropna.
    """
    source = source or (str(table) if not isinstance(table, pd.DataFrame) else "DataFrame")
    if not isinstance(table, pd.DataFrame):
        path = Path(table)
        if not path.exists():
            raise DataError(f"table {source!r} does not exist")
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    names = {
        "params": "params",
        "tokens": "tokens",
        "flops": "flops",
        "loss": "loss",
        "group": "group",
        "model_id": "model_id",
        "budget": "budget",
    }
    unknown = set(columns or {}) - set(names)
    if unknown:
        raise DataError(f"unknown column role(s) {sorted(unknown)}; roles: {sorted(names)}")
    names.update(columns or {})
    explicit = set(columns or {})
    # Roles named explicitly must exist; default names are optional where a role is optional.
    _check_columns(table, [names[r] for r in explicit], source)
    _check_columns(table, [names["loss"], names["params"]], source)
    has = {role: names[role] in table.columns for role in names}
    if not has["tokens"] and not has["flops"]:
        raise DataError(
            f"{source}: need a tokens column ({names['tokens']!r}) or a flops column "
            f"({names['flops']!r}); columns present: {sorted(map(str, table.columns))}"
        )
    required = [names[r] for r in ("params", "loss", "tokens", "flops") if has[r]]
    bad = np.zeros(len(table), dtype=bool)
    for col in required:
        bad |= ~np.isfinite(pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float))
    if bad.any():
        if not dropna:
            _check_finite(table.reset_index(drop=True), required, source)
        warn(
            DroppedDataWarning,
            f"{source}: dropped rows {np.flatnonzero(bad).tolist()[:50]} with NaN in {required}",
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
        convention = flop_convention or f"{k:g}ND"
    out = pd.DataFrame(
        {
            "model_id": table[names["model_id"]].astype(str)
            if has["model_id"]
            else pd.Series([f"row{i}" for i in range(len(table))]),
            "params": params,
            "tokens": tokens,
            "flops": flops,
            "budget": table[names["budget"]].astype(float) if has["budget"] else np.nan,
            "group": table[names["group"]].astype(str)
            if has["group"]
            else (table["dataset"].astype(str) if "dataset" in table.columns else "all"),
            "value": table[names["loss"]].astype(float),
        }
    )
    dup = out.duplicated(["model_id", "group"])
    if dup.any():
        raise DataError(
            f"{source}: (model, group) pairs repeat in rows {np.flatnonzero(dup).tolist()[:20]}; "
            f"give a model column (columns={{'model_id': ...}}) that identifies each model"
        )
    out["error"] = apply_transform(out["value"].to_numpy(), transform)
    _check_errors(out, source, f"{names['loss']} -> {transform}")
    # A budget column is taken to be in the same convention as the flops unless told otherwise.
    budget_convention = budget_convention or convention
    return FitData(
        out,
        flop_convention=convention,
        metric=names["loss"],
        transform=transform,
        source=source,
        budget_convention=budget_convention,
    )


def load(
    inputs: str | Path | Iterable[str | Path],
    *,
    kind: str = "auto",
    metric: str = "bpb",
    transform: str | None = None,
    flops: str = "flops_marin",
    columns: Mapping[str, str] | None = None,
    flop_convention: str | None = None,
    dropna: bool = False,
    grouping: str | None = None,
) -> FitData:
    """Load dumps, a results index, or a table; kind='auto' decides from the files' columns."""
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if kind == "auto":
        kind = _detect_kind(paths)
    if kind == "dumps":
        return aggregate_dumps(
            read_dumps(paths),
            metric=metric,
            transform=transform,
            flops=flops,
            source=", ".join(map(str, paths)),
            grouping=grouping,
        )
    if len(paths) != 1:
        raise DataError(f"a {kind} input is one file, got {len(paths)}")
    if kind == "index":
        return read_results_index(paths[0], flops=flops)
    if kind == "table":
        path = paths[0]
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        columns = dict(columns or {})
        # A table that carries the requested convention column (e.g. a CSV export of the index) uses it.
        if "flops" not in columns and flops in table.columns:
            columns["flops"] = flops
        return from_table(
            table,
            columns=columns,
            transform=transform or "identity",
            dropna=dropna,
            flop_convention=flop_convention,
            source=str(path),
        )
    raise DataError(f"unknown input kind {kind!r}; choose auto, dumps, index or table")


def _detect_kind(paths: list[Path]) -> str:
    for p in paths:
        if not p.exists():
            raise DataError(f"input {str(p)!r} does not exist")
    first = paths[0]
    if first.is_dir():
        return "index" if (first / "results.parquet").exists() else "dumps"
    if first.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = set(pq.read_schema(first).names)
        if "example_id" in names:
            return "dumps"
        if "run_id" in names:
            return "index"
    return "table"
