"""RoPE (q and k together) and SwiGLU, forward and backward: relscale._C against torch.

Three implementations per op and direction: the extension's kernels (``relscale.ext``), the torch
reference in eager mode and the same reference under torch.compile. Every row reports the
achieved bandwidth for the op's minimum traffic (each input read once, each output written once)
as a percentage of the measured device copy bandwidth; the extension's goal is >= 85%.

Profiles: ``ci`` is tiny fp32 shapes on the CPU (proves the script runs; torch.compile uses the
cheap aot_eager backend there), ``full`` is 16384 tokens x hidden 1024/2048/4096 in bf16 on the GPU
(heads of 128, kv_heads = heads as in the default ModelConfig, SwiGLU width 4 x hidden).

    python bench/bench_elementwise.py [--profile ci|full] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bandwidth_record, copy_bandwidth_gbps, run_from_command_line, time_fn  # noqa: E402

from relscale import ext, ops  # noqa: E402

NAME = "elementwise"
HEAD_DIM = 128
THETA = 10000.0
DOC_LEN = 2048  # packed documents: positions restart every DOC_LEN tokens
PROFILES = {
    "ci": {"tokens": 64, "hiddens": [256], "dtype": torch.float32, "compile_backend": "aot_eager",
           "copy_bytes": 1 << 24},
    "full": {"tokens": 16384, "hiddens": [1024, 2048, 4096], "dtype": torch.bfloat16,
             "compile_backend": "inductor", "copy_bytes": 1 << 30},
}


def rope_torch(q, k, cos, sin):
    """Hugging Face-style rotate-half RoPE with a cached fp32 cos/sin table of shape (T, 1, D)."""

    def rotate(x):
        xf = x.float()
        half = x.shape[-1] // 2
        return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), dim=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu_torch(gate, up):
    return F.silu(gate) * up


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, 1, D) for the torch baselines, float64 angles rounded to fp32."""
    angles = positions.double()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos().float(), angles.sin().float()


def backward_fn(forward: Callable, inputs: tuple, grads: tuple) -> Callable[[], object]:
    """Times only the backward: the graph is built once and replayed (autograd.grad, no .grad writes)."""
    outputs = forward(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def _bench_cases(tokens: int, hidden: int, dtype: torch.dtype, device: str, backend: str):
    """(op, direction, implementation, callable, bytes moved, shape info) for one hidden size."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    heads = hidden // HEAD_DIM if hidden >= HEAD_DIM else 1
    esize = torch.finfo(dtype).bits // 8

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    # RoPE on q (T, H, 128) and k (T, H, 128)
    q, k = randn(tokens, heads, HEAD_DIM, grad=True), randn(tokens, heads, HEAD_DIM, grad=True)
    grad_q, grad_k = randn(tokens, heads, HEAD_DIM), randn(tokens, heads, HEAD_DIM)
    positions = (torch.arange(tokens) % DOC_LEN).to(device)
    inv_freq = ops.rope_inv_freq(HEAD_DIM, THETA, device=positions.device)
    cos, sin = rope_tables(positions, inv_freq)
    rope_bytes = 2 * (q.numel() + k.numel()) * esize + positions.numel() * 8
    rope_info = {"tokens": tokens, "hidden": hidden, "heads": heads, "kv_heads": heads, "head_dim": HEAD_DIM}
    rope_compiled = torch.compile(rope_torch, backend=backend, fullgraph=True, dynamic=False)
    cases = []
    for impl, fn in (("torch_eager", rope_torch), ("torch_compile", rope_compiled)):
        forward = lambda a, b, fn=fn: fn(a, b, cos, sin)
        cases += [
            ("rope", "fwd", impl, lambda forward=forward: forward(q, k), rope_bytes, rope_info),
            ("rope", "bwd", impl, backward_fn(forward, (q, k), (grad_q, grad_k)), rope_bytes, rope_info),
        ]

    # SwiGLU on (T, 4 * hidden)
    width = 4 * hidden
    gate, up = randn(tokens, width, grad=True), randn(tokens, width, grad=True)
    grad_out = randn(tokens, width)
    fwd_bytes, bwd_bytes = 3 * gate.numel() * esize, 5 * gate.numel() * esize
    swiglu_info = {"tokens": tokens, "hidden": hidden, "width": width}
    swiglu_compiled = torch.compile(swiglu_torch, backend=backend, fullgraph=True, dynamic=False)
    for impl, fn in (("torch_eager", swiglu_torch), ("torch_compile", swiglu_compiled)):
        cases += [
            ("swiglu", "fwd", impl, lambda fn=fn: fn(gate, up), fwd_bytes, swiglu_info),
            ("swiglu", "bwd", impl, backward_fn(fn, (gate, up), (grad_out,)), bwd_bytes, swiglu_info),
        ]

    if ext.available() and (torch.device(device).type == "cpu" or ext.has_cuda_kernels()):
        qd, kd, gd, ud = q.detach(), k.detach(), gate.detach(), up.detach()
        cases += [
            ("rope", "fwd", "relscale_ext", lambda: ext.rope(qd, kd, positions, inv_freq),
             rope_bytes, rope_info),
            ("rope", "bwd", "relscale_ext", lambda: ext.rope_backward(grad_q, grad_k, positions, inv_freq),
             rope_bytes, rope_info),
            ("swiglu", "fwd", "relscale_ext", lambda: ext.swiglu(gd, ud), fwd_bytes, swiglu_info),
            ("swiglu", "bwd", "relscale_ext", lambda: ext.swiglu_backward(grad_out, gd, ud), bwd_bytes,
             swiglu_info),
        ]
    return cases


def run(profile: str, device: str) -> list[dict]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    settings = PROFILES[profile]
    copy_gbps = copy_bandwidth_gbps(device, settings["copy_bytes"])
    records = []
    for hidden in settings["hiddens"]:
        cases = _bench_cases(
            settings["tokens"], hidden, settings["dtype"], device, settings["compile_backend"]
        )
        for op, direction, impl, fn, nbytes, info in cases:
            timing = time_fn(fn)
            record = {"op": op, "direction": direction, "impl": impl, **info, "dtype": str(settings["dtype"])}
            if impl == "torch_compile":
                record["compile_backend"] = settings["compile_backend"]
            record.update(timing)
            record.update(bandwidth_record(nbytes, timing["median_ms"], copy_gbps, device))
            record["copy_gbps"] = copy_gbps
            records.append(record)
    if not any(r["impl"] == "relscale_ext" for r in records):
        reason = "relscale._C (with kernels for this device) not available"
        records.append({"impl": "relscale_ext", "skipped": reason})
    return records


def main() -> None:
    records, path = run_from_command_line(NAME, run, __doc__, PROFILES)
    for r in records:
        if "skipped" in r:
            print(f"{r['impl']}: skipped ({r['skipped']})")
            continue
        print(
            f"{r['op']:6s} {r['direction']} {r['impl']:13s} hidden={r['hidden']:5d} "
            f"{r['median_ms']:8.3f} ms {r['gbps']:8.1f} GB/s {r['pct_of_copy']:5.1f}% of copy"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
