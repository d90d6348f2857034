"""Tokenise eval sets into scoring requests, score them in packed batches, compute metrics.

The beginning token
-------------------
Our data puts an EOS token between documents, so in training every document's first token is
predicted from an EOS. Scoring does the same: a document is scored as ``[EOS] + tokens`` with
every document token scored (the EOS itself is context, never a target); nothing else is
prepended. For Hugging Face checkpoints the tokenizer's BOS token is used when the checkpoint
configures one (Llama 3: ``<|begin_of_text|>``), else its EOS (Qwen3 base, our exports) -- see
:func:`relscale.eval.hf.beginning_token`. Text is tokenised without special tokens.

Multiple choice: the prompt and each choice are tokenised together and split where the prompt's
own tokens end (as lm-evaluation-harness does), so a choice is scored in the tokenisation the
model would see in running text; if merging across the boundary changes the prompt's tokens,
the choice is tokenised on its own and appended.

Exactness: per-token losses come from the model's (fused) cross-entropy in fp32 with any z-loss
switched off, and are summed per example in float64, so a packed, batched score equals an
unbatched float64 computation on the same tokens to fp32 rounding (tested).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from relscale.eval.formats import BadRow, EvalSet
from relscale.eval.packing import Request, iter_batches

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """Requests of an eval set for one tokenizer; ``kept`` indexes the examples scored."""

    requests: list[Request]
    kept: list[int]
    n_bytes: list[int]  # text sets: UTF-8 bytes of the scored text, per kept example
    choice_slices: list[slice]  # mc sets: the requests of each kept example
    bad_rows: list[BadRow]


def _encode(tokenizer, texts: list[str]):
    return tokenizer.encode_batch(texts, add_special_tokens=False)


def encode_text_set(eval_set: EvalSet, tokenizer, start_id: int, prefix_tokens: int = 0) -> Encoded:
    """``[start] + tokens(text)``, scored after the first ``prefix_tokens`` document tokens.
    Bytes of a conditional continuation are those of the text from the first scored token's
    character offset on (a character split across tokens counts with the scored part)."""
    encodings = _encode(tokenizer, [ex.text for ex in eval_set.examples])
    out = Encoded([], [], [], [], [])
    for i, (example, encoding) in enumerate(zip(eval_set.examples, encodings, strict=True)):
        ids = encoding.ids
        if len(ids) <= prefix_tokens:
            out.bad_rows.append(
                BadRow(
                    eval_set.source,
                    example.example_id,
                    f"{len(ids)} tokens: nothing left to score after {prefix_tokens} prefix tokens",
                )
            )
            continue
        scored_text = example.text[encoding.offsets[prefix_tokens][0] :] if prefix_tokens else example.text
        out.requests.append(Request(np.asarray([start_id, *ids], dtype=np.int64), 1 + prefix_tokens))
        out.kept.append(i)
        out.n_bytes.append(len(scored_text.encode("utf-8")))
    return out


def encode_mc_set(eval_set: EvalSet, tokenizer, start_id: int) -> Encoded:
    examples = eval_set.examples
    contexts = _encode(tokenizer, [ex.context for ex in examples])
    wholes = _encode(tokenizer, [ex.context + c for ex in examples for c in ex.continuations])
    out = Encoded([], [], [], [], [])
    cursor = 0
    for i, (example, context) in enumerate(zip(examples, contexts, strict=True)):
        ctx = context.ids
        choice_requests, bad = [], None
        for choice, whole in zip(
            example.continuations, wholes[cursor : cursor + len(example.continuations)], strict=True
        ):
            ids = whole.ids
            cont = (
                ids[len(ctx) :]
                if ids[: len(ctx)] == ctx
                else tokenizer.encode(choice, add_special_tokens=False).ids
            )
            if not cont:
                bad = f"choice {choice!r} tokenises to nothing after the prompt"
                break
            choice_requests.append(Request(np.asarray([start_id, *ctx, *cont], dtype=np.int64), 1 + len(ctx)))
        cursor += len(example.continuations)
        if bad:
            out.bad_rows.append(BadRow(eval_set.source, example.example_id, bad))
            continue
        out.choice_slices.append(slice(len(out.requests), len(out.requests) + len(choice_requests)))
        out.requests.extend(choice_requests)
        out.kept.append(i)
    return out


def encode_set(eval_set: EvalSet, tokenizer, start_id: int, prefix_tokens: int = 0) -> Encoded:
    if eval_set.kind == "text":
        return encode_text_set(eval_set, tokenizer, start_id, prefix_tokens)
    return encode_mc_set(eval_set, tokenizer, start_id)


# -------------------------------------------------------------------------------------- scoring
@dataclass
class ScoreSettings:
    context: int  # most tokens a window sees (default: the model's training sequence length)
    stride: int | None = None  # new targets per window after the first; None: context // 2
    pack_len: int | None = None  # row length; None: the context
    batch_tokens: int = 16384  # tokens per forward pass (rows = batch_tokens // pack_len)
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    progress: bool = False

    def resolved(self) -> tuple[int, int, int]:
        stride = self.stride if self.stride is not None else max(1, self.context // 2)
        pack_len = self.pack_len if self.pack_len is not None else self.context
        return stride, pack_len, max(1, self.batch_tokens // pack_len)


@dataclass
class ScoreResult:
    nll: np.ndarray  # float64 (n_requests,): summed NLL (nats) of each request's scored tokens
    tokens_forward: int  # tokens run through the model, padding included
    tokens_real: int  # of which not padding
    tokens_scored: int
    seconds: float


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode with the z-loss off (we want the plain NLL); both restored afterwards."""
    core = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    cfg = getattr(core, "cfg", None)
    z_loss = getattr(cfg, "z_loss", 0.0)
    was_training = model.training
    model.eval()
    if cfg is not None:
        cfg.z_loss = 0.0
    try:
        yield
    finally:
        if cfg is not None:
            cfg.z_loss = z_loss
        model.train(was_training)


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype not in ("auto", "fp32"):
        raise ValueError(f"dtype {dtype!r}: choose auto, fp32 or bf16")
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def score_requests(model: torch.nn.Module, requests: list[Request], settings: ScoreSettings) -> ScoreResult:
    """Summed NLL of every request's scored tokens, from packed, document-masked batches."""
    stride, pack_len, batch_rows = settings.resolved()
    device = model_device(model)
    # Past a torch.compile wrapper: eval shapes would trigger recompiles; FSDP's hooks live on
    # the module itself, so they still run.
    forward = getattr(model, "_orig_mod", model)
    n = len(requests)
    # One extra slot collects the (zero) losses of unscored positions, so no boolean indexing
    # (and no host-device sync) is needed per batch.
    sums = torch.zeros(n + 1, dtype=torch.float64, device=device)
    tokens_forward = real = 0
    batches = iter_batches(requests, settings.context, stride, pack_len, batch_rows)
    if settings.progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch", leave=False)
    start = time.perf_counter()
    with torch.no_grad(), eval_mode(model), autocast_for(device, settings.dtype):
        for batch in batches:
            owner = np.where(batch.owner >= 0, batch.owner, n)
            tokens, targets, positions, owner_t = (
                torch.from_numpy(a).to(device, non_blocking=True)
                for a in (batch.tokens, batch.targets, batch.positions, owner)
            )
            cu_seqlens = torch.from_numpy(batch.cu_seqlens).to(device, non_blocking=True)
            losses = forward(
                tokens,
                targets,
                positions=positions,
                cu_seqlens=cu_seqlens,
                max_seqlen=batch.max_seqlen,
                reduction="none",
            )
            sums.index_add_(0, owner_t, losses.reshape(-1).double())
            tokens_forward += batch.tokens.size
            real += batch.n_real_tokens
    nll = sums[:n].cpu().numpy()
    seconds = time.perf_counter() - start
    scored = sum(r.n_scored for r in requests)
    return ScoreResult(nll, tokens_forward, real, scored, seconds)


# -------------------------------------------------------------------------------------- metrics
def text_metrics(eval_set: EvalSet, encoded: Encoded, nll: np.ndarray) -> list[dict]:
    rows = []
    for k, i in enumerate(encoded.kept):
        n_bytes = encoded.n_bytes[k]
        rows.append(
            {
                "example_id": eval_set.examples[i].example_id,
                "groups": eval_set.examples[i].groups,
                "nll": float(nll[k]),
                "n_tokens": int(encoded.requests[k].n_scored),
                "n_bytes": int(n_bytes),
                "bpb": float(nll[k]) / (LN2 * n_bytes),
            }
        )
    return rows


def mc_metrics(eval_set: EvalSet, encoded: Encoded, nll: np.ndarray) -> list[dict]:
    rows = []
    for k, i in enumerate(encoded.kept):
        example = eval_set.examples[i]
        part = encoded.choice_slices[k]
        logprobs = -nll[part]
        lengths = np.array([r.n_scored for r in encoded.requests[part]], dtype=np.float64)
        normalised = logprobs / lengths
        shifted = logprobs - logprobs.max()
        probs = np.exp(shifted) / np.exp(shifted).sum()
        answer = example.answer
        rows.append(
            {
                "example_id": example.example_id,
                "groups": example.groups,
                "choice_logprobs": logprobs.tolist(),
                "choice_logprobs_norm": normalised.tolist(),
                "choice_n_tokens": lengths.astype(np.int64).tolist(),
                "answer": int(answer),
                "logprob_correct": float(logprobs[answer]),
                "prob_correct": float(probs[answer]),
                "acc": float(int(np.argmax(logprobs)) == answer),
                "acc_norm": float(int(np.argmax(normalised)) == answer),
            }
        )
    return rows


def metrics(eval_set: EvalSet, encoded: Encoded, nll: np.ndarray) -> list[dict]:
    return (text_metrics if eval_set.kind == "text" else mc_metrics)(eval_set, encoded, nll)
