"""Sweep-runner overheads: the fixed cost per run of a warm worker, and the registry at 10,000 runs.

Fixed cost: a worker trains a sweep of small runs in-process on the device; per run it logs
(workers/*.jsonl) the time from the start of its claim to the run's first optimizer step, and
the dead time from the previous run's last optimizer step to this run's first (final
evaluation and save, recording the result, claiming, building the model). The goal is a warm
worker reaching the next run's first step within 5 s.
Registry: a synthetic sweep of 10,000 runs, half finished, a few held; time to initialise it,
to print its status, to claim the next run and to list every run (goal: status and claim < 1 s).

    python bench/bench_sweep.py [--profile ci|full] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import write_results  # noqa: E402

from relscale.config import TrainConfig, to_dict  # noqa: E402
from relscale.data import prepare_default  # noqa: E402
from relscale.sweep.executors import WorkerOptions, worker_loop  # noqa: E402
from relscale.sweep.registry import Lease, Sweep, write_atomic  # noqa: E402
from relscale.sweep.spec import BatchRule, DatasetSpec, DepthRule, LRRule, SweepConfig, WidthRule  # noqa: E402
from relscale.sweep.start import init_sweep  # noqa: E402
from relscale.sweep.status import list_text, status_text  # noqa: E402

NAME = "sweep"
PROFILES = {
    # prepared data, widths, budgets (forward FLOPs), registry size
    "ci": {"prepare": {"max_docs": 30, "vocab_size": 512}, "width": (16, 32, 16), "seq_len": 32,
           "head_dim": 8, "budgets": [2e8, 4e8, 6e8], "registry_runs": 10_000},
    "full": {"prepare": {}, "width": (64, 128, 64), "seq_len": 128, "head_dim": 16,
             "budgets": [3e9, 1e10, 3e10], "registry_runs": 10_000},
}


def _sweep_config(settings: dict, data_path: str, device: str) -> SweepConfig:
    lo, hi, step = settings["width"]
    return SweepConfig(
        name="bench", budgets=settings["budgets"], flop_tolerance=0.05, seq_len=settings["seq_len"],
        head_dim=settings["head_dim"], target_steps=64, width=WidthRule(min=lo, max=hi, step=step),
        depth=DepthRule(rule="fixed", layers=2), batch=BatchRule(rule="fixed", size=4),
        lr=LRRule(rule="fixed", value=3e-3), datasets=[DatasetSpec(name="sotu", path=data_path)],
        train=TrainConfig(device=device, ckpt_interval=0, eval_batches=4, progress=False),
    )


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median_s": statistics.median(values), "max_s": max(values),
            "min_s": min(values)}


def bench_fixed_cost(settings: dict, device: str, tmp: Path) -> list[dict]:
    data = prepare_default(tmp / "sotu", log=lambda message: None, **settings["prepare"]).out_dir
    cfg = _sweep_config(settings, str(data), device)
    sweep = init_sweep(tmp / "sweep", cfg)
    threads = 1 if device == "cpu" else None
    start = time.perf_counter()
    counts = worker_loop(sweep.root, WorkerOptions(verbose=False, threads=threads))
    total_s = time.perf_counter() - start
    (log,) = list((sweep.root / "workers").glob("*.jsonl"))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    runs = [e for e in events if e["event"] == "run"]
    warm = runs[1:]  # the first run pays the imports (torch, trainer) and opens the data
    records = [{
        "measure": "fixed_cost_per_run", "runs": len(runs), "outcomes": counts, "sweep_wall_s": total_s,
        "threads": torch.get_num_threads(), "shapes": {"widths": settings["width"], "seq_len": cfg.seq_len,
                                                       "batch": 4, "budgets": cfg.budgets},
        "cold_start_to_first_step_s": runs[0]["start_to_first_step_s"],
        "warm_start_to_first_step": _summary([e["start_to_first_step_s"] for e in warm]),
        "warm_last_step_to_next_first_step": _summary(
            [e["previous_last_step_to_first_step_s"] for e in warm]),
        "last_step_to_return": _summary([e["last_step_to_return_s"] for e in runs]),
        "claim": _summary([e["claim_s"] for e in runs]),
        "record_result": _summary([e["record_s"] for e in runs]),
        "goal_s": 5.0,
    }]
    for e in runs:
        records.append({"measure": "run", **{k: e[k] for k in (
            "folder", "status", "claim_s", "start_to_first_step_s", "previous_last_step_to_first_step_s",
            "last_step_to_return_s", "train_s", "record_s", "trainer_time_to_first_step_s")}})
    return records


def bench_registry(n: int, tmp: Path) -> dict:
    base = to_dict(TrainConfig())
    base["out_dir"] = ""

    def runs():
        for i in range(n):
            train = dict(base, steps=10 + i)
            row = {"name": f"run{i}", "dataset": "ds", "budget": float(10 ** (i % 5)), "hidden": 64}
            yield f"{i:016x}", f"run{i}-{i:08x}", row, train

    root = tmp / "registry"
    start = time.perf_counter()
    sweep = Sweep.create(root, {"name": "synthetic", "n": n}, base, runs())
    create_s = time.perf_counter() - start
    for i in range(0, n, 2):
        (sweep.marks / f"{i:016x}.done").write_text("{}")
    for i in range(1, 16, 2):
        write_atomic(sweep.leases / f"{i:016x}",
                     Lease(f"{i:016x}", "t", "w", "elsewhere", 1, 1, time.time(), time.time()).to_json())
    timings = {}
    for label, fn in [("status_s", lambda: status_text(Sweep(root), 120.0)),
                      ("claim_s", lambda: Sweep(root).claim("bench")),
                      ("list_s", lambda: list_text(Sweep(root), 120.0))]:
        start = time.perf_counter()
        fn()
        timings[label] = time.perf_counter() - start
    return {"measure": "registry", "runs": n, "finished": n // 2, "held": 8, "create_s": create_s, **timings,
            "goal_s": 1.0}


def run(profile: str, device: str) -> list[dict]:
    settings = PROFILES[profile]
    with tempfile.TemporaryDirectory() as tmp:
        records = bench_fixed_cost(settings, device, Path(tmp))
        records.append(bench_registry(settings["registry_runs"], Path(tmp)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    profile = args.profile or ("full" if args.device == "cuda" else "ci")
    records = run(profile, args.device)
    path = write_results(NAME, records, {"profile": profile, "device": args.device})
    summary = records[0]
    print(f"warm run start -> first step: {summary['warm_start_to_first_step']}")
    print(f"last step -> next first step: {summary['warm_last_step_to_next_first_step']}")
    print(f"registry: {records[-1]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
