"""Eval-room throughput: examples/s and tokens/s of per-example scoring (`relscale eval`), next to
the forward-pass tokens/s of training the same model.

Workloads (synthetic token ids, so no tokenizer or data is needed):
* ``text``: documents of 0.2x to 3x the context, sliding windows with stride context/2;
* ``mc``: 4-choice questions, a ~context/8-token prompt and 1-8 token choices, one request each.
Scoring is timed end to end (window planning, packing, host-to-device copies, forward passes,
per-example sums; the result is on the host when the clock stops). The training baseline is
one forward pass of a packed (B, S) batch with autograd on, as the trainer runs it, in the same
dtype. The goal on a GPU is eval tokens/s >= 70% of that forward-pass figure.

    python bench/bench_eval.py [--profile ci|full] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import time_fn, write_results  # noqa: E402

from relscale.config import ModelConfig  # noqa: E402
from relscale.eval.packing import Request  # noqa: E402
from relscale.eval.scoring import ScoreSettings, score_requests  # noqa: E402
from relscale.model import Transformer  # noqa: E402

NAME = "eval"
PROFILES = {
    # model shapes (hidden, layers, heads), vocab, context, tokens per forward, examples per workload
    "ci": {
        "models": [(64, 2, 4)],
        "vocab": 1024,
        "context": 128,
        "batch_tokens": 2048,
        "text_docs": 48,
        "mc_questions": 64,
        "reps": 2,
    },
    "full": {
        "models": [(512, 8, 8), (1024, 16, 16)],
        "vocab": 32768,
        "context": 1024,
        "batch_tokens": 65536,
        "text_docs": 2000,
        "mc_questions": 4000,
        "reps": 3,
    },
}


def text_workload(rng: np.random.Generator, n: int, vocab: int, context: int) -> list[Request]:
    lengths = rng.integers(int(0.2 * context), 3 * context, size=n)
    return [Request(rng.integers(1, vocab, size=int(k) + 1).astype(np.int64), 1) for k in lengths]


def mc_workload(rng: np.random.Generator, n: int, vocab: int, context: int) -> list[Request]:
    requests = []
    for _ in range(n):
        prompt = rng.integers(1, vocab, size=context // 8).astype(np.int64)
        for _ in range(4):
            choice = rng.integers(1, vocab, size=int(rng.integers(1, 9))).astype(np.int64)
            requests.append(Request(np.concatenate([[0], prompt, choice]), 1 + len(prompt)))
    return requests


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_forward_tokens_per_s(
    model: Transformer, context: int, batch_tokens: int, device: torch.device, autocast
) -> dict:
    """Tokens/s of the training forward pass (autograd on) on packed (B, context) batches."""
    rows = max(1, batch_tokens // context)
    tokens = torch.randint(1, model.cfg.vocab_size, (rows, context), device=device)
    targets = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(context, device=device).repeat(rows, 1)
    cu_seqlens = torch.arange(0, rows * context + 1, context, dtype=torch.int32, device=device)
    model.train()

    def forward():
        with autocast():
            loss = model(tokens, targets, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=context)
        loss.detach()

    timing = time_fn(forward, warmup=25, rep=200)
    return {
        "train_forward_ms": timing["median_ms"],
        "train_forward_tokens_per_s": rows * context / (timing["median_ms"] * 1e-3),
    }


def run(profile: str, device: str) -> list[dict]:
    settings = PROFILES[profile]
    dev = torch.device(device)
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    )
    rng = np.random.default_rng(0)
    context, vocab = settings["context"], settings["vocab"]
    workloads = {
        "text": text_workload(rng, settings["text_docs"], vocab, context),
        "mc": mc_workload(rng, settings["mc_questions"], vocab, context),
    }
    records = []
    for hidden, layers, heads in settings["models"]:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, max_seq_len=context)
        model = Transformer(cfg).to(dev)
        baseline = train_forward_tokens_per_s(model, context, settings["batch_tokens"], dev, autocast)
        for workload, requests in workloads.items():
            score = ScoreSettings(context=context, batch_tokens=settings["batch_tokens"], dtype=dtype)
            score_requests(model, requests[: max(1, len(requests) // 8)], score)  # warm-up (kernels, caches)
            best = None
            for _ in range(settings["reps"]):
                _sync(dev)
                start = time.perf_counter()
                result = score_requests(model, requests, score)
                seconds = time.perf_counter() - start
                best = seconds if best is None else min(best, seconds)
            examples = len(requests) // 4 if workload == "mc" else len(requests)
            forward_tokens_per_s = result.tokens_forward / best
            records.append(
                {
                    "model": {"hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab},
                    "params": sum(p.numel() for p in model.parameters()),
                    "workload": workload,
                    "context": context,
                    "stride": context // 2,
                    "batch_tokens": settings["batch_tokens"],
                    "dtype": dtype,
                    "examples": examples,
                    "requests": len(requests),
                    "tokens_scored": result.tokens_scored,
                    "tokens_forward": result.tokens_forward,
                    "tokens_real": result.tokens_real,
                    "padding_fraction": 1 - result.tokens_real / result.tokens_forward,
                    "wall_s": best,
                    "examples_per_s": examples / best,
                    "scored_tokens_per_s": result.tokens_scored / best,
                    "forward_tokens_per_s": forward_tokens_per_s,
                    **baseline,
                    "forward_vs_train_forward": forward_tokens_per_s / baseline["train_forward_tokens_per_s"],
                }
            )
            print(records[-1])
        del model
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="full" if default_device == "cuda" else "ci"
    )
    parser.add_argument("--device", default=default_device)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    records = run(args.profile, args.device)
    meta = {
        "profile": args.profile,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    print(write_results(NAME, records, meta=meta))


if __name__ == "__main__":
    main()
