"""One training step of the relscale model on one GPU: tokens/s and MFU.

A step is forward + backward + fused AdamW under bf16 autocast with fp32 parameters (what the trainer
does without FSDP), every op on its ``auto`` backend (Triton kernels, the CUDA extension). Shapes:
hidden 512 and 1024 at sequence 4096 with the Llama-3 vocabulary (128256), head dim 128, depth
hidden / 64, on a micro-batch of ``batch`` sequences (halved on out-of-memory until it fits).

    python bench/bench_train_step.py --profile quick   # GPU: d=512 and d=1024, ~1 min
    python bench/bench_train_step.py --profile ci      # CPU: a tiny model, proves the script runs

MFU = (training FLOPs per step / step time) / the bf16 matmul rate measured in the same run
(``harness.matmul_tflops``); FLOPs per token follow ``relscale.counting.flops_per_token_train``
(6 N_matmul + 6 L s h d_head, causal attention counted once). The datasheet ratio is recorded too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import datasheet_bf16_tflops, device_name, matmul_tflops, run_from_command_line  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on the CPU only through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

NAME = "train_step"
_LLAMA3_VOCAB = 128256
PROFILES = {
    "ci": {"shapes": [{"hidden": 64, "vocab": 512, "seq": 64, "batch": 2, "head_dim": 32}],
           "warmup": 1, "steps": 2, "matmul_n": 256},
    "quick": {"shapes": [{"hidden": h, "vocab": _LLAMA3_VOCAB, "seq": 4096, "batch": 8, "head_dim": 128}
                         for h in (512, 1024)],
              "warmup": 3, "steps": 10, "matmul_n": 8192},
    "full": {"shapes": [{"hidden": h, "vocab": _LLAMA3_VOCAB, "seq": 4096, "batch": 8, "head_dim": 128}
                        for h in (512, 1024)],
             "warmup": 5, "steps": 30, "matmul_n": 8192},
}


def _model_config(shape: dict):
    from relscale.config import ModelConfig

    hidden, head_dim = shape["hidden"], shape["head_dim"]
    return ModelConfig(vocab_size=shape["vocab"], hidden=hidden, layers=max(1, hidden // 64),
                       heads=hidden // head_dim, max_seq_len=shape["seq"])


def _time_steps(model, optimizer, batch: int, seq: int, vocab: int, device: str, warmup: int,
                steps: int) -> float:
    """Seconds per step (median-free: total over ``steps`` timed steps after ``warmup``)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    on_gpu = torch.device(device).type == "cuda"
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def step():
        with amp:
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        seconds = time.perf_counter() - t0
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"non-finite loss {loss.item()} in the timed steps")
    return seconds / steps


def _one_shape(shape: dict, cfg: dict, device: str, ceiling_tflops: float) -> dict:
    from relscale.counting import flops_per_token_train
    from relscale.model import Transformer

    model_cfg = _model_config(shape)
    record = {"hidden": shape["hidden"], "layers": model_cfg.layers, "heads": model_cfg.heads,
              "head_dim": shape["head_dim"], "vocab": shape["vocab"], "seq": shape["seq"],
              "precision": "bf16 autocast, fp32 params, fused AdamW"}
    batch = shape["batch"]
    while batch >= 1:
        model = optimizer = None
        try:
            model = Transformer(model_cfg).to(device)
            fused = torch.device(device).type == "cuda"
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
            seconds = _time_steps(model, optimizer, batch, shape["seq"], shape["vocab"], device,
                                  cfg["warmup"], cfg["steps"])
            break
        except torch.cuda.OutOfMemoryError:
            record.setdefault("oom_at_batch", []).append(batch)
            del model, optimizer
            torch.cuda.empty_cache()
            batch //= 2
    else:
        return {**record, "status": "skipped", "reason": "out of memory even at batch 1"}
    tokens = batch * shape["seq"]
    flops = float(flops_per_token_train(model_cfg, shape["seq"])) * tokens
    tflops = flops / seconds / 1e12
    peak = datasheet_bf16_tflops(device_name(device)) if torch.device(device).type == "cuda" else None
    if torch.device(device).type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model, optimizer
    return {**record, "status": "ok", "batch": batch, "tokens_per_step": tokens,
            "median_ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "tflops": tflops,
            "matmul_ceiling_tflops": ceiling_tflops, "mfu_vs_matmul_pct": 100 * tflops / ceiling_tflops,
            "mfu_vs_datasheet_pct": 100 * tflops / peak if peak else None}


def run(profile: str, device: str) -> list[dict]:
    """One record per model shape; raises ValueError for an unknown profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    cfg = PROFILES[profile]
    ceiling = matmul_tflops(device, cfg["matmul_n"], torch.bfloat16)
    return [_one_shape(shape, cfg, device, ceiling) for shape in cfg["shapes"]]


if __name__ == "__main__":
    records, path = run_from_command_line(NAME, run, __doc__, PROFILES)
    for r in records:
        print(r)
    print(f"wrote {path}")
