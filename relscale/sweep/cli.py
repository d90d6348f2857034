"""``relscale grid`` (print an IsoFLOP grid) and ``relscale sweep run|status|list`` (run one).

    relscale grid --preset marin --format csv
    relscale grid configs/sweeps/tiny.toml
    relscale sweep run sweeps/tiny --preset tiny                # initialise, then work
    relscale sweep run sweeps/tiny --executor local-gpus        # more workers on the same dir
    relscale sweep status sweeps/tiny

Only argument parsing and printing live here; the work is in relscale.sweep.start (loading a
config, creating the directory, checking the data), relscale.sweep.status (the text views) and
relscale.sweep.executors (the workers).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter

from relscale.errors import ConfigError
from relscale.sweep.start import check_data, init_sweep, load_config
from relscale.sweep.status import failed_runs, format_table, list_text, progress_bar, status_text

__all__ = ["add_grid_arguments", "add_sweep_arguments", "check_data", "failed_runs", "format_table",
           "init_sweep", "list_text", "progress_bar", "run_grid", "run_sweep", "status_text"]

FORMATS = ("table", "csv", "json")
TABLE_COLUMNS = ["name", "dataset", "budget", "hidden", "layers", "heads", "batch", "steps", "tokens",
                 "params", "non_embedding_params", "lr", "beta2", "flops_marin", "flops_train"]


# ---------------------------------------------------------------------------------------------
# relscale grid


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``relscale grid``: a config file or --preset, --format, --vocab-size, --dropped."""
    parser.add_argument("config", nargs="?", help="a sweep config (TOML), e.g. configs/sweeps/tiny.toml")
    parser.add_argument("--preset", help="a named sweep instead of a file: marin or tiny")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size to use instead of reading each dataset's prepared data")
    parser.add_argument("--dropped", action="store_true",
                        help="also list the (budget, width) points the rule drops, and why")


def run_grid(args: argparse.Namespace) -> int:
    """``relscale grid``: print the grid's runs (table, CSV or JSON) and, with --dropped, the
    points the rule drops (to stderr). ConfigError for a missing config or a bad --vocab-size."""
    from relscale.sweep.grid import COLUMNS, build_grid, candidates, resolve_vocab_sizes

    cfg = load_config(args.config, args.preset)
    if cfg is None:
        raise ConfigError("relscale grid: give a sweep config file or --preset NAME")
    if args.vocab_size is not None:
        if args.vocab_size <= 0:
            raise ConfigError(f"--vocab-size: {args.vocab_size} must be positive")
        cfg.vocab_size = args.vocab_size
    vocab = resolve_vocab_sizes(cfg)
    rows = [run.row() for run in build_grid(cfg, vocab)]
    out = sys.stdout
    if args.format == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif args.format == "json":
        json.dump(rows, out, indent=1)
        out.write("\n")
    else:
        out.write(format_table(rows, TABLE_COLUMNS) + "\n")
        per_budget = Counter(row["budget"] for row in rows)
        out.write(f"{len(rows)} runs ({len(cfg.datasets)} dataset(s)); per budget: "
                  + ", ".join(f"{b:g}: {n}" for b, n in sorted(per_budget.items())) + "\n")
    if args.dropped:
        dropped = [{"budget": c.budget, "hidden": c.hidden, "layers": c.layers, "batch": c.batch,
                    "steps": c.steps, "reason": c.dropped}
                   for b in sorted(cfg.budgets) for c in candidates(cfg, b, next(iter(vocab.values())))
                   if c.dropped]
        sys.stderr.write("dropped:\n" + format_table(dropped, ["budget", "hidden", "layers", "batch", "steps",
                                                               "reason"]) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# relscale sweep


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``relscale sweep run|status|list SWEEP_DIR``."""
    from relscale.sweep.executors import EXECUTORS
    from relscale.sweep.registry import DEFAULT_HEARTBEAT_S, DEFAULT_LEASE_TIMEOUT_S

    parser.add_argument("action", choices=("run", "status", "list"))
    parser.add_argument("sweep_dir", help="the sweep directory (created by the first `sweep run`)")
    parser.add_argument("--config", help="sweep config (TOML) to initialise the directory with")
    parser.add_argument("--preset", help="named sweep config to initialise the directory with (marin, tiny)")
    parser.add_argument("--executor", choices=EXECUTORS, default="inprocess",
                        help="inprocess (default; --workers N > 1: N local worker processes), local-gpus "
                             "(one worker per GPU), torchrun (multi-GPU runs), slurm (submitit jobs)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default 1) / Slurm jobs (default 1) / local-gpus workers "
                             "(default and at most: one per visible GPU)")
    parser.add_argument("--max-retries", type=int, default=2,
                        help="retries of a run that raised (default: 2)")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S,
                        help=f"seconds between lease heartbeats (default: {DEFAULT_HEARTBEAT_S:g})")
    parser.add_argument("--lease-timeout", type=float, default=DEFAULT_LEASE_TIMEOUT_S,
                        help="seconds without a heartbeat after which a run is taken over "
                             f"(default: {DEFAULT_LEASE_TIMEOUT_S:g})")
    parser.add_argument("--poll", type=float, default=5.0,
                        help="seconds between looks while other workers hold the remaining runs")
    parser.add_argument("--no-wait", action="store_true",
                        help="stop when no run is free instead of waiting for other workers' runs")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--quiet", action="store_true", help="no per-run log lines")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep finished runs' checkpoints (default: delete them; final/ weights stay)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per worker (default: torch's; CPU workers started with "
                             "--workers N share the cores)")
    parser.add_argument("--slurm-partition", default=None, help="slurm: partition")
    parser.add_argument("--slurm-time", type=int, default=24 * 60, help="slurm: minutes per job")
    parser.add_argument("--slurm-gpus", type=int, default=1, help="slurm: GPUs per job")


def run_sweep(args: argparse.Namespace) -> int:
    """``relscale sweep``: ``run`` initialises (with --config/--preset) and works on the sweep,
    then prints its status; exit 1 when a run failed. ``status`` / ``list`` print the views."""
    from relscale.sweep.executors import WorkerOptions, execute
    from relscale.sweep.registry import Sweep
    from relscale.sweep.results import update_index

    cfg = load_config(args.config, args.preset)
    for name in ("workers", "max_retries"):
        if (getattr(args, name) or 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0")
    if args.heartbeat <= 0 or args.lease_timeout <= args.heartbeat:
        raise ConfigError("--lease-timeout must be longer than --heartbeat (> 0)")
    if args.action != "run":
        if cfg is not None:
            raise ConfigError(f"sweep {args.action}: --config/--preset only apply to `sweep run`")
        sweep = Sweep(args.sweep_dir)
        sweep.read_config()
        text = status_text(sweep, args.lease_timeout) if args.action == "status" else list_text(
            sweep, args.lease_timeout)
        print(text)
        return 0

    if cfg is None:
        sweep = Sweep(args.sweep_dir)
        sweep.read_config()  # errors, naming the command, if the directory is not a sweep
    else:
        sweep = init_sweep(args.sweep_dir, cfg)
    check_data(sweep)
    opts = WorkerOptions(max_retries=args.max_retries, heartbeat_s=args.heartbeat,
                         lease_timeout_s=args.lease_timeout, poll_s=args.poll, wait=not args.no_wait,
                         max_runs=args.max_runs, verbose=not args.quiet, threads=args.threads,
                         keep_checkpoints=args.keep_checkpoints)
    if args.executor == "torchrun":
        from relscale.sweep.spec import sweep_config_from_json

        opts.nproc_per_run = sweep_config_from_json(sweep.read_config()).batch.gpus_per_run
    slurm = {}
    if args.executor == "slurm":
        params = {"timeout_min": args.slurm_time, "gpus_per_node": args.slurm_gpus, "tasks_per_node": 1}
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
        slurm = {"slurm_parameters": params}
    code = execute(args.sweep_dir, args.executor, args.workers, opts, **slurm)
    if args.executor != "slurm":
        update_index(sweep)
        if not args.quiet:
            print(status_text(sweep, args.lease_timeout))
        failed = failed_runs(sweep)
        if failed:
            # A sweep with failed runs is not a success: scripts and schedulers must see it.
            for folder, error in failed[:10]:
                print(f"relscale sweep: run {folder} failed: {error or 'no error recorded'}", file=sys.stderr)
            if len(failed) > 10:
                print(f"relscale sweep: ... and {len(failed) - 10} more failed runs", file=sys.stderr)
            code = code or 1
    return code
