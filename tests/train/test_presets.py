"""The marin sweep preset carries the paper suite's training recipe into every run it lists."""

import math

import pytest

from relscale.sweep.grid import build_grid
from relscale.sweep.presets import get_preset, tiny


def test_every_marin_run_trains_with_c_adamc_and_llama3_rope():
    runs = build_grid(get_preset("marin"))
    assert len(runs) == 255
    for run in runs:
        optim, model = run.train.optim, run.train.model
        assert (optim.preset, optim.name, optim.schedule) == ("none", "c_adamc", "wsd_levanter")
        assert (optim.beta1, optim.eps, optim.weight_decay, optim.grad_clip) == (0.95, 1e-15, 0.1, 1.0)
        assert (optim.warmup, optim.decay, optim.min_lr_ratio) == (0.1, 0.2, 0.0)
        assert optim.beta2 == pytest.approx(0.98 ** (run.batch / 128)) and optim.lr == run.lr
        scaling = model.rope_scaling
        assert (scaling.type, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                scaling.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)
        assert model.rope_theta == 500000.0 and model.norm_eps == 1e-5 and model.qk_norm
        assert not model.tie_embeddings
        # The same held-out text for every run, whatever its batch layout.
        assert run.train.eval_tokens == 2**21 and run.train.eval_windows == 512


def test_tiny_runs_share_the_optimizer_and_their_validation_text():
    runs = build_grid(tiny(), {"sotu": 4096})
    assert {r.train.optim.name for r in runs} == {"c_adamc"}
    assert {r.train.eval_tokens for r in runs} == {64 * 128}
    assert len({(r.train.micro_batch, r.train.grad_accum) for r in runs}) > 1  # layouts do differ
    assert all(math.isclose(r.train.optim.beta2, 0.98 ** (r.batch / 128)) for r in runs)
