"""IsoFLOP grids and a sweep runner for thousands of runs.

    from relscale.sweep import build_grid, get_preset
    runs = build_grid(get_preset("marin"))          # 85 runs per dataset, 3 datasets

    relscale grid --preset tiny
    relscale sweep run sweeps/tiny --preset tiny     # any number of workers may share the directory

Modules: spec (SweepConfig), grid (rules -> runs), presets, layout (the sweep-folder contract
other parts read through: runs, states, results index), registry (writes the sweep directory,
leases), start (create a sweep, check its data), status (text views), executors (workers:
in-process, local GPUs, torchrun, Slurm), results (results.parquet), cli (parsing only).
Names are imported on first use, so `relscale grid` stays light.
"""

import importlib

_EXPORTS = {
    "SweepConfig": "relscale.sweep.spec",
    "load_sweep_config": "relscale.sweep.spec",
    "RunSpec": "relscale.sweep.grid",
    "build_grid": "relscale.sweep.grid",
    "get_preset": "relscale.sweep.presets",
    "preset_for_hardware": "relscale.sweep.presets",
    "Sweep": "relscale.sweep.registry",
    "WorkerOptions": "relscale.sweep.executors",
    "worker_loop": "relscale.sweep.executors",
    "execute": "relscale.sweep.executors",
    "read_index": "relscale.sweep.results",
    "update_index": "relscale.sweep.results",
    "init_sweep": "relscale.sweep.start",
    "check_data": "relscale.sweep.start",
    "sweep_runs": "relscale.sweep.layout",
    "finished_runs": "relscale.sweep.layout",
    "read_results": "relscale.sweep.layout",
    "run_train_config": "relscale.sweep.layout",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'relscale.sweep' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
