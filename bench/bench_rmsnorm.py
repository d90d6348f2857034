"""RMSNorm forward and backward: the Triton kernel against torch eager, torch.compile and Liger-Kernel.

Bytes moved (the op's minimum traffic): forward reads x and writes y (+ the weight); backward reads
x and dy and writes dx (+ reads the weight, writes dweight). The achieved bandwidth is reported
against a device-to-device copy measured in the same run and against the datasheet.
Goals on an H100 (not yet measured): forward >= 85% of the copy bandwidth, backward >= 75%.

Profiles: ``ci`` is tiny bf16 shapes on the CPU through Triton's interpreter (proves the script
runs; torch.compile uses the cheap aot_eager backend there), ``full`` is 16384 tokens x hidden
1024/2048/4096 in bf16 on the GPU.

    python bench/bench_rmsnorm.py [--profile ci|full] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bandwidth_record, copy_bandwidth_gbps, run_from_command_line, time_fn  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on the CPU only through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

NAME = "rmsnorm"
EPS = 1e-6
PROFILES = {
    "ci": {"tokens": 64, "hiddens": [96, 123], "dtype": torch.bfloat16, "compile_backend": "aot_eager",
           "copy_bytes": 1 << 22, "warmup_ms": 1, "rep_ms": 20},
    # quick: the headline shapes of gpu_session.sh --quick, no torch.compile baseline (its cold
    # inductor compile costs more than the whole measurement)
    "quick": {"tokens": 16384, "hiddens": [1024, 4096], "dtype": torch.bfloat16, "compile_backend": None,
              "copy_bytes": 1 << 30, "warmup_ms": 10, "rep_ms": 50},
    "full": {"tokens": 16384, "hiddens": [1024, 2048, 4096], "dtype": torch.bfloat16,
             "compile_backend": "inductor", "copy_bytes": 1 << 30, "warmup_ms": 25, "rep_ms": 100},
}


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The reference of relscale.ops: fp32 math, output in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def _implementations(backend: str | None) -> tuple[dict, dict]:
    """name -> make(weight) returning (forward(x), the weight tensor the graph uses), and
    name -> reason for the baselines that cannot run."""
    from relscale.kernels.rmsnorm import rms_norm

    impls = {
        "triton": lambda w: (lambda x: rms_norm(x, w, EPS), w),
        "torch_eager": lambda w: (lambda x: rms_norm_torch(x, w), w),
    }
    skipped = {}
    if backend is None:
        skipped["torch_compile"] = "not in this profile (a cold inductor compile outlasts the measurement)"
    else:
        compiled = torch.compile(rms_norm_torch, backend=backend, fullgraph=True, dynamic=False)
        impls["torch_compile"] = lambda w: (lambda x: compiled(x, w), w)
    try:
        from liger_kernel.transformers import LigerRMSNorm
    except ImportError as error:
        skipped["liger"] = f"liger_kernel not importable ({error})"
    else:

        def make_liger(w):
            module = LigerRMSNorm(w.shape[0], eps=EPS).to(w.device, w.dtype)  # Llama casting: fp32 math
            with torch.no_grad():
                module.weight.copy_(w)
            return module, module.weight

        impls["liger"] = make_liger
    return impls, skipped


def run(profile: str, device: str) -> list[dict]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    cfg = PROFILES[profile]
    copy_gbps = copy_bandwidth_gbps(device, cfg["copy_bytes"])
    impls, skipped = _implementations(cfg["compile_backend"])
    dtype, tokens = cfg["dtype"], cfg["tokens"]
    esize = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)
    records = []
    for hidden in cfg["hiddens"]:
        x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
        weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
        dy = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
        bytes_by_direction = {
            "fwd": 2 * x.numel() * esize + hidden * esize,
            "bwd": 3 * x.numel() * esize + 2 * hidden * esize,
        }
        for impl, make in impls.items():
            try:
                forward, w = make(weight)
                y = forward(x)  # graph built once; the backward is replayed (no .grad writes)
            except Exception as error:  # a baseline that breaks on this shape/version is recorded
                records.append({"op": "rmsnorm", "impl": impl, "hidden": hidden, "skipped": repr(error)})
                continue

            def fwd(forward=forward, x=x):
                with torch.no_grad():
                    return forward(x)

            def bwd(y=y, x=x, w=w, dy=dy):
                return torch.autograd.grad(y, (x, w), dy, retain_graph=True)

            for direction, fn in (("fwd", fwd), ("bwd", bwd)):
                timing = time_fn(fn, warmup=cfg["warmup_ms"], rep=cfg["rep_ms"])
                record = {"op": "rmsnorm", "direction": direction, "impl": impl, "tokens": tokens,
                          "hidden": hidden, "dtype": str(dtype), **timing}
                if impl == "torch_compile":
                    record["compile_backend"] = cfg["compile_backend"]
                nbytes = bytes_by_direction[direction]
                record.update(bandwidth_record(nbytes, timing["median_ms"], copy_gbps, device))
                record["copy_gbps"] = copy_gbps
                records.append(record)
    records += [{"op": "rmsnorm", "impl": impl, "skipped": reason} for impl, reason in skipped.items()]
    return records


def main() -> None:
    records, path = run_from_command_line(NAME, run, __doc__, PROFILES)
    for r in records:
        if "skipped" in r:
            print(f"{r['impl']}: skipped ({r['skipped']})")
            continue
        print(f"{r['direction']} {r['impl']:13s} hidden={r['hidden']:5d} {r['median_ms']:8.3f} ms "
              f"{r['gbps']:8.1f} GB/s {r['pct_of_copy']:5.1f}% of copy")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
