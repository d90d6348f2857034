"""``relscale train CONFIG [key=value ...] [--resume] [--threads N]`` (also ``python -m relscale.train``)."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a TOML train config, e.g. configs/tiny.toml")
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


def run(args: argparse.Namespace) -> int:
    from relscale.config import load_train_config
    from relscale.train import train

    set_threads(getattr(args, "threads", None))
    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}"
        print(
            f"{result.status}: {result.steps} steps, {result.tokens:,} tokens, train loss "
            f"{result.final_train_loss:.4f}, val loss {val}, {result.wall_s:.1f} s -> {result.model_dir}"
        )
    return 0
