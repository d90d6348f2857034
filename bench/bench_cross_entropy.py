"""Cross-entropy and fused linear + cross-entropy, forward + backward together.

cross_entropy (op "cross_entropy"): the Triton kernel against the relscale.ops torch reference (fp32
upcast, as the model's torch backend runs it) in eager mode and under torch.compile, and Liger-Kernel.
Bandwidth is counted against the "two-pass floor": read the logits once and write the gradient
once (2 * N * V * element size); goal on an H100 (not yet measured): >= 80% of the copy bandwidth.

fused linear cross-entropy (op "linear_cross_entropy"): ours against logits = hidden @ weight.T then
the torch reference (eager and compiled), our unfused pair (matmul + our cross-entropy kernel) and
Liger's fused loss. Reported: time, TFLOP/s for 6 N H V flops (forward matmul plus the two
gradient matmuls), and the peak extra memory (torch.cuda.max_memory_allocated during one forward +
backward minus the memory held before it; the N x V logits alone are listed for scale). Goals (not
yet measured): peak extra memory bounded by one chunk, time <= the compiled torch pair, faster
than Liger.

Profiles: ``ci`` is tiny odd shapes on the CPU through Triton's interpreter (proves the script
runs; torch.compile uses aot_eager there); ``full`` is bf16 on the GPU: cross-entropy at vocab
32000 / 50304 (16384 tokens) and 128256 (8192 tokens); fused at hidden 1024 / 2048 with the same
vocabularies and 8192 tokens.

    python bench/bench_cross_entropy.py [--profile ci|full] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bandwidth_record, copy_bandwidth_gbps, flops_record, run_from_command_line, time_fn  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on the CPU only through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

NAME = "cross_entropy"
PROFILES = {
    "ci": {
        "ce": [(48, 257), (16, 1031)], "flce": [(48, 32, 257)], "dtype": torch.bfloat16,
        "compile_backend": "aot_eager", "copy_bytes": 1 << 22, "warmup_ms": 1, "rep_ms": 20,
    },
    # quick: the Llama-3 vocabulary only, no torch.compile baseline (cold inductor compiles)
    "quick": {
        "ce": [(8192, 128256)], "flce": [(8192, 1024, 128256)], "dtype": torch.bfloat16,
        "compile_backend": None, "copy_bytes": 1 << 30, "warmup_ms": 10, "rep_ms": 100,
    },
    "full": {
        "ce": [(16384, 32000), (16384, 50304), (8192, 128256)],
        "flce": [(8192, h, v) for h in (1024, 2048) for v in (32000, 50304, 128256)],
        "dtype": torch.bfloat16, "compile_backend": "inductor", "copy_bytes": 1 << 30,
        "warmup_ms": 25, "rep_ms": 200,
    },
}


def ce_torch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from relscale.ops import cross_entropy_reference

    return cross_entropy_reference(logits, targets)


def linear_ce_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ce_torch(hidden @ weight.t(), targets)


def _liger():
    """(LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss) or the reason they are unavailable."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        return None, f"liger_kernel not importable ({error})"
    return (LigerCrossEntropyLoss(), LigerFusedLinearCrossEntropyLoss()), None


def _peak_extra_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory above what was allocated before one call of fn (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _targets(n: int, vocab: int, device: str, gen: torch.Generator) -> torch.Tensor:
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::50] = -100  # a few ignored positions, as at document ends
    return targets.to(device)


def _cross_entropy_records(cfg: dict, device: str, copy_gbps: float, liger, liger_reason) -> list[dict]:
    from relscale.kernels.cross_entropy import cross_entropy

    dtype, esize = cfg["dtype"], torch.finfo(cfg["dtype"]).bits // 8
    impls = {"triton": cross_entropy, "torch_eager": ce_torch}
    if cfg["compile_backend"] is not None:
        impls["torch_compile"] = torch.compile(
            ce_torch, backend=cfg["compile_backend"], fullgraph=True, dynamic=False
        )
    if liger is not None:
        impls["liger"] = liger[0]
    gen = torch.Generator().manual_seed(0)
    records = []
    for n, vocab in cfg["ce"]:
        logits = torch.randn(n, vocab, generator=gen).to(device, dtype)
        targets = _targets(n, vocab, device, gen)
        floor_bytes = 2 * n * vocab * esize  # read the logits once, write the gradient once
        for impl, loss_fn in impls.items():
            x = logits.clone().requires_grad_()  # Liger writes its gradient into the logits

            def step(loss_fn=loss_fn, x=x, targets=targets):
                x.grad = None
                loss_fn(x, targets).backward()

            info = {"op": "cross_entropy", "direction": "fwd+bwd", "impl": impl, "tokens": n, "vocab": vocab,
                    "dtype": str(dtype)}
            try:
                step()
            except Exception as error:
                records.append({**info, "skipped": repr(error)})
                continue
            timing = time_fn(step, warmup=cfg["warmup_ms"], rep=cfg["rep_ms"])
            achieved = bandwidth_record(floor_bytes, timing["median_ms"], copy_gbps, device)
            record = {**info, **timing, **achieved}
            record["copy_gbps"] = copy_gbps
            x.grad = None  # so the memory held before the measured call is the inputs only
            record["peak_extra_bytes"] = _peak_extra_bytes(step, device)
            if impl == "torch_compile":
                record["compile_backend"] = cfg["compile_backend"]
            records.append(record)
    if liger is None:
        records.append({"op": "cross_entropy", "impl": "liger", "skipped": liger_reason})
    return records


def _linear_cross_entropy_records(cfg: dict, device: str, liger, liger_reason) -> list[dict]:
    from relscale.kernels.cross_entropy import cross_entropy
    from relscale.kernels.fused_linear_ce import default_chunk_rows, linear_cross_entropy, logits_budget_bytes

    dtype, esize = cfg["dtype"], torch.finfo(cfg["dtype"]).bits // 8
    impls = {
        "triton_fused": linear_cross_entropy,
        "triton_unfused": lambda h, w, t: cross_entropy(h @ w.t(), t),
        "torch_eager": linear_ce_torch,
    }
    if cfg["compile_backend"] is not None:
        impls["torch_compile"] = torch.compile(
            linear_ce_torch, backend=cfg["compile_backend"], fullgraph=True, dynamic=False
        )
    if liger is not None:
        impls["liger"] = lambda h, w, t: liger[1](w, h, t)
    gen = torch.Generator().manual_seed(1)
    records = []
    for n, hidden_size, vocab in cfg["flce"]:
        hidden = torch.randn(n, hidden_size, generator=gen).to(device, dtype).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device, dtype)
        weight.requires_grad_()
        targets = _targets(n, vocab, device, gen)
        chunk = default_chunk_rows(n, vocab, esize, logits_budget_bytes(torch.device(device)))
        for impl, loss_fn in impls.items():

            def step(loss_fn=loss_fn, hidden=hidden, weight=weight, targets=targets):
                hidden.grad = weight.grad = None
                loss_fn(hidden, weight, targets).backward()

            info = {"op": "linear_cross_entropy", "direction": "fwd+bwd", "impl": impl, "tokens": n,
                    "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype),
                    "logits_bytes": n * vocab * esize}
            if impl == "triton_fused":
                info.update(chunk_rows=chunk, chunk_logits_bytes=chunk * vocab * esize)
            try:
                step()
            except Exception as error:
                records.append({**info, "skipped": repr(error)})
                continue
            timing = time_fn(step, warmup=cfg["warmup_ms"], rep=cfg["rep_ms"])
            achieved = flops_record(6 * n * hidden_size * vocab, timing["median_ms"], device)
            record = {**info, **timing, **achieved}
            hidden.grad = weight.grad = None  # so the memory held before is the inputs only
            record["peak_extra_bytes"] = _peak_extra_bytes(step, device)
            if impl == "torch_compile":
                record["compile_backend"] = cfg["compile_backend"]
            records.append(record)
    if liger is None:
        records.append({"op": "linear_cross_entropy", "impl": "liger", "skipped": liger_reason})
    return records


def run(profile: str, device: str) -> list[dict]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    cfg = PROFILES[profile]
    copy_gbps = copy_bandwidth_gbps(device, cfg["copy_bytes"])
    liger, liger_reason = _liger()
    records = _cross_entropy_records(cfg, device, copy_gbps, liger, liger_reason)
    return records + _linear_cross_entropy_records(cfg, device, liger, liger_reason)


def main() -> None:
    records, path = run_from_command_line(NAME, run, __doc__, PROFILES)
    for r in records:
        if "skipped" in r:
            print(f"{r['op']} {r['impl']}: skipped ({r['skipped']})")
        elif r["op"] == "cross_entropy":
            print(f"ce   {r['impl']:14s} N={r['tokens']:5d} V={r['vocab']:6d} {r['median_ms']:8.3f} ms "
                  f"{r['gbps']:8.1f} GB/s {r['pct_of_copy']:5.1f}% of copy (two-pass floor)")
        else:
            peak = r["peak_extra_bytes"]
            peak_text = f"{peak / 2**20:9.1f} MiB extra" if peak is not None else "peak n/a"
            print(f"flce {r['impl']:14s} N={r['tokens']:5d} H={r['hidden']:5d} V={r['vocab']:6d} "
                  f"{r['median_ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s {peak_text}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
