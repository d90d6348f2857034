"""Starting a sweep: load its config, create (or reopen) the sweep directory, and check that
every dataset is prepared before any worker starts."""

from __future__ import annotations

from pathlib import Path

from relscale.errors import ConfigError, DataError
from relscale.sweep.registry import Sweep
from relscale.sweep.spec import SweepConfig


def load_config(config: str | Path | None, preset: str | None) -> SweepConfig | None:
    """The sweep config of a TOML file or of a named preset (relscale.sweep.presets); None when
    neither is given. ConfigError when both are given, or (from the loaders) naming a bad key."""
    from relscale.sweep.presets import get_preset
    from relscale.sweep.spec import load_sweep_config

    if config and preset:
        raise ConfigError("give a sweep config file or --preset, not both")
    if preset:
        return get_preset(preset)
    if config:
        return load_sweep_config(config)
    return None


def init_sweep(sweep_dir: str | Path, cfg: SweepConfig) -> Sweep:
    """Create (or reopen, if it holds the same config) a sweep directory for ``cfg``.

    The grid is built (relscale.sweep.grid.build_grid, which may read each dataset's vocabulary
    from its prepared folder) only when the directory is new. Raises ConfigError naming the keys
    that differ when the directory holds another config, and when the grid has no runs."""
    from relscale.config import to_dict
    from relscale.sweep.grid import build_grid
    from relscale.sweep.spec import sweep_config_to_dict

    config = sweep_config_to_dict(cfg)
    sweep = Sweep(sweep_dir)
    if sweep.exists():  # compare before building the grid, which may need the prepared data
        sweep.check_same_config(config)
        return sweep
    runs = build_grid(cfg)
    if not runs:
        raise ConfigError("the sweep config gives no runs (every grid point was dropped); "
                          "see `relscale grid CONFIG --dropped`")
    base = to_dict(cfg.train)
    base["out_dir"] = ""
    return Sweep.create(sweep_dir, config, base,
                        ((r.run_id, r.folder, r.row(), to_dict(r.train)) for r in runs))


def check_data(sweep: Sweep) -> None:
    """Every dataset of the sweep must be prepared before workers start (else each run fails).

    Opens each distinct data path once (relscale.data.PreparedData: manifest and file sizes);
    raises DataError naming the dataset, the path and the `relscale prepare` command to run."""
    from relscale.data import PreparedData

    paths = sorted({r.row.get("dataset"): sweep.train_config(r, "").data.path
                    for r in sweep.records}.items())
    for name, path in paths:
        try:
            PreparedData(path)
        except DataError as err:
            source = "" if name == "sotu" else "SOURCE "
            raise DataError(f"dataset {name!r}: no prepared data at {path} ({err}); prepare it with "
                            f"`relscale prepare {source}--out {path}`") from None
