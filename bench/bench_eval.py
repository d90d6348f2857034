"""Evaluation throughput: examples/s and tokens/s of per-example scoring (`relscale eval`), next to
the forward-pass tokens/s of training the same model.

Workloads (synthetic token ids, so no tokenizer or data is needed):
* ``text``: documents of 0.2x to 3x the context, lm-eval's disjoint windows (stride = context);
* ``mc``: 4-choice questions, a ~context/8-token prompt and 1-8 token choices, one request each.
Scoring is timed end to end (window planning, packing, host-to-device copies, forward passes,
per-example sums; the result is on the host when the clock stops). The training baseline is
one forward pass of a packed (B, S) batch with autograd on, as the trainer runs it, in the same
dtype. The goal on a GPU is eval tokens/s >= 70% of that forward-pass figure.

``--lm-eval``: lm-evaluation-harness on the same tasks and weights, ``--model relscale`` (a
relscale checkpoint) against ``--model hf`` (its HF export; lm-eval's default batch size 1, and
16), end to end through ``lm_eval.simple_evaluate`` on local tasks (MMLU-format 5-shot as two
subject tasks, Anthropic-format, rolling documents; tests/eval/lmeval_fixtures.py), with the
largest per-request difference between the two. Written as ``eval-lmeval-<device>-<time>.json``.

    python bench/bench_eval.py [--profile ci|full] [--device cpu|cuda] [--lm-eval] [--threads N]
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
                    "stride": context,
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


LMEVAL_SHAPE = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "max_seq_len": 512}
LMEVAL_TASKS = ["t_mmlu", "t_ai_risk", "t_rolling"]


def run_lm_eval_comparison(device: str, n_test: int = 40, reps: int = 2) -> list[dict]:
    """Wall time of lm-eval with --model relscale and --model hf on the same weights and tasks."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    import transformers

    import relscale.eval.lmeval  # noqa: F401 -- registers --model relscale
    from relscale.eval.hf import export_hf
    from relscale.model_io import save_model
    from tests.eval.lmeval_fixtures import build_tokenizer, run_lm_eval, write_tasks

    root = Path(tempfile.mkdtemp(prefix="bench-lmeval-"))
    tokenizer = build_tokenizer()
    files = write_tasks(root / "tasks", n_test=n_test, doc_words=(50, 200, 400, 800, 1600, 3000))
    tok_path = root / "tokenizer.json"
    tokenizer.save(str(tok_path))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), qk_norm=True, **LMEVAL_SHAPE)
    model = Transformer(cfg)
    final = root / "run" / "final"
    save_model(model, final, {"tokens": 1})
    export_hf(model, root / "hf", tokenizer_path=tok_path, eos_token="<|endoftext|>")
    variants = {
        "relscale": ("relscale", f"pretrained={final},tokenizer={tok_path}", 1),
        "hf_bs1": ("hf", f"pretrained={root / 'hf'},dtype=float32", 1),
        "hf_bs16": ("hf", f"pretrained={root / 'hf'},dtype=float32", 16),
    }
    walls: dict[str, float] = {}
    responses: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for name, (model_name, args, batch) in variants.items():
        best = None
        for _ in range(reps):
            start = time.perf_counter()
            results = run_lm_eval(
                model_name, args, files["tasks"], LMEVAL_TASKS, batch_size=batch, device=device
            )
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        walls[name] = best
        samples = results["samples"]
        per_task: dict[str, list[float]] = {}
        for task in sorted(samples):
            for sample in sorted(samples[task], key=lambda x: x["doc_id"]):
                for resp in sample["filtered_resps"]:
                    value = float(resp[0]) if isinstance(resp, list | tuple) else float(resp)
                    per_task.setdefault(task, []).append(value)
        responses[name] = per_task
        counts[name] = sum(len(v) for v in per_task.values())
        print(name, f"{best:.2f}s", flush=True)
    task_diff = {
        task: max(abs(a - b) for a, b in zip(values, responses["hf_bs1"][task], strict=True))
        for task, values in responses["relscale"].items()
    }
    diff = max(task_diff.values())
    params = sum(p.numel() for p in model.parameters())
    return [
        {
            "comparison": "lm_eval simple_evaluate wall time, best of reps",
            "tasks": LMEVAL_TASKS,
            "mmlu_questions": 2 * n_test,
            "requests": counts["relscale"],
            "model": {**LMEVAL_SHAPE, "vocab": cfg.vocab_size, "params": params},
            "wall_s": walls,
            "speedup_vs_hf_bs1": walls["hf_bs1"] / walls["relscale"],
            "speedup_vs_hf_bs16": walls["hf_bs16"] / walls["relscale"],
            "max_abs_loglikelihood_diff_vs_hf": diff,
            "max_abs_loglikelihood_diff_vs_hf_per_task": task_diff,
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
            "transformers": transformers.__version__,
            "reps": reps,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="full" if default_device == "cuda" else "ci"
    )
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--lm-eval", action="store_true", help="lm-eval --model relscale against --model hf")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    if args.lm_eval:
        records = run_lm_eval_comparison(args.device)
        meta = {
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        }
        print(records[0])
        print(write_results(NAME + "-lmeval", records, meta=meta))
        return
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
