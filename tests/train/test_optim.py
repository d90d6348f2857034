"""Learning-rate schedules and AdamW settings against values worked out by hand."""

import math

import pytest
import torch

from relscale.config import ModelConfig, OptimConfig
from relscale.model import Transformer
from relscale.train.optim import build_optimizer, lr_at, marin_beta2, resolve_settings


def test_wsd_by_hand():
    cfg = OptimConfig(lr=1.0, schedule="wsd", warmup=0.1, decay=0.2, min_lr_ratio=0.1)
    values = [lr_at(cfg, step, 20) for step in range(20)]
    # warm-up: 2 steps (0.1 * 20) reaching lr at the 2nd; decay: the last 4 steps, linear to 0.1.
    expected = [0.5, 1.0] + [1.0] * 14 + [1 - 0.9 * k / 4 for k in (1, 2, 3, 4)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[-1] == pytest.approx(0.1)


def test_cosine_by_hand():
    cfg = OptimConfig(lr=2.0, schedule="cosine", warmup=0.25, min_lr_ratio=0.0)
    values = [lr_at(cfg, step, 8) for step in range(8)]
    # warm-up: 2 steps (1.0, 2.0); then 6 steps along half a cosine, progress k/6 for k = 1..6.
    expected = [1.0, 2.0] + [1.0 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 7)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[-1] == pytest.approx(0.0, abs=1e-12)


def test_constant_and_bounds():
    cfg = OptimConfig(lr=0.3, schedule="constant", warmup=0.0)
    assert [lr_at(cfg, s, 5) for s in range(5)] == [0.3] * 5
    with pytest.raises(ValueError, match="step 5"):
        lr_at(cfg, 5, 5)


def test_marin_preset():
    assert marin_beta2(128) == pytest.approx(0.98)
    assert marin_beta2(256) == pytest.approx(0.9604)  # 0.98^2
    assert marin_beta2(32) == pytest.approx(0.98**0.25)
    s = resolve_settings(OptimConfig(preset="marin", lr=4e-3, beta1=0.5, eps=1e-3, grad_clip=0.0), 512)
    assert (s.lr, s.beta1, s.eps, s.weight_decay, s.grad_clip) == (4e-3, 0.95, 1e-15, 0.1, 1.0)
    assert s.beta2 == pytest.approx(0.98**4)
    cfg = OptimConfig(beta1=0.5, beta2=0.7, eps=1e-3, weight_decay=0.0, grad_clip=0.0)
    plain = resolve_settings(cfg, 512)
    assert (plain.beta1, plain.beta2, plain.eps, plain.weight_decay, plain.grad_clip) == (
        0.5, 0.7, 1e-3, 0.0, 0.0
    )


def test_weight_decay_on_matrices_not_on_norms():
    model = Transformer(ModelConfig(vocab_size=50, hidden=16, layers=1, heads=2))
    optimizer = build_optimizer(model, resolve_settings(OptimConfig(preset="marin"), 128), "cpu")
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} == {n for n in names.values() if n.endswith("norm.weight")}
    assert "embed.weight" in {names[id(p)] for p in decayed["params"]}
    assert optimizer.defaults["betas"] == (0.95, pytest.approx(0.98)) and optimizer.defaults["eps"] == 1e-15
    assert not optimizer.defaults["fused"]  # fused AdamW is for CUDA
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    assert all(isinstance(p, torch.nn.Parameter) for p in decayed["params"])
