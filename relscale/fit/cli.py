"""`relscale fit`: scaling-law fits from eval dumps, a sweep results index, or a CSV table."""

from __future__ import annotations

import argparse
import warnings

from relscale.errors import ConfigError, RelscaleError

from .diagnostics import FitWarning
from .io import METRICS, TRANSFORMS
from .report import WHAT, run_fit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``relscale fit`` flags: inputs, what to fit, metric and transform, column names, FLOP
    convention, budgets, baseline, grouping, bootstrap settings and the output folder."""
    parser.add_argument(
        "inputs",
        nargs="+",
        help="eval dump Parquet files/folders, a sweep dir or results.parquet, or a CSV table",
    )
    parser.add_argument(
        "--kind",
        choices=("auto", "dumps", "index", "table"),
        default="auto",
        help="input kind (auto: from the files' columns)",
    )
    parser.add_argument("--what", choices=("all", *WHAT), default="all", help="which fit(s) to run")
    parser.add_argument("--out", default=None, help="output folder for tables and figures (not overwritten)")
    parser.add_argument("--metric", choices=sorted(METRICS), default="bpb", help="eval-dump metric")
    parser.add_argument(
        "--transform",
        choices=sorted(TRANSFORMS),
        default=None,
        help="metric -> error (default per metric: acc one_minus, prob_correct neg_log, ...)",
    )
    parser.add_argument(
        "--flops",
        default=None,
        help="FLOP column / convention: flops_marin (forward-only, sweep budgets; the default for dumps "
        "and sweep results) or flops_train; for a table, a column that must exist",
    )
    parser.add_argument(
        "--wide",
        default=None,
        help="table with one loss column per group: COL1,COL2,... or a glob such as 'loss_*' "
        "(the column names become the groups)",
    )
    parser.add_argument(
        "--where",
        default=None,
        help="row filter, e.g. \"source == 'x' and params >= 1e6\" (==, !=, <, <=, >, >=, in, and, or, not)",
    )
    parser.add_argument(
        "--budget-convention",
        default=None,
        help="FLOP convention of a table's budget column (default: the FLOP column's; unstated without one)",
    )
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="declared IsoFLOP budgets: runs without a budget column snap to the nearest one",
    )
    parser.add_argument(
        "--baseline", default="pooled", help="baseline group name, or 'pooled' (mean of groups)"
    )
    parser.add_argument(
        "--grouping", default=None,
        help="eval dumps: keep one grouping field's groups (e.g. century); default: all, as 'field=group'",
    )
    parser.add_argument(
        "--targets", nargs="*", default=None, help="target groups (default: all but baseline)"
    )
    parser.add_argument(
        "--select",
        choices=("all", "optimal"),
        default="all",
        help="models for group/relative laws: all, or the compute-optimal one per budget",
    )
    parser.add_argument("--irreducible", action="store_true", help="absolute laws E = c + a F^-beta")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws (vectorised fits)")
    parser.add_argument("--parametric-boot", type=int, default=100, help="bootstrap refits of approach 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=float, default=0.95, help="interval level")
    parser.add_argument("--project-at", type=float, nargs="*", default=(), help="FLOPs to project G(F) at")
    parser.add_argument(
        "--isoflop-var", choices=("params", "tokens"), default="params", help="x of the IsoFLOP parabolas"
    )
    parser.add_argument(
        "--isoflop-group",
        default=None,
        help="group whose loss the IsoFLOP/approach-3 fits use (default: mean over groups)",
    )
    parser.add_argument(
        "--robust",
        choices=("none", "soft_l1", "huber"),
        default="none",
        help="robust loss for the IsoFLOP parabolas",
    )
    parser.add_argument(
        "--frontier",
        choices=("all", "measured"),
        default="all",
        help="IsoFLOP frontier from every convex budget, or only budgets whose minimum is measured "
        "(interior, bootstrap inside the range) when there are 3",
    )
    for role in ("params", "tokens", "flops", "loss", "group", "model", "budget"):
        parser.add_argument(f"--{role}-col", default=None, help=f"table column holding {role}")
    parser.add_argument("--no-plots", action="store_true", help="write tables only")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a folder with results")


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values no fit can use (ConfigError naming the flag: exit 2, one line)."""
    if not 0 < args.level < 1:
        raise ConfigError(f"--level {args.level}: the interval level must lie strictly between 0 and 1")
    if args.n_boot < 1:
        raise ConfigError(f"--n-boot {args.n_boot}: at least one bootstrap draw is needed")


def run(args: argparse.Namespace) -> int:
    """Run ``relscale fit`` as parsed by :func:`add_arguments`; returns 0. ConfigError / DataError
    (exit 2 through the top-level CLI) for flags no fit can use or unreadable inputs."""
    _check_flags(args)
    columns = {
        ("model_id" if role == "model" else role): getattr(args, f"{role}_col")
        for role in ("params", "tokens", "flops", "loss", "group", "model", "budget")
        if getattr(args, f"{role}_col", None)
    }
    # RelscaleError propagates: the top-level `relscale` CLI prints its message and exits 2.
    # Fit warnings are listed once, in words, in the printed summary: not again with source lines.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        _run(args, columns)
    return 0


def _run(args: argparse.Namespace, columns: dict[str, str]) -> None:
    run_fit(
        args.inputs,
        what=args.what,
        kind=args.kind,
        metric=args.metric,
        transform=args.transform,
        flops=args.flops,
        columns=columns or None,
        wide=args.wide,
        where=args.where,
        budget_convention=args.budget_convention,
        declared_budgets=args.budgets,
        baseline=args.baseline,
        grouping=args.grouping,
        targets=args.targets,
        select=args.select,
        irreducible=args.irreducible,
        isoflop_var=args.isoflop_var,
        isoflop_group=args.isoflop_group,
        robust=None if args.robust == "none" else args.robust,
        frontier=args.frontier,
        n_boot=args.n_boot,
        parametric_boot=args.parametric_boot,
        seed=args.seed,
        level=args.level,
        project_at=args.project_at,
        out_dir=args.out,
        plots=not args.no_plots,
        overwrite=args.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m relscale.fit.cli) until the lead wires `relscale fit`."""
    import sys

    parser = argparse.ArgumentParser(prog="relscale fit", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RelscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
