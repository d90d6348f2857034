"""``relscale bench``: runs ``bench/run_all.py`` of the source checkout (benchmarks are not part
of the installed package; results go to ``bench/results/`` with their provenance)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from relscale.errors import RelscaleError


def bench_dir() -> Path:
    """The source checkout's ``bench/`` folder; RelscaleError when relscale is installed without it."""
    path = Path(__file__).resolve().parents[1] / "bench"
    if not (path / "run_all.py").is_file():
        raise RelscaleError(f"{path}/run_all.py not found: `relscale bench` needs a source checkout")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``relscale bench`` flags: ``--profile ci|full`` and repeatable ``--only NAME``."""
    parser.add_argument("--profile", choices=("ci", "full"), default=None,
                        help="'full': the GPU shapes (default on a GPU); 'ci': tiny shapes (default on CPU)")
    parser.add_argument("--only", action="append", default=[], help="benchmark name (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Run ``bench/run_all.py`` with the parsed flags in a subprocess; returns its exit status."""
    command = [sys.executable, str(bench_dir() / "run_all.py")]
    if args.profile:
        command += ["--profile", args.profile]
    for name in args.only:
        command += ["--only", name]
    return subprocess.call(command)
