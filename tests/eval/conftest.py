"""Shared fixtures of the eval tests: a tiny corpus prepared with the data room, a tiny BPE
tokenizer, tiny random models saved with model_io."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from relscale.config import ModelConfig
from relscale.data import prepare
from relscale.model import Transformer
from relscale.model_io import save_model

WORDS = (
    "the nation union congress people war peace trade law tax state year great duty "
    "liberty justice army navy commerce treaty public credit revenue industry labor"
).split()
SEQ_LEN = 24  # the tiny model's training context: documents below are mostly longer


def make_docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.randint(3, 40)
        text = " ".join(rng.choice(WORDS) for _ in range(length)) + rng.choice([".", "!", " é ü."])
        docs.append(
            {
                "id": f"doc{i:03d}",
                "text": text,
                "century": rng.choice(["18th", "19th", "20th"]),
                "kind": rng.choice(["spoken", "written"]),
            }
        )
    return docs


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread beats two (thread hand-offs cost more than the
    matmuls, badly so on a busy machine). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in make_docs(60)))
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "tinydata"
    prepare(
        [str(corpus)],
        out,
        group_fields=["century", "kind"],
        vocab_size=300,
        val_fraction=0.3,
        log=lambda _: None,
    )
    return out


@pytest.fixture(scope="session")
def tokenizer(data_dir):
    from relscale.data import PreparedData

    return PreparedData(data_dir).tokenizer


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(
        vocab_size=vocab_size,
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=2,
        max_seq_len=64,
        qk_norm=True,
        tie_embeddings=False,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(vocab_size, **overrides))
    with torch.no_grad():  # larger than init so that predictions differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, data_dir, tokenizer) -> Path:
    model = tiny_model(tokenizer.get_vocab_size())
    out = tmp_path_factory.mktemp("runs") / "tiny" / "final"
    save_model(
        model,
        out,
        {
            "tokens": 12345,
            "seq_len": SEQ_LEN,
            "data_path": str(data_dir),
            "flops_train": 1.5e9,
            "flops_marin": 5e8,
        },
    )
    return out


def nll_direct(model: Transformer, tokens: np.ndarray, first_scored: int = 1) -> float:
    """The reference: one unbatched forward, log-softmax in float64, summed over scored targets."""
    inputs = torch.as_tensor(tokens[:-1], dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(inputs)[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.as_tensor(tokens[1:], dtype=torch.long)
    per_token = -logp.gather(1, targets[:, None])[:, 0]
    return float(per_token[first_scored - 1 :].sum())


def windowed_reference(model, tokens: np.ndarray, score_from: int, context: int, stride: int) -> float:
    """Unbatched: each chunk of targets [a, e] scored from the `context` tokens before e."""
    total, a = 0.0, score_from
    e = min(len(tokens) - 1, max(context, score_from + stride - 1))  # inclusive chunk end
    while a < len(tokens):
        lo = max(0, e - context)
        total += nll_direct(model, tokens[lo : e + 1], first_scored=a - lo)
        a, e = e + 1, min(len(tokens) - 1, e + stride)
    return total
