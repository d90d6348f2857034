"""Benchmark harness shared by every bench/bench_*.py script: timing, device limits, provenance, output.

Timing uses triton.testing.do_bench on CUDA (it flushes L2 and synchronises for us) and a plain
perf_counter loop on the CPU, where the benchmarks only run at tiny shapes to prove they work.
Results are JSON files under bench/results/, one per script run, never overwritten.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Datasheet peaks (SXM parts). Bandwidth in GB/s (1e9 bytes/s), dense bf16 tensor-core TFLOP/s.
DATASHEET_BANDWIDTH_GBPS = {"H100": 3350.0, "H200": 4800.0}
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def _lookup(table: dict[str, float], device_name: str) -> float | None:
    # H200 names contain no "H100", but check the longer/more specific keys first anyway.
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return table[key]
    return None


def datasheet_bandwidth(device_name: str) -> float | None:
    """Datasheet memory bandwidth in GB/s for a device name like 'NVIDIA H100 80GB HBM3', else None."""
    return _lookup(DATASHEET_BANDWIDTH_GBPS, device_name)


def datasheet_bf16_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s for a device name, else None."""
    return _lookup(DATASHEET_BF16_TFLOPS, device_name)


def device_name(device: str | torch.device = "cuda") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(device: str | torch.device = "cuda") -> str:
    """Short file-name-safe device tag, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu'."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_commit() -> str | None:
    """The working tree's commit, with '-dirty' when there are uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH_DIR, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def provenance(device: str | torch.device | None = None) -> dict:
    """Where and with what a measurement was taken."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def time_fn(fn: Callable[[], object], *, warmup: float = 25, rep: float = 100) -> dict:
    """Median / 20th / 80th percentile wall time of fn() in milliseconds.

    warmup and rep are budgets in milliseconds, as in triton.testing.do_bench. On CUDA do_bench is
    used (it clears L2 between calls); on the CPU a perf_counter loop with at least 3 timed calls.
    """
    if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") == "1":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80)}
    start = time.perf_counter()
    fn()  # at least one warm-up call: compiles, allocates
    while (time.perf_counter() - start) * 1e3 < warmup:
        fn()
    times_ms: list[float] = []
    start = time.perf_counter()
    while len(times_ms) < 3 or (time.perf_counter() - start) * 1e3 < rep:
        t0 = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - t0) * 1e3)
    quantiles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return {"median_ms": statistics.median(times_ms), "p20_ms": quantiles[1], "p80_ms": quantiles[7]}


def copy_bandwidth_gbps(device: str | torch.device = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    n = max(nbytes // 4, 1)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src))
    return 2 * n * 4 / (timing["median_ms"] * 1e-3) / 1e9


def matmul_tflops(
    device: str | torch.device = "cuda", n: int = 8192, dtype: torch.dtype = torch.bfloat16
) -> float:
    """Measured dense matmul rate in TFLOP/s: an n x n x n product of random normal inputs (never
    zeros: they run faster than real data), 2 n^3 FLOPs per product, median time. The ceiling that
    MFU is reported against (the datasheet's 989 TFLOP/s is not reached by cuBLAS on an H200: ~790)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else None
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    timing = time_fn(lambda: torch.mm(a, b))
    return 2 * n**3 / (timing["median_ms"] * 1e-3) / 1e12


def write_results(
    name: str, records: list[dict], meta: dict | None = None, out_dir: str | Path | None = None
) -> Path:
    """Atomically write <out_dir>/<name>-<device-slug>-<UTC timestamp>.json; never overwrite a file.

    The file holds {"name", "provenance", "meta", "records"}. out_dir defaults to bench/results/.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"benchmark name {name!r} must be letters, digits, '_', '.', '-' only")
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    prov = provenance(meta.get("device"))  # meta["device"]: the device the records were measured on
    slug = device_slug("cuda" if prov["device_type"] == "cuda" else "cpu")
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = {"name": name, "provenance": prov, "meta": meta, "records": records}
    text = json.dumps(payload, indent=2, sort_keys=False, default=str, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".json.tmp", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    # os.link fails when the target exists, so a finished result is never replaced.
    for attempt in range(1000):
        suffix = "" if attempt == 0 else f"-{attempt}"
        path = out_dir / f"{name}-{slug}-{stamp}{suffix}.json"
        try:
            os.link(tmp, path)
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links: fall back to an existence check
            if path.exists():
                continue
            os.replace(tmp, path)
            break
        os.unlink(tmp)
        break
    else:
        os.unlink(tmp)
        raise RuntimeError(f"could not find a free result file name for {name} in {out_dir}")
    return path


def bandwidth_record(nbytes: float, median_ms: float, copy_gbps: float | None, device: str) -> dict:
    """Achieved GB/s and its fraction of the measured copy bandwidth and of the datasheet."""
    gbps = nbytes / (median_ms * 1e-3) / 1e9
    peak = datasheet_bandwidth(device_name(device)) if torch.device(device).type == "cuda" else None
    return {
        "bytes": int(nbytes),
        "gbps": gbps,
        "pct_of_copy": 100 * gbps / copy_gbps if copy_gbps else None,
        "pct_of_datasheet": 100 * gbps / peak if peak else None,
    }


def flops_record(flops: float, median_ms: float, device: str) -> dict:
    """Achieved TFLOP/s and its fraction of the datasheet dense bf16 peak."""
    tflops = flops / (median_ms * 1e-3) / 1e12
    peak = datasheet_bf16_tflops(device_name(device)) if torch.device(device).type == "cuda" else None
    pct = 100 * tflops / peak if peak else None
    return {"flops": float(flops), "tflops": tflops, "pct_of_datasheet_bf16": pct}


if __name__ == "__main__":  # quick look at this machine's limits
    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(provenance(dev), indent=2))
    print(f"copy bandwidth: {copy_bandwidth_gbps(dev, 1 << 26 if dev == 'cpu' else 1 << 30):.1f} GB/s")


def run_from_command_line(name: str, run: Callable[[str, str], list[dict]], doc: str | None,
                          profiles: object) -> tuple[list[dict], Path]:
    """The ``__main__`` of a kernel benchmark script: ``--profile`` (default ``ci``) and
    ``--device`` (default: CUDA when present), then ``run`` and :func:`write_results`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(profiles), default="ci")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: bench/results/")
    args = parser.parse_args()
    records = run(args.profile, args.device)
    meta = {"profile": args.profile, "device": args.device}
    return records, write_results(name, records, meta=meta, out_dir=args.out_dir)
