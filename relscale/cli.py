"""The one command line: ``relscale <prepare|train|grid|sweep|eval|fit|bench|demo>``.

Thin by design: each subcommand's arguments and behaviour live in its room's ``cli.py``
(``add_arguments(parser)`` and ``run(args) -> exit code``); only the chosen room is imported, so
``relscale fit`` never imports torch.

Errors: a problem with the user's input -- a :class:`RelscaleError`, a bad flag, or (as a last
resort, for errors the rooms did not catch where they read the file) a file that is missing,
unreadable, undecodable or of the wrong shape -- prints ONE line naming the file, key or flag and
exits with status 2; a full disk prints "no space left on device: PATH" (status 2). Any other
exception is a bug and keeps its traceback. ``--debug`` (anywhere on the line, or
``RELSCALE_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import sysconfig
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

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
DEBUG_FLAG = "--debug"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the flag and the problem), exit status 2 as argparse's."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """The ``relscale`` argument parser; only the ``chosen`` subcommand's flags are added (its
    module is imported lazily, so ``relscale fit`` never imports torch)."""
    parser = _Parser(prog="relscale", description=__doc__.split("\n\n")[0])
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, add, _, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            getattr(importlib.import_module(module), add)(command_parser)
    return parser


# ------------------------------------------------------------------------ last-resort input errors

_PATH_LOCALS = ("path", "file", "filename", "file_path", "config_path", "source", "data_dir", "root",
                "index", "manifest", "model_dir", "sweep_dir", "checkpoint")


def _input_error_types() -> tuple[type[BaseException], ...]:
    """Exception types raised while *decoding* a user's file (imported only when loaded already)."""
    import tomllib

    types: list[type[BaseException]] = [json.JSONDecodeError, UnicodeDecodeError, tomllib.TOMLDecodeError]
    if "pandas" in sys.modules:
        import pandas.errors

        types += [pandas.errors.EmptyDataError, pandas.errors.ParserError]
    if "pyarrow" in sys.modules:
        import pyarrow

        types += [pyarrow.ArrowInvalid]
    if "safetensors" in sys.modules:
        try:
            from safetensors import SafetensorError

            types.append(SafetensorError)
        except ImportError:
            pass
    return tuple(types)


def _is_project_code(frame: FrameType) -> bool:
    """relscale's own frames (also plugged-in code), not the standard library's or a package's."""
    if str(frame.f_globals.get("__name__", "")).startswith("relscale"):
        return True
    filename = frame.f_code.co_filename
    stdlib = sysconfig.get_paths()["stdlib"]
    return not (filename.startswith("<") or filename.startswith(stdlib) or "site-packages" in filename
                or "dist-packages" in filename)


def _named_file(tb: TracebackType | None) -> str | None:
    """The file being read where the error arose: the innermost project frame's path-like local."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        if not _is_project_code(frame):
            continue
        local = frame.f_locals
        for name in _PATH_LOCALS:
            value = local.get(name)
            if isinstance(value, (str, Path)) and str(value) and len(str(value)) < 4096:
                return str(value)
        for value in local.values():  # else any existing file or folder the frame holds
            if isinstance(value, Path) or (isinstance(value, str) and os.sep in value and len(value) < 4096):
                if os.path.exists(value):
                    return str(value)
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def input_error_message(err: BaseException) -> str | None:
    """One line for an exception that comes from a bad input file or a full disk, else None.

    OSError with a file name (missing, unreadable, a folder, already there, no space), decoding
    errors (JSON, TOML, UTF-8, CSV, Parquet, safetensors) and a checkpoint whose tensor shapes do
    not fit the model ("size mismatch"). KeyError, IndexError and other errors are bugs unless a
    decoding error caused them."""
    if isinstance(err, OSError):
        target = err.filename or _named_file(err.__traceback__)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = _first_line(err.strerror or str(err))
            if reason.startswith("no space left on device:"):
                return reason
            return f"no space left on device: {target or '(unknown file)'}"
        if err.filename is not None and err.errno is not None:
            other = f" -> {err.filename2}" if err.filename2 else ""
            return f"{err.filename}{other}: {(err.strerror or str(err)).lower()}"
        return None
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    decoding = _input_error_types()
    cause = next((e for e in chain if isinstance(e, decoding)), None)
    if cause is None and isinstance(err, RuntimeError) and (
        "size mismatch" in str(err) or "Error(s) in loading state_dict" in str(err)
    ):
        cause = err
    if cause is None:
        return None
    where = _named_file(err.__traceback__) or _named_file(cause.__traceback__)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    # load_state_dict's first line only says "Error(s) in loading state_dict": show the mismatch
    mismatch = next((line for line in lines if line.startswith(("size mismatch", "Missing key",
                                                                 "Unexpected key"))), None)
    detail = f"{type(cause).__name__}: {mismatch or _first_line(str(cause))}"[:400]
    return f"{where}: unreadable input ({detail})" if where else f"unreadable input ({detail})"


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``relscale ARGV``; returns the exit status (0 ok, 1 failed runs, 2 bad input, 130 ^C)."""
    from relscale.errors import RelscaleError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("RELSCALE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        args = build_parser(chosen).parse_args(argv)
    except SystemExit as exit_:  # --help, or a flag error (already printed as one line)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    module, _, run, _ = COMMANDS[args.command]
    if not debug:
        _warnings_in_words(args.command)
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except RelscaleError as err:
        if debug:
            traceback.print_exc()
        print(f"relscale {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter's final flush quiet
        return 0
    except KeyboardInterrupt:
        print(f"relscale {args.command}: interrupted; finished work is kept", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- input errors the rooms did not catch at the source
        message = input_error_message(err)
        if message is None or debug:
            raise
        print(f"relscale {args.command}: error: {_one_line(message)} (--debug shows the traceback)",
              file=sys.stderr)
        return 2


def _warnings_in_words(command: str) -> None:
    """Print each warning once as ``relscale COMMAND: warning: MESSAGE`` instead of Python's
    ``file:line: Category: message`` plus the source line (``--debug`` keeps Python's format);
    numpy's floating-point RuntimeWarnings ("overflow encountered in exp" while an optimiser
    explores) are not for users and are dropped: the fits flag results that are not finite."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        print(f"relscale {command}: warning: {_one_line(str(message))}", file=file or sys.stderr)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", message=r".*encountered in ", category=RuntimeWarning)


def _one_line(message: str) -> str:
    """Error messages are one line: join any further lines (details of a nested error) with ' | '."""
    return " | ".join(line.strip() for line in message.strip().splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
