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

from relscale.atomic import atomic_write_text
from relscale.errors import ConfigError
from relscale.sweep import layout as sweep_layout  # torch-free sweep-folder contract

GROUPINGS = ("century", "sotu_type")
# Held-out addresses are scored on their first 8,000 characters (about 1,800 tokens each): the
# tiny models of a CPU sweep train on fewer tokens than the whole held-out split holds, and the
# gap between groups is what is measured, for which every model sees the same text.
EVAL_MAX_CHARS = 8000
# Shares of the wall-time target: the sweep gets most of it; preparing, sizing, evaluating and
# fitting the rest (measured on the 2-core CPU: ~10-60 s, ~15 s, ~1 s per model, ~10 s).
SWEEP_SHARE = 0.65
# A 512-token vocabulary: with 4096 the embeddings and output layer are most of every CPU-sized
# model's parameters and FLOPs, and the loss-optimal size sits below the narrowest width (the
# previous demo bracketed the minimum at one budget of three). At 512 a width of 16 is 20k
# parameters, 16k of them embeddings, and budgets of ~1e10-1e11 FLOPs have their optimum in range.
DEMO_VOCAB = 512
N_BUDGETS = 4
BUDGET_RATIO = 2.0
WIDTHS_PER_BUDGET = 5
# Chinchilla's rule N* = sqrt(C_train / (6 r)) predicts each budget's optimum; the pilot sweeps of
# this shape (fixed batch 8, budgets 8e8..6e9 FLOPs, runs of 20-400 steps) had their minima at
# about r = 2.5 tokens per parameter (12k parameters at 8e8, 31k at 6e9), far below Chinchilla's 20
# at these few steps. Widths are chosen around it per budget.
TOKENS_PER_PARAM = 2.5
MAX_EPOCHS = 4.0  # a run that repeats its data more often than this is reported: it bends the curves
# One batch of 8 sequences for every CPU run: Marin's batch rule (a power of two, halved under an LR
# cap) gave neighbouring widths batches of 4, 8 and 16, and that, not the width, set the bumps of
# the pilot's IsoFLOP curves. The LR keeps Marin's 0.33 sqrt(B) / d.
CPU_BATCH = 8


@dataclass
class DemoResult:
    """What ``run_demo`` did: the output folder, runs trained and dumps written, the fit report per
    grouping, the wall time in seconds and the sizing plan (budgets in flops_marin, widths per budget)."""
    out_dir: Path
    runs: int
    dumps: int
    reports: dict[str, Any] = field(default_factory=dict)  # grouping -> relscale.fit FitReport
    wall_s: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)  # budgets, widths per budget, epochs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``relscale demo`` flags: ``--out``, ``--minutes``, ``--device``, ``--budgets``, ``--vocab-size``,
    ``--n-boot``, ``--threads``."""
    parser.add_argument("--out", default="relscale_demo", help="output folder (re-used on re-runs)")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time target for the whole demo")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--budgets", type=float, nargs="*", default=None,
                        help="IsoFLOP budgets (flops_marin) instead of sizing them to --minutes")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"tokenizer size (default: {DEMO_VOCAB})")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws of the fits")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny models: 1 is fastest on a few cores)")


def run(args: argparse.Namespace) -> int:
    """Run the demo as parsed by :func:`add_arguments`; returns the exit status (0)."""
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
    """The tiny rule on narrow models: head dim 4 so widths step by 4 (8, 12, 16, ...: five widths
    span about 2.5x in parameters, the parabolic region around the optimum; steps of 8 put the
    widest of five so far out that it barely trains), widths from 8 chosen per budget, and one
    batch size (CPU_BATCH) for every run."""
    from relscale.sweep.spec import BatchRule, WidthRule

    cfg.width = WidthRule(min=8, max=64, step=4)
    cfg.head_dim = 4
    cfg.batch = BatchRule(rule="fixed", size=CPU_BATCH, min=1, max_micro_batch=0, gpus_per_run=1)
    cfg.flop_tolerance = max(cfg.flop_tolerance, 0.02)
    return cfg


def _shape(device: str):
    from relscale.sweep import presets

    return presets.gpu_small() if device == "cuda" else cpu_shapes(presets.tiny())


def budget_sweeps(shape, budgets: list[float], vocab: int) -> list:
    """One sweep config per budget, its widths chosen around the budget's predicted optimum
    (relscale.sweep.grid.widths_around of chinchilla_optimal_params), so every budget brackets
    its own minimum; the widths of a budget are consecutive multiples of the head dimension."""
    import copy

    from relscale.sweep.grid import chinchilla_optimal_params, widths_around
    from relscale.sweep.spec import WidthRule

    step = shape.head_dim
    candidates = list(range(shape.width.min, shape.width.max + 1, step))
    configs = []
    for budget in budgets:
        n_opt = chinchilla_optimal_params(budget, tokens_per_param=TOKENS_PER_PARAM)
        widths = widths_around(shape, budget, vocab, n_opt, n_widths=WIDTHS_PER_BUDGET,
                               candidate_widths=candidates)
        cfg = copy.deepcopy(shape)
        cfg.budgets = [float(budget)]
        cfg.width = WidthRule(min=widths[0], max=widths[-1], step=step)
        cfg.name = f"{shape.name}-demo"
        configs.append(cfg)
    return configs


def size_budgets(shape, minutes: float, vocab: int, rate: float, fixed_s: float = 2.0) -> list[float]:
    """The largest ladder of N_BUDGETS budgets (BUDGET_RATIO apart) whose sweeps are estimated to
    train in ``minutes`` at ``rate`` training FLOP/s plus ``fixed_s`` per run (bisection on the
    base budget; relscale.sweep.presets.estimate_seconds)."""
    import math

    from relscale.errors import DataError
    from relscale.sweep.presets import estimate_seconds

    def ladder(base: float) -> list[float]:
        return [float(f"{base * BUDGET_RATIO**i:.2g}") for i in range(N_BUDGETS)]

    def seconds(base: float) -> float:
        try:
            configs = budget_sweeps(shape, ladder(base), vocab)
        except DataError:  # too small for 3 widths: treat as free, the bisection moves up
            return 0.0
        return sum(estimate_seconds(c, vocab, rate, fixed_s) for c in configs)

    lo, hi = 1e8, 1e18
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if seconds(mid) > 60.0 * minutes else (mid, hi)
    return ladder(lo)


def sweep_configs(data_dir: Path, device: str, minutes: float, budgets: list[float] | None):
    """The demo's sweeps (one per budget) on our data, sized to ``minutes`` unless budgets are given."""
    from relscale.data import PreparedData
    from relscale.sweep import presets

    data = PreparedData(data_dir)
    vocab = data.vocab_size
    shape = _shape(device)
    shape.datasets[0].path = str(data_dir)
    if not budgets:
        rate = presets._measured_rate(shape, device, vocab)
        budgets = size_budgets(shape, minutes * SWEEP_SHARE, vocab, rate)
    configs = budget_sweeps(shape, sorted(float(b) for b in budgets), vocab)
    for cfg in configs:
        cfg.datasets[0].path = str(data_dir)
        cfg.train.device = device
        cfg.train.progress = True  # one bar per run, under the sweep's bar
        cfg.validate()
    return configs


def epochs_report(configs, vocab: int, train_tokens: int) -> list[str]:
    """Runs that pass over the training split more than MAX_EPOCHS times (repeated data bends the
    IsoFLOP curves): one line each."""
    from relscale.sweep.grid import build_grid

    lines = []
    for cfg in configs:
        for run in build_grid(cfg, {ds.name: vocab for ds in cfg.datasets}):
            epochs = run.tokens / train_tokens
            if epochs > MAX_EPOCHS:
                lines.append(f"run {run.name} repeats its data {epochs:.1f} times (> {MAX_EPOCHS:g} "
                             "epochs); its loss is not a fresh-data loss")
    return lines


def _open_sweeps(sweep_root: Path, data_dir: Path, device: str, minutes: float, budgets, echo) -> list:
    """The sweep directories, one per budget: re-opened as they are when the plan exists (the
    budgets were sized once), else sized and created."""
    from relscale.data import PreparedData
    from relscale.sweep.grid import budget_tag
    from relscale.sweep.registry import Sweep
    from relscale.sweep.spec import sweep_config_to_dict
    from relscale.sweep.start import init_sweep

    plan_path = sweep_root / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        sweeps = [Sweep(sweep_root / folder) for folder in plan["sweeps"]]
        echo(f"[2/4] sweep: re-using {sweep_root} ({sum(len(s.records) for s in sweeps)} runs)")
        return sweeps
    started = time.perf_counter()
    configs = sweep_configs(data_dir, device, minutes, budgets)
    data = PreparedData(data_dir)
    for line in epochs_report(configs, data.vocab_size, data.n_tokens("train")):
        echo(f"      warning: {line}")
    sweeps, folders = [], []
    for cfg in configs:
        folder = f"C{budget_tag(cfg.budgets[0])}"
        sweeps.append(init_sweep(sweep_root / folder, cfg))
        folders.append(folder)
    plan = {"sweeps": folders, "configs": [sweep_config_to_dict(c) for c in configs]}
    atomic_write_text(plan_path, json.dumps(plan, indent=1) + "\n")
    widths = "; ".join(f"{c.budgets[0]:.2g}: d={c.width.min}..{c.width.max}" for c in configs)
    echo(f"[2/4] sweep: {sum(len(s.records) for s in sweeps)} runs, widths per budget (flops_marin) "
         f"{widths}, sized in {time.perf_counter() - started:.0f} s")
    return sweeps


def _run_sweeps(sweeps: list, threads: int, echo) -> int:
    """Train every unfinished run of every sweep in this process, with one progress bar."""
    from tqdm.auto import tqdm

    from relscale.sweep.executors import WorkerOptions, worker_loop
    from relscale.sweep.registry import TERMINAL
    from relscale.sweep.results import update_index

    def finished(sweep) -> int:
        return sum(s.state in TERMINAL for s in sweep.states(60.0).values())

    total = sum(len(s.records) for s in sweeps)
    opts = WorkerOptions(max_runs=1, wait=False, threads=threads, verbose=False)
    done = 0
    with tqdm(total=total, initial=sum(finished(s) for s in sweeps), desc="sweep", unit="run",
              position=0) as bar:
        for sweep in sweeps:
            while finished(sweep) < len(sweep.records):
                before = finished(sweep)
                worker_loop(sweep.root, opts)
                bar.update(finished(sweep) - before)
                if finished(sweep) == before:  # nothing claimable: every remaining run failed for good
                    break
            update_index(sweep, rebuild=True)
            states = sweep.states(60.0)
            failed = [r.folder for r in sweep.records if states[r.run_id].state not in ("done",)]
            if failed:
                echo(f"      {len(failed)} run(s) did not finish: {', '.join(failed[:5])} "
                     "(see their folders)")
            done += len(sweep.records) - len(failed)
    return done


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
    """Prepare the corpus, train one IsoFLOP sweep per budget (widths around each budget's
    predicted optimum), dump held-out per-example losses, fit, and print the relative-law table
    per grouping field. Returns a DemoResult; raises ConfigError for a bad device."""
    import torch

    from relscale.data import prepare_default
    from relscale.eval import RunOptions, SetOptions, evaluate
    from relscale.fit import run_fit
    from relscale.fit.diagnostics import FitWarning

    started = time.perf_counter()
    out = Path(out)
    device = _device(device)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)  # tiny models: more threads only add contention
    data_dir, sweep_root, eval_dir, fit_dir = out / "data", out / "sweep", out / "evals", out / "fit"

    echo(f"[1/4] data: the default corpus (US State of the Union addresses) -> {data_dir}")
    prepare_default(data_dir, log=lambda line: echo(f"      {line}"), vocab_size=vocab_size or DEMO_VOCAB)

    sweeps = _open_sweeps(sweep_root, data_dir, device, minutes, budgets, echo)
    runs_total = sum(len(s.records) for s in sweeps)
    runs_done = _run_sweeps(sweeps, threads, echo)

    echo(f"[3/4] eval: per-example losses of every model on the held-out addresses -> {eval_dir}")
    sets = SetOptions(max_chars=EVAL_MAX_CHARS)
    eval_opts = RunOptions(out_dir=eval_dir, device=device, quiet=True, sets=sets)
    outcomes = evaluate([s.root for s in sweeps], ["default"], eval_opts)

    echo(f"[4/4] fit: IsoFLOP minima, per-group and relative laws (baseline: pooled groups) -> {fit_dir}")
    reports: dict[str, Any] = {}
    for grouping in GROUPINGS:
        echo(f"\n== groups by {grouping} ==")
        with warnings.catch_warnings():  # the report lists the fits' warnings once, in words
            warnings.simplefilter("ignore", FitWarning)
            reports[grouping] = run_fit(
                eval_dir, what=("isoflop", "groups", "relative"), metric="bpb", grouping=grouping,
                baseline="pooled", n_boot=n_boot, out_dir=fit_dir / grouping, overwrite=True, echo=echo,
                frontier="measured",
            )
    wall = time.perf_counter() - started
    first = next(iter(reports.values()))
    iso = first.isoflop
    law = None if iso is None else iso.n_opt_law
    plan = {
        "budgets": [s.read_config()["budgets"][0] for s in sweeps],
        "widths": [sorted({r.row["hidden"] for r in s.records}) for s in sweeps],
        "interior_minima": None if iso is None else [not (b.at_edge or b.concave) for b in iso.budgets],
        "frontier_points": 0 if law is None else law.n_points,
        "n_opt_exponent": None if law is None else law.exponent,
        "n_opt_exponent_ci": None if law is None else list(law.exponent_ci),
        "frontier_flag": None if iso is None else iso.frontier_flag,
    }
    summary = {
        "runs_finished": runs_done, "runs": runs_total, "dumps": len(outcomes),
        "device": device, "wall_s": round(wall, 1), "plan": plan, "outputs": {
            "data": str(data_dir), "sweeps": [str(s.root) for s in sweeps],
            "results_index": [str(sweep_layout.results_path(s.root)) for s in sweeps],
            "dumps": str(eval_dir), "fits": {g: str(fit_dir / g) for g in GROUPINGS}},
    }
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    echo(f"\nDone in {wall / 60:.1f} min: {runs_done}/{runs_total} runs, {len(outcomes)} dumps. "
         f"Tables and plots: {fit_dir}/<grouping>/; sweeps: {sweep_root}/C*/{sweep_layout.RESULTS_INDEX}; "
         f"summary: {out}/demo_summary.json")
    return DemoResult(out_dir=out, runs=runs_done, dumps=len(outcomes), reports=reports, wall_s=wall,
                      plan=plan)
