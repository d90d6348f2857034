"""The one command line: ``relscale <prepare|train|grid|sweep|eval|fit|bench|demo>``.

Thin by design: each subcommand's arguments and behaviour live in its room's ``cli.py``
(``add_arguments(parser)`` and ``run(args) -> exit code``); only the chosen room is imported, so
``relscale fit`` never imports torch. User errors (:class:`RelscaleError`) print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, add-arguments function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "prepare": ("relscale.data.cli", "add_arguments", "run", "tokenise a corpus into memory-mapped shards"),
    "train": ("relscale.train.cli", "add_arguments", "run", "train one model from a config"),
    "grid": ("relscale.sweep.cli", "add_grid_arguments", "run_grid", "print an IsoFLOP grid"),
    "sweep": ("relscale.sweep.cli", "add_sweep_arguments", "run_sweep", "run or inspect a sweep directory"),
    "eval": ("relscale.eval.cli", "add_arguments", "run", "write per-example loss dumps"),
    "fit": ("relscale.fit.cli", "add_arguments", "run", "fit IsoFLOP, parametric and relative laws"),
    "bench": ("relscale.bench_cli", "add_arguments", "run", "run the kernel microbenchmarks"),
    "demo": ("relscale.demo", "add_arguments", "run", "the whole study on the embedded default corpus"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relscale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, add, _, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            getattr(importlib.import_module(module), add)(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from relscale.errors import RelscaleError

    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(chosen).parse_args(argv)
    module, _, run, _ = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except RelscaleError as err:
        print(f"relscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's final flush quiet
        return 0
    except KeyboardInterrupt:
        print(f"relscale {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
