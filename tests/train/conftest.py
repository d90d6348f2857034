"""Fixtures of the trainer tests: the default corpus (the State of the Union addresses, 2.5M
training tokens, vocabulary 4096), prepared once per session exactly as `relscale prepare` does
by default, and tiny configs over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from relscale.config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sotu(tmp_path_factory) -> Path:
    from relscale.data import prepare_default

    out = tmp_path_factory.mktemp("data") / "sotu"
    return prepare_default(out, num_proc=2, log=lambda message: None).out_dir


def small_overrides(data_path: Path, out_dir: Path, *overrides: str) -> list[str]:
    """A very small, fast run: d=32, 2 layers, sequences of 32, 4 per micro-batch, per-step logs."""
    return [
        f"data.path={str(data_path)!r}", f"out_dir={str(out_dir)!r}", "model.vocab_size=4096",
        "model.hidden=32", "model.layers=2", "model.heads=2", "model.max_seq_len=32", "data.seq_len=32",
        "micro_batch=4", "steps=20", "log_interval=1", "eval_tokens=256", "progress=false",
        "optim.lr=3e-3", "optim.warmup=0.1", *overrides,
    ]


def small_config(data_path: Path, out_dir: Path, *overrides: str) -> TrainConfig:
    return load_train_config(None, small_overrides(data_path, out_dir, *overrides))
