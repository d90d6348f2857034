"""IsoFLOP grids: the marin preset reproduces the released suite; configs are validated by key."""

import argparse
import csv
import io
import json
import math
from pathlib import Path

import pytest

from relscale.config import config_hash
from relscale.errors import ConfigError, DataError
from relscale.sweep.cli import run_grid
from relscale.sweep.grid import budget_tag, build_grid, candidates
from relscale.sweep.presets import estimate_seconds, get_preset, marin, preset_for_hardware, tiny
from relscale.sweep.spec import (
    config_differences,
    load_sweep_config,
    sweep_config_from_json,
    sweep_config_to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ["isoflop-1ep18-d1024-L11-B8", "isoflop-1ep19-d2816-L28-B8", "isoflop-1ep20-d1536-L16-B256",
            "isoflop-6ep19-d3584-L35-B16"]


def levanter_forward_flops_per_token(d: int, layers: int, vocab: int, seq: int, head_dim: int = 128) -> float:
    """Levanter's lm_flops_per_token (the convention of Marin's sweeps), written out by hand: a
    GLU MLP of width 4d, q/k/v/o projections without GQA, a full (not causal) attention map with
    its mask, and the LM head."""
    heads = d // head_dim
    mlp = 2 * 3 * d * (4 * d)
    qkv = 2 * d * (heads * head_dim + 2 * heads * head_dim)
    dense = 2 * d * d
    attention = (2 * seq**2 * heads * head_dim + 3 * seq**2 * heads + 2 * seq**2 * head_dim * heads) / seq
    return layers * (mlp + qkv + dense + attention) + 2 * d * vocab


@pytest.fixture(scope="module")
def marin_runs():
    return build_grid(get_preset("marin"))


def test_marin_preset_is_the_released_suite(marin_runs):
    names = {run.name for run in marin_runs}
    for name in RELEASED:
        assert name in names
    # "255 decoder-only Transformers ... across three corpora" (Held et al. 2025): 85 per corpus.
    assert len(marin_runs) == 255
    for dataset in ("nemotron", "comma", "dclm"):
        per_budget = [sum(r.dataset == dataset and r.budget == b for r in marin_runs)
                      for b in (1e18, 3e18, 6e18, 1e19, 3e19, 6e19, 1e20)]
        assert per_budget == [5, 10, 15, 10, 15, 15, 15]


def test_marin_rule_holds_for_every_run(marin_runs):
    for run in marin_runs:
        d, B = run.hidden, run.batch
        assert run.layers == round(d / (64 + 4 * math.log2(d) - 9))
        model = run.train.model
        assert run.heads == d // 128 and model.d_head == 128 and model.n_kv_heads == run.heads
        assert run.train.model.d_ff == 4 * d and run.train.model.vocab_size == 128256
        assert B >= 8 and B & (B - 1) == 0
        assert run.lr == pytest.approx(0.33 * math.sqrt(B) / d) and run.lr <= 0.01
        assert run.beta2 == pytest.approx(0.98 ** (B / 128))
        assert run.tokens == B * run.steps * 4096
        per_token = levanter_forward_flops_per_token(d, run.layers, 128256, 4096)
        assert abs(per_token * run.tokens - run.budget) <= 0.01 * run.budget
        assert run.flops_marin == pytest.approx(per_token * run.tokens, rel=1e-12)
        assert run.steps == round(run.budget / (per_token * B * 4096))
        # The batch: the smallest power of two giving <= 2^16 steps, halved while the LR > 0.01.
        target = 2 ** max(0, math.ceil(math.log2(run.budget / (per_token * 4096 * 2**16))))
        assert B == target or (B < target and 0.33 * math.sqrt(2 * B) / d > 0.01)
        width_step = 128 if run.budget <= 9e18 else 256
        assert (d - 512) % width_step == 0 and 512 <= d <= 4096
        assert run.run_id == config_hash(run.train, length=16) and run.train.out_dir == ""
        assert run.train.micro_batch * run.train.grad_accum == B and run.train.micro_batch <= 16


def test_released_config_by_hand(marin_runs):
    run = next(r for r in marin_runs if r.name == "isoflop-1ep18-d1024-L11-B8" and r.dataset == "dclm")
    # 1024 / (64 + 40 - 9) = 10.8 -> 11 layers; F = 11*(24d^2 + 8d^2 + 4sd + 3s*8) + 2dV per token
    per_token = 11 * (32 * 1024**2 + 4 * 4096 * 1024 + 3 * 4096 * 8) + 2 * 1024 * 128256
    assert run.layers == 11 and run.steps == round(1e18 / (per_token * 8 * 4096)) == 37335
    assert run.batch == 8  # 1e18 / (F * 4096 * 2^16) = 4.6 sequences -> 8
    assert run.lr == pytest.approx(0.33 * math.sqrt(8) / 1024)


def test_grid_cli_csv(capsys):
    run_grid(argparse.Namespace(config=None, preset="marin", format="csv", vocab_size=None, dropped=False))
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 255
    assert set(RELEASED) <= {row["name"] for row in rows}
    expected = {"name", "budget", "hidden", "layers", "heads", "batch", "steps", "tokens", "params",
                "non_embedding_params", "lr", "beta2", "flops_train", "flops_marin", "dataset", "run_id"}
    assert set(rows[0]) == expected
    for row in rows:
        assert float(row["flops_train"]) > 2.5 * float(row["flops_marin"])  # fwd+bwd vs forward only
        assert int(row["batch"]) >= 8 and float(row["lr"]) <= 0.01


def test_grid_cli_json_from_file(capsys):
    run_grid(argparse.Namespace(config=str(ROOT / "configs/sweeps/tiny.toml"), preset=None, format="json",
                                vocab_size=4096, dropped=False))
    rows = json.loads(capsys.readouterr().out)
    assert len({row["budget"] for row in rows}) >= 3
    assert all(row["params"] > row["non_embedding_params"] for row in rows)


def test_toml_configs_equal_presets():
    assert load_sweep_config(ROOT / "configs/sweeps/marin.toml") == marin()
    assert load_sweep_config(ROOT / "configs/sweeps/tiny.toml") == tiny()


def test_json_round_trip_and_differences():
    cfg = marin()
    data = json.loads(json.dumps(sweep_config_to_dict(cfg)))
    assert sweep_config_from_json(data) == cfg
    other = sweep_config_to_dict(tiny())
    diffs = config_differences(data, other)
    assert any(line.startswith("budgets:") for line in diffs)
    assert any(line.startswith("train.data.seq_len:") for line in diffs)


def test_tiny_preset_spreads_widths():
    runs = build_grid(tiny(), {"sotu": 4096})
    budgets = sorted({r.budget for r in runs})
    assert len(budgets) >= 3
    assert all(len({r.hidden for r in runs if r.budget == b}) >= 3 for b in budgets)


@pytest.mark.parametrize(
    "toml, key",
    [
        ("budgets = [1e18]\nwidht = 3", "widht: unknown key"),
        ("budgets = []", "budgets: give at least one"),
        ("budgets = [1e18, -1.0]", r"budgets\[1\]: -1.0 must be positive"),
        ("budgets = [1e18]\n[width]\nstep = 100", "width.step: 100 is not a multiple of head_dim=128"),
        ("budgets = [1e18]\n[width]\nmin = 1024\nmax = 512", "width.max: 512 is below width.min"),
        ("budgets = [1e18]\n[[width.by_budget]]\nmax_budget = 1e19\nstep = 64",
         r"width.by_budget\[0\].step: 64 is not a multiple"),
        ("budgets = [1e18]\n[depth]\nrule = 'chinchilla'", "depth.rule: 'chinchilla' is not one of"),
        ("budgets = [1e18]\nflop_convention = 'kaplan'", "flop_convention: 'kaplan' is not one of"),
        ("budgets = [1e18]\n[batch]\nmin = '8'", "batch.min: expected int"),
        ("budgets = [1e18]\n[train.optim]\nlr = -1.0", "train.optim.lr: must be positive"),
        ("budgets = [1e18]\n[train]\nstepz = 3", "train.stepz: unknown key"),
        ("budgets = [1e18]\n[[datasets]]\nname = 'a'\npath = 'x'\n[[datasets]]\nname = 'a'\npath = 'y'",
         "datasets: duplicate names"),
        ("budgets = [1e18]\n[[datasets]]\nname = 'a b'\npath = 'x'", r"datasets\[0\].name: 'a b'"),
    ],
)
def test_malformed_config_names_the_key(tmp_path, toml, key):
    path = tmp_path / "sweep.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=key) as info:
        load_sweep_config(path)
    assert str(path) in str(info.value)


def test_missing_data_names_the_prepare_command(tmp_path):
    cfg = tiny()
    cfg.datasets[0].path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"relscale prepare --out {tmp_path / 'nowhere'}"):
        build_grid(cfg)


def test_budget_tag_and_dropped_reasons():
    assert [budget_tag(b) for b in (1e18, 6e19, 2.5e12, 1e-3)] == ["1ep18", "6ep19", "2.5ep12", "1em03"]
    dropped = [c for c in candidates(marin(), 1e18, 128256) if c.dropped]
    # 1e18 keeps d = 512..1024; wider models get batches under 8 sequences
    assert {c.hidden for c in dropped} == set(range(1152, 4097, 128))
    assert all("batch.min" in c.dropped for c in dropped)


def test_preset_for_hardware_fits_the_time():
    rate, fixed = 5e9, 1.0
    for minutes in (2.0, 10.0):
        cfg = preset_for_hardware("cpu", minutes, train_flops_per_s=rate, fixed_s=fixed, train_tokens=10**9)
        estimate = estimate_seconds(cfg, 4096, rate, fixed)
        assert 0.6 * 60 * minutes <= estimate <= 60 * minutes
        runs = build_grid(cfg, {"sotu": 4096})
        assert len({r.budget for r in runs}) == 3 and len(runs) >= 6
    gpu = preset_for_hardware("cuda", 10.0, train_flops_per_s=1e14, fixed_s=3.0, train_tokens=10**9)
    assert gpu.seq_len == 512 and min(gpu.budgets) > 1e13
    # a small corpus caps the budgets: no run may see the data more than max_epochs times
    capped = preset_for_hardware("cuda", 10.0, train_flops_per_s=1e14, fixed_s=3.0, train_tokens=10**6)
    assert max(capped.budgets) < max(gpu.budgets)
    assert max(r.tokens for r in build_grid(capped, {"sotu": 4096})) <= 4 * 10**6
