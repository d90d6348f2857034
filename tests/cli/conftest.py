"""Shared fixtures of the CLI robustness tests: a tiny prepared corpus (two shards per split, a
300-token vocabulary), a tiny trained run with checkpoints, and a helper that runs the CLI in
process and returns (exit status, stdout, stderr)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "near old stone bridges under grey northern skies and bright summer rain").split()


def write_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A JSONL corpus of short pseudo-English documents with a group label per document."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
            f.write(json.dumps({"id": f"d{i}", "text": text, "region": "north" if i % 2 else "south"}) + "\n")
    return path


def train_toml(data_dir: Path, out_dir: Path, steps: int = 6, **extra: object) -> str:
    lines = [f"steps = {steps}", "micro_batch = 2", "seed = 0", f'out_dir = "{out_dir}"', 'device = "cpu"',
             "ckpt_interval = 3", "eval_interval = 3", "eval_batches = 1", "log_interval = 1",
             "progress = false"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["[model]", "vocab_size = 300", "hidden = 16", "layers = 1", "heads = 2", "max_seq_len = 32",
              "[data]", f'path = "{data_dir}"', "seq_len = 32", "[optim]", "lr = 1e-2"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder (vocab 300, shards of 2000 tokens) of a 40-document JSONL corpus."""
    from relscale.data import prepare

    root = tmp_path_factory.mktemp("tinydata")
    corpus = write_corpus(root / "corpus.jsonl")
    out = root / "prepared"
    prepare([str(corpus)], out, id_field="id", group_fields=["region"], vocab_size=300, shard_tokens=2000,
            val_fraction=0.2, log=lambda message: None)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A finished 6-step run of a d=16 model on ``tiny_data`` (config at run/../train.toml); its
    checkpoints are kept (step 6 is the latest)."""
    from relscale.config import load_train_config
    from relscale.train import train

    root = tmp_path_factory.mktemp("tinyrun")
    config = root / "train.toml"
    config.write_text(train_toml(tiny_data, root / "run"))
    train(load_train_config(config), resume=False, progress=False)
    return root / "run"


def copy_run(run: Path, dest: Path, keep_result: bool = False) -> Path:
    """A copy of a run folder; without its result files, so that `train --resume` resumes it from
    the latest checkpoint instead of reporting it finished."""
    shutil.copytree(run, dest)
    if not keep_result:
        for name in ("result.json", "final"):
            target = dest / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return dest


@pytest.fixture
def cli(capsys):
    """Run ``relscale ARGV`` in this process: returns (status, stdout, stderr)."""
    from relscale.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
