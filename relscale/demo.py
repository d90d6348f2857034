"""``relscale demo``: the whole study on the embedded default corpus, sized to the machine.

1. prepare the State of the Union corpus (groups: century, spoken vs written; held-out addresses),
2. run a small IsoFLOP sweep in process (3 budgets x several widths), its budgets chosen so that
   the whole demo takes about ``--minutes`` on the device it finds,
3. dump per-example losses of every model on the held-out addresses,
4. fit IsoFLOP minima, per-group absolute laws and relative laws of each group against the pooled
   baseline, per grouping field, and print the table.

Everything lands under ``--out``; re-running reuses finished work (the prepared data, every
finished run, every written dump), and an interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relscale.errors import ConfigError

GROUPINGS = ("century", "sotu_type")
# Held-out addresses are scored on their first 8,000 characters (about 1,800 tokens each): the
# tiny models of a CPU sweep train on fewer tokens than the whole held-out split holds, and the
# gap between groups is what is measured, for which every model sees the same text.
EVAL_MAX_CHARS = 8000
# Shares of the wall-time target: the sweep gets most of it; preparing, sizing, evaluating and
# fitting the rest (measured on the 2-core CPU: ~10 s, ~15 s, ~1 s per model, ~5 s).
SWEEP_SHARE = 0.7


@dataclass
class DemoResult:
    out_dir: Path
    runs: int
    dumps: int
    reports: dict[str, Any] = field(default_factory=dict)  # grouping -> relscale.fit FitReport
    wall_s: float = 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="relscale_demo", help="output folder (re-used on re-runs)")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time target for the whole demo")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--budgets", type=float, nargs="*", default=None,
                        help="IsoFLOP budgets (flops_marin) instead of sizing them to --minutes")
    parser.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: 4096)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws of the fits")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny models: 1 is fastest on a few cores)")


def run(args: argparse.Namespace) -> int:
    run_demo(
        args.out, minutes=args.minutes, device=args.device, budgets=args.budgets,
        vocab_size=args.vocab_size, n_boot=args.n_boot, threads=args.threads,
    )
    return 0


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return device


def cpu_shapes(cfg):
    """The tiny rule on narrower models (widths 16..64, head dim 8): at the budgets a CPU trains
    in minutes, widths 32..128 put the loss-optimal width at or below the narrow edge (measured:
    every IsoFLOP parabola opened downward), while 16..64 brackets it at the largest budget."""
    from relscale.sweep.spec import WidthRule

    cfg.width = WidthRule(min=16, max=64, step=16)
    cfg.head_dim = 8
    return cfg


def sweep_config(data_dir: Path, device: str, minutes: float, budgets: list[float] | None):
    """The demo's sweep: the hardware-sized preset (tiny rule on CPU, larger on GPU) on our data."""
    from relscale.data import PreparedData
    from relscale.sweep import presets

    data = PreparedData(data_dir)
    vocab, tokens = data.vocab_size, data.n_tokens("train")
    shape = presets.gpu_small() if device == "cuda" else cpu_shapes(presets.tiny())
    shape.datasets[0].path = str(data_dir)
    if budgets:
        cfg = shape
        cfg.budgets = sorted(float(b) for b in budgets)
        cfg.name = f"{cfg.name}-demo"
    else:
        rate = presets._measured_rate(shape, device, vocab)
        cfg = presets.preset_for_hardware(
            device, minutes * SWEEP_SHARE, train_flops_per_s=rate, vocab_size=vocab, train_tokens=tokens,
            shape=shape,
        )
    cfg.datasets[0].path = str(data_dir)
    cfg.train.device = device
    cfg.train.progress = True  # one bar per run, under the sweep's bar
    cfg.validate()
    return cfg


def _open_sweep(sweep_dir: Path, data_dir: Path, device: str, minutes: float, budgets, echo):
    """The sweep directory: re-opened as it is when it exists (its budgets were sized once)."""
    from relscale.sweep.cli import init_sweep
    from relscale.sweep.registry import Sweep

    sweep = Sweep(sweep_dir)
    if sweep.exists():
        echo(f"[2/4] sweep: re-using {sweep_dir} ({len(sweep.records)} runs)")
        return sweep
    started = time.perf_counter()
    cfg = sweep_config(data_dir, device, minutes, budgets)
    sweep = init_sweep(sweep_dir, cfg)
    budgets_text = ", ".join(f"{b:.2g}" for b in cfg.budgets)
    echo(f"[2/4] sweep: {len(sweep.records)} runs, budgets {budgets_text} FLOPs (flops_marin), "
         f"sized in {time.perf_counter() - started:.0f} s")
    return sweep


def _run_sweep(sweep, threads: int, echo) -> int:
    """Train every unfinished run in this process, with a progress bar over the sweep."""
    from tqdm.auto import tqdm

    from relscale.sweep.executors import WorkerOptions, worker_loop
    from relscale.sweep.registry import TERMINAL
    from relscale.sweep.results import update_index

    def finished() -> int:
        return sum(s.state in TERMINAL for s in sweep.states(60.0).values())

    total = len(sweep.records)
    opts = WorkerOptions(max_runs=1, wait=False, threads=threads, verbose=False)
    with tqdm(total=total, initial=finished(), desc="sweep", unit="run", position=0) as bar:
        while finished() < total:
            before = finished()
            worker_loop(sweep.root, opts)
            bar.update(finished() - before)
            if finished() == before:  # nothing claimable: every remaining run failed for good
                break
    update_index(sweep, rebuild=True)
    states = sweep.states(60.0)
    failed = [r.folder for r in sweep.records if states[r.run_id].state not in ("done",)]
    if failed:
        echo(f"      {len(failed)} run(s) did not finish: {', '.join(failed[:5])} (see their folders)")
    return total - len(failed)


def run_demo(
    out: str | Path = "relscale_demo",
    *,
    minutes: float = 10.0,
    device: str = "auto",
    budgets: list[float] | None = None,
    vocab_size: int | None = None,
    n_boot: int = 1000,
    threads: int = 1,
    echo=print,
) -> DemoResult:
    import torch

    from relscale.data import prepare_default
    from relscale.eval import RunOptions, SetOptions, evaluate
    from relscale.fit import run_fit
    from relscale.fit.diagnostics import FitWarning

    started = time.perf_counter()
    out = Path(out)
    device = _device(device)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    data_dir, sweep_dir, eval_dir, fit_dir = out / "data", out / "sweep", out / "evals", out / "fit"

    echo(f"[1/4] data: the default corpus (US State of the Union addresses) -> {data_dir}")
    options = {} if vocab_size is None else {"vocab_size": vocab_size}
    prepare_default(data_dir, log=lambda line: echo(f"      {line}"), **options)

    sweep = _open_sweep(sweep_dir, data_dir, device, minutes, budgets, echo)
    runs_done = _run_sweep(sweep, threads, echo)

    echo(f"[3/4] eval: per-example losses of every model on the held-out addresses -> {eval_dir}")
    sets = SetOptions(max_chars=EVAL_MAX_CHARS)
    eval_opts = RunOptions(out_dir=eval_dir, device=device, quiet=True, sets=sets)
    outcomes = evaluate([sweep_dir], ["default"], eval_opts)

    echo(f"[4/4] fit: IsoFLOP minima, per-group and relative laws (baseline: pooled groups) -> {fit_dir}")
    reports: dict[str, Any] = {}
    for grouping in GROUPINGS:
        echo(f"\n== groups by {grouping} ==")
        with warnings.catch_warnings():  # the report prints its own edge-of-range notes
            warnings.simplefilter("ignore", FitWarning)
            reports[grouping] = run_fit(
                eval_dir, what=("isoflop", "groups", "relative"), metric="bpb", grouping=grouping,
                baseline="pooled", n_boot=n_boot, out_dir=fit_dir / grouping, overwrite=True, echo=echo,
            )
    wall = time.perf_counter() - started
    summary = {
        "runs_finished": runs_done, "runs": len(sweep.records), "dumps": len(outcomes),
        "device": device, "wall_s": round(wall, 1), "outputs": {
            "data": str(data_dir), "sweep": str(sweep_dir),
            "results_index": str(sweep_dir / "results.parquet"),
            "dumps": str(eval_dir), "fits": {g: str(fit_dir / g) for g in GROUPINGS}},
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"\nDone in {wall / 60:.1f} min: {runs_done}/{len(sweep.records)} runs, {len(outcomes)} dumps. "
         f"Tables and plots: {fit_dir}/<grouping>/; sweep results: {sweep_dir}/results.parquet; "
         f"summary: {out}/demo_summary.json")
    return DemoResult(out_dir=out, runs=runs_done, dumps=len(outcomes), reports=reports, wall_s=wall)
