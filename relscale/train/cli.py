"""``relscale train CONFIG [key=value ...] [--resume]`` (also ``python -m relscale.train``)."""

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


def run(args: argparse.Namespace) -> int:
    from relscale.config import load_train_config
    from relscale.train import train

    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}"
        print(
            f"{result.status}: {result.steps} steps, {result.tokens:,} tokens, train loss "
            f"{result.final_train_loss:.4f}, val loss {val}, {result.wall_s:.1f} s -> {result.model_dir}"
        )
    return 0
