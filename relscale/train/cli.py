"""``relscale train CONFIG [key=value ...] [--resume] [--threads N]`` (also ``python -m relscale.train``).

CONFIG is a TOML file or the name of a config shipped with relscale (``tiny``, ``small-gpu``).
This command layer, not the trainer, attaches relscale.eval's per-example dump hook when the
config sets ``dump_steps`` (the trainer itself never imports relscale.eval).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relscale.config import TrainConfig
    from relscale.train.loop import OnStep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``relscale train`` arguments to ``parser``."""
    parser.add_argument(
        "config", help="a TOML train config (a path), or the name of a packaged one: tiny, small-gpu",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="config overrides, e.g. model.hidden=128 optim.lr=1e-3 out_dir=runs/x",
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the latest checkpoint in out_dir (a finished run is reported as it is)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch CPU threads per process (torch.set_num_threads); default: torch's choice, usually "
             "one per core. On a shared machine a small N avoids oversubscription",
    )


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None keeps torch's default. Raises ConfigError if < 1."""
    if threads is None:
        return
    from relscale.errors import ConfigError

    if threads < 1:
        raise ConfigError(f"--threads: {threads} must be >= 1")
    import torch

    torch.set_num_threads(threads)


def dump_hook_for(cfg: TrainConfig, world_size: int | None = None) -> OnStep | None:
    """relscale.eval's ``on_step`` hook writing per-example dumps of ``cfg.dump_eval`` at
    ``cfg.dump_steps`` into ``<out_dir>/evals`` (model id ``<run>@step_<step>``), or None when
    ``cfg.dump_steps`` is empty (relscale.eval is then not imported).

    ``world_size``: processes training together (default: $WORLD_SIZE, else 1); with
    micro_batch, grad_accum and seq_len it gives the tokens column of each dump."""
    if not cfg.dump_steps:
        return None
    from pathlib import Path

    from relscale.eval import make_dump_hook
    from relscale.train import run_dir

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    return make_dump_hook(
        cfg.dump_eval, run_dir.evals_dir(cfg.out_dir), cfg.dump_steps, data_path=cfg.data.path,
        run_id=Path(cfg.out_dir).name, seq_len=cfg.data.seq_len,
        tokens_per_step=cfg.micro_batch * cfg.grad_accum * world_size * cfg.data.seq_len,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``relscale train`` as parsed by :func:`add_arguments`; returns the exit status (0)."""
    from relscale.config import load_train_config
    from relscale.train import train

    set_threads(getattr(args, "threads", None))
    cfg = load_train_config(args.config, args.overrides)
    dump = dump_hook_for(cfg)
    result = train(cfg, resume=args.resume, on_step=[dump] if dump is not None else None)
    if int(os.environ.get("RANK", 0)) == 0:
        val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}"
        print(
            f"{result.status}: {result.steps} steps, {result.tokens:,} tokens, train loss "
            f"{result.final_train_loss:.4f}, val loss {val}, {result.wall_s:.1f} s -> {result.model_dir}"
        )
    return 0
