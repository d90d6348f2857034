"""End-to-end trainer runs on the default corpus (see conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from relscale.config import load_train_config
from relscale.counting import param_counts, run_flops
from relscale.errors import ConfigError, DataError
from relscale.train import TrainingDiverged, train
from relscale.train.checkpoint import latest_checkpoint
from relscale.train.metrics import read_metrics
from tests.train.conftest import REPO, small_config, small_overrides


def _losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def _run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=240, **kwargs
    )


@pytest.mark.slow
def test_tiny_config_learns_far_below_the_unigram_entropy(sotu, tmp_path):
    from relscale.data import PreparedData, validation_batches
    from relscale.model_io import load_model

    # configs/tiny.toml as the README runs it.
    overrides = [f"data.path={str(sotu)!r}", f"out_dir={str(tmp_path)!r}", "progress=false"]
    cfg = load_train_config(REPO / "configs/tiny.toml", overrides)
    result = train(cfg)
    data = PreparedData(sotu)
    unigram = data.unigram_entropy("val")  # the loss of the best model that ignores context
    assert result.status == "done" and result.steps == 200
    # 200 steps of 1024 tokens reach 0.80 x the unigram entropy (5.26 vs 6.59 nats here), more
    # than a nat below it; a model that ignores context cannot go below 1.0 x.
    assert result.final_val_loss < 0.82 * unigram, (result.final_val_loss, unigram)

    tokens = 200 * cfg.micro_batch * cfg.data.seq_len
    flops = run_flops(cfg.model, cfg.data.seq_len, tokens)
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["status"] == "done" and stored["tokens"] == result.tokens == tokens
    assert stored["flops_train"] == flops.flops_train and stored["flops_marin"] == flops.flops_marin
    assert stored["params"] == param_counts(cfg.model).total
    assert 0 < stored["time_to_first_step_s"] < stored["wall_s"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(10, 201, 10))
    assert [r["step"] for r in records if "val_loss" in r] == [50, 100, 150, 200]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb"} <= set(records[0])

    # The saved model reproduces the final validation loss on the same batches.
    model, meta = load_model(tmp_path / "final")
    assert meta["tokens"] == tokens and meta["steps"] == 200 and meta["global_batch"] == cfg.micro_batch
    assert meta["train_config"]["model"]["hidden"] == 64 and meta["data_path"] == str(sotu)
    total = count = 0.0
    assert cfg.eval_windows == 64  # eval_tokens = 8192 tokens of 128-token windows
    with torch.no_grad():
        for b in validation_batches(data, cfg.data.seq_len, 16, cfg.eval_windows // 16):
            total += model(b.tokens, b.targets, positions=b.positions, cu_seqlens=b.cu_seqlens,
                           max_seqlen=b.max_seqlen, reduction="sum").item()
            count += b.targets.numel()
    assert total / count == pytest.approx(result.final_val_loss, rel=1e-5)

    # A finished run is returned as it is, never overwritten.
    again = train(cfg)
    assert again.wall_s == result.wall_s
    with pytest.raises(ConfigError, match="finished run"):
        train(cfg, resume=False)


def test_stop_and_resume_repeats_the_uninterrupted_losses(sotu, tmp_path):
    whole = small_config(sotu, tmp_path / "whole", "ckpt_interval=10", "eval_interval=10")
    reference = train(whole)

    broken = small_config(sotu, tmp_path / "broken", "ckpt_interval=10", "eval_interval=10")

    def crash(step, model):
        if step == 13:  # after the checkpoint of step 10
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(broken, on_step=crash)
    assert latest_checkpoint(tmp_path / "broken").name == "step_0000010"
    assert not (tmp_path / "broken" / "result.json").exists()

    with pytest.raises(ConfigError, match="optim.lr"):
        train(small_config(sotu, tmp_path / "broken", "ckpt_interval=10", "optim.lr=1e-3"))
    with pytest.raises(ConfigError, match="resume"):
        train(broken, resume=False)

    resumed = train(broken)
    assert _losses(tmp_path / "broken") == _losses(tmp_path / "whole")  # exactly, steps 1..20
    assert len(_losses(tmp_path / "whole")) == 20
    assert resumed.final_val_loss == reference.final_val_loss
    assert resumed.final_train_loss == reference.final_train_loss
    for name, value in load_file(tmp_path / "whole/final/model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "broken/final/model.safetensors")[name])
    assert sorted(p.name for p in (tmp_path / "broken/checkpoints").iterdir()) == ["step_0000020"]


def test_c_adamc_state_resumes_exactly(sotu, tmp_path):
    """C-AdamC's moments and step counts go through the DCP checkpoint: stopped after step 4 and
    resumed from step 3, the run repeats the uninterrupted losses and weights bit for bit."""
    common = ["steps=6", "ckpt_interval=3", "optim.name='c_adamc'", "optim.lr=1e-2"]
    train(small_config(sotu, tmp_path / "whole", *common))

    def crash(step, model):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(sotu, tmp_path / "broken", *common), on_step=crash)
    train(small_config(sotu, tmp_path / "broken", *common))
    assert _losses(tmp_path / "broken") == _losses(tmp_path / "whole")
    for name, value in load_file(tmp_path / "whole/final/model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "broken/final/model.safetensors")[name]), name


@pytest.mark.slow
def test_two_processes_with_fsdp_match_one_process(sotu, tmp_path):
    common = ["steps=8", "eval_tokens=384", "ckpt_interval=4"]
    train(small_config(sotu, tmp_path / "one", "grad_accum=2", *common))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    launched = _run([
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relscale.train",
        str(empty), *small_overrides(sotu, tmp_path / "two", "grad_accum=1", *common),
    ])
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-5), step
    results = [json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two")]
    assert results[1]["final_val_loss"] == pytest.approx(results[0]["final_val_loss"], rel=2e-5)
    assert results[1]["tokens"] == results[0]["tokens"] == 8 * 8 * 32
    # The full state dict gathered from the shards is the single-process model.
    weights = [load_file(tmp_path / d / "final/model.safetensors") for d in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
    assert latest_checkpoint(tmp_path / "two").name == "step_0000008"


def test_fused_triton_loss_with_an_fsdp2_sharded_output_weight(sotu, tmp_path):
    """The Triton fused linear cross-entropy under FSDP2 (2 processes, the output weight sharded
    and gathered by FSDP before use; Triton's interpreter on CPU) gives the losses of the
    single-process torch-reference run."""
    common = ["steps=4", "eval_tokens=256", "ckpt_interval=4"]
    train(small_config(sotu, tmp_path / "one", "grad_accum=2", *common))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    launched = _run(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relscale.train",
         str(empty), *small_overrides(sotu, tmp_path / "two", "grad_accum=1", *common,
                                      "model.kernels.cross_entropy='triton'", "model.fused_loss=true")],
    )  # the environment carries TRITON_INTERPRET=1 on a machine without a GPU (tests/conftest.py)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_two_processes(sotu, tmp_path):
    # DCP reshards the plain model's checkpoint onto FSDP; the loader continues with the new layout.
    common = ["steps=8", "eval_tokens=384", "ckpt_interval=4"]
    reference = small_config(sotu, tmp_path / "one", "grad_accum=2", *common)
    train(reference)

    def crash(step, model):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(sotu, tmp_path / "mixed", "grad_accum=2", *common), on_step=crash)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    launched = _run([
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relscale.train",
        str(empty), *small_overrides(sotu, tmp_path / "mixed", "grad_accum=1", *common), "--resume",
    ])
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, mixed = _losses(tmp_path / "one"), _losses(tmp_path / "mixed")
    assert sorted(mixed) == list(range(1, 9))
    for step in one:
        assert mixed[step] == pytest.approx(one[step], rel=2e-5), step


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_compiled_blocks_match_eager(sotu, tmp_path):
    eager = train(small_config(sotu, tmp_path / "eager", "steps=4"))
    compiled = train(small_config(sotu, tmp_path / "compiled", "steps=4", "compile=true"))
    for step, loss in _losses(tmp_path / "eager").items():
        assert _losses(tmp_path / "compiled")[step] == pytest.approx(loss, rel=1e-4)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-4)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(sotu, tmp_path):
    cfg = small_config(sotu, tmp_path, "ckpt_interval=2", "steps=10")

    def poison(step, model):
        if step == 3:
            with torch.no_grad():
                model.blocks[0].mlp.w_up.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="step 4") as info:
        train(cfg, on_step=poison)
    assert info.value.step == 4
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["status"] == "diverged" and stored["steps"] == 3 and stored["final_train_loss"] is None
    assert stored["diverged_step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    assert max(_losses(tmp_path)) == 3  # nothing logged for the diverged step
    with pytest.raises(TrainingDiverged):  # the stored outcome stands
        train(cfg)


def test_config_and_data_errors_name_the_problem(sotu, tmp_path):
    with pytest.raises(ConfigError, match="model.hiden: unknown key"):
        small_config(sotu, tmp_path, "model.hiden=64")
    with pytest.raises(ConfigError, match="steps: expected int"):
        small_config(sotu, tmp_path, "steps='ten'")
    with pytest.raises(ConfigError, match="model.heads.*hidden=30 is not divisible by heads=4"):
        small_config(sotu, tmp_path, "model.hidden=30", "model.heads=4")
    with pytest.raises(ConfigError, match="model.vocab_size: 512 differs .* 4096"):
        train(small_config(sotu, tmp_path, "model.vocab_size=512"))
    missing = tmp_path / "no_such_data"
    with pytest.raises(DataError, match=str(missing)):
        train(small_config(missing, tmp_path / "run"))
    assert not (tmp_path / "run" / "result.json").exists()


@pytest.mark.slow
def test_cli_errors_exit_2_with_the_message(tmp_path):
    bad_key = _run(["-m", "relscale", "train", str(REPO / "configs/tiny.toml"), "optim.learning_rate=1"])
    assert bad_key.returncode == 2
    assert "optim.learning_rate: unknown key" in bad_key.stderr and "Traceback" not in bad_key.stderr
    missing = tmp_path / "missing_data"
    bad_data = _run([
        "-m", "relscale.train", str(REPO / "configs/tiny.toml"), f"data.path={str(missing)!r}",
        f"out_dir={str(tmp_path / 'run')!r}",
    ])
    assert bad_data.returncode == 2
    assert str(missing) in bad_data.stderr and "Traceback" not in bad_data.stderr


def test_shipped_configs_are_valid():
    from relscale.data.prepare import DEFAULT_VOCAB_SIZE

    tiny = load_train_config(REPO / "configs/tiny.toml")
    assert tiny.model.vocab_size == DEFAULT_VOCAB_SIZE and tiny.data.path == "relscale_data/sotu"
    gpu = load_train_config(REPO / "configs/small-gpu.toml")
    assert gpu.dtype == "bf16" and gpu.device == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_on_gpu(sotu, tmp_path):
    cfg = small_config(sotu, tmp_path, "device='cuda'", "dtype='bf16'", "steps=30", "optim.lr=1e-2")
    result = train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert result.final_train_loss < records[0]["loss"] - 0.5
    assert records[-1]["peak_mem_mb"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_bf16_on_one_gpu_matches_autocast(sotu, tmp_path):
    # torchrun with one process: a process group, FSDP2 and bf16 parameters (fp32 master weights)
    # against the plain module under autocast: both bf16 compute, so close, not equal.
    common = ["device='cuda'", "dtype='bf16'", "steps=10", "optim.lr=1e-2"]
    train(small_config(sotu, tmp_path / "plain", *common))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    launched = _run([
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "relscale.train",
        str(empty), *small_overrides(sotu, tmp_path / "fsdp", *common),
    ])
    assert launched.returncode == 0, launched.stderr[-3000:]
    plain, fsdp = _losses(tmp_path / "plain"), _losses(tmp_path / "fsdp")
    for step in plain:
        assert fsdp[step] == pytest.approx(plain[step], rel=2e-2), step


def test_dump_steps_write_per_example_dumps_during_training(sotu, tmp_path):
    """TrainConfig.dump_steps through ``relscale train`` (the CLI attaches relscale.eval's dump
    hook; the trainer knows only on_step): dumps of the held-out split at those steps, with the
    tokens seen so far (tests/eval checks the dumped numbers against the checkpoint's weights)."""
    import pandas as pd

    from relscale.cli import main

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    overrides = small_overrides(sotu, tmp_path / "run", "steps=6", "dump_steps=[2, 4]", "ckpt_interval=4")
    assert main(["train", str(empty), *overrides]) == 0
    dumps = sorted((tmp_path / "run" / "evals").rglob("*.parquet"))
    assert [p.stem.rsplit("@", 1)[-1] for p in dumps] == ["step_0000002", "step_0000004"]
    frames = {p.stem: pd.read_parquet(p) for p in dumps}
    tokens_per_step = 4 * 32
    for stem, frame in frames.items():
        step = int(stem.rsplit("_", 1)[-1])
        assert (frame["tokens"] == step * tokens_per_step).all()
        assert frame["nll"].gt(0).all() and frame["n_bytes"].gt(0).all()
    early, late = (frames[p.stem] for p in dumps)
    assert late["nll"].sum() < early["nll"].sum()  # the model learns between steps 2 and 4
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "done"


def test_train_calls_every_on_step_hook_in_order_and_ignores_dump_steps(sotu, tmp_path):
    """train() runs the hooks it is given, in order, after every step, and nothing else: with
    dump_steps set but no dump hook passed, it writes no dumps (that is the caller's job)."""
    calls = []
    hooks = [lambda step, model: calls.append(("a", step)), lambda step, model: calls.append(("b", step))]
    cfg = small_config(sotu, tmp_path / "run", "steps=3", "dump_steps=[2]", "ckpt_interval=3")
    assert train(cfg, on_step=hooks).status == "done"
    assert calls == [(name, step) for step in (1, 2, 3) for name in ("a", "b")]
    assert not (tmp_path / "run" / "evals").exists()
    with pytest.raises(TypeError, match="on_step"):
        train(cfg, on_step=[1])


def test_trainer_never_imports_the_eval_package():
    """The trainer (every module of relscale.train but the command layer, cli.py) and model_io
    import nothing from relscale.eval, neither at import time nor inside functions."""
    import ast

    for path in sorted((REPO / "relscale" / "train").glob("*.py")) + [REPO / "relscale" / "model_io.py"]:
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n == "relscale.eval" or n.startswith("relscale.eval.") for n in names), path
    code = ("import sys, relscale.train.loop, relscale.train.checkpoint, relscale.model_io; "
            "print(sorted(m for m in sys.modules if m.startswith('relscale.eval')))")
    out = _run(["-c", code])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_train_by_packaged_name_outside_a_clone(sotu, tmp_path):
    """``relscale train tiny`` from a folder without configs/: the shipped config is found by name
    (its model shape and schedule), overrides apply on top, and the run folder holds the config
    it trained with."""
    from relscale.config import read_toml
    from relscale.train import run_dir

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    out = tmp_path / "run"
    shipped = read_toml(REPO / "relscale" / "configs" / "tiny.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "relscale", "train", "tiny", "steps=2", f"data.path={str(sotu)!r}",
         f"out_dir={str(out)!r}", "eval_tokens=256", "log_interval=1"],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stored = run_dir.read_train_config(out)
    assert stored["model"]["hidden"] == shipped["model"]["hidden"]
    assert stored["optim"]["schedule"] == shipped["optim"]["schedule"] and stored["steps"] == 2
    assert run_dir.read_result(out)["steps"] == 2
    missing = _run(["-m", "relscale", "train", "no-such-config"])
    assert missing.returncode == 2 and "no-such-config: config file not found" in missing.stderr
    assert "tiny" in missing.stderr


@pytest.mark.slow
def test_validation_loss_and_c_adamc_do_not_depend_on_the_batch_layout(sotu, tmp_path):
    """One run of global batch 4 laid out as (micro_batch, grad_accum) = (1, 4), (4, 1) and as two
    FSDP2 processes of (2, 1), with C-AdamC: the same losses and weights (the cautious mask's mean
    is over whole tensors, not shards) and the same validation loss to 1e-5 (the same held-out
    windows whatever the layout; eval_tokens=640 is 20 windows, not a multiple of any batch)."""
    common = ["steps=6", "eval_tokens=640", "ckpt_interval=6", "optim.name='c_adamc'", "optim.lr=1e-2"]
    layouts = {"a": ["micro_batch=1", "grad_accum=4"], "b": ["micro_batch=4", "grad_accum=1"]}
    for name, layout in layouts.items():
        train(small_config(sotu, tmp_path / name, *layout, *common))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    launched = _run([
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "relscale.train",
        str(empty), *small_overrides(sotu, tmp_path / "two", "micro_batch=2", "grad_accum=1", *common),
    ])
    assert launched.returncode == 0, launched.stderr[-3000:]
    runs = ["a", "b", "two"]
    results = {d: json.loads((tmp_path / d / "result.json").read_text()) for d in runs}
    losses = {d: _losses(tmp_path / d) for d in runs}
    for d in runs[1:]:
        assert sorted(losses[d]) == list(range(1, 7))
        for step, loss in losses["a"].items():
            assert losses[d][step] == pytest.approx(loss, rel=2e-5), (d, step)
        assert results[d]["final_val_loss"] == pytest.approx(results["a"]["final_val_loss"], rel=1e-5), d
    # Weights: with eps 1e-15 Adam turns the rounding noise of near-zero gradients into O(lr)-scale
    # relative changes, so a handful of elements (measured: <= 8 of 3e5) move by ~1e-4; a mask mean
    # taken over a shard instead of the whole tensor would rescale every update by ~1%.
    weights = {d: load_file(tmp_path / d / "final/model.safetensors") for d in runs}
    total = sum(v.numel() for v in weights["a"].values())
    for d in runs[1:]:
        off = 0
        for name, value in weights["a"].items():
            diff = (weights[d][name] - value).abs()
            assert float(diff.max()) < 1e-3, (d, name)
            off += int((diff > 1e-5 + 1e-4 * value.abs()).sum())
        assert off <= 1e-4 * total, (d, off)
    stored = json.loads((tmp_path / "two/final/config.json").read_text())
    assert stored["meta"]["train_config"]["optim"]["name"] == "c_adamc"


def test_a_second_trainer_on_the_same_out_dir_refuses(sotu, tmp_path):
    """While a run trains, `relscale train` on its out_dir exits 2 naming the out_dir; the first run
    keeps every metric record (before the lock, the second unlinked the first's metrics.jsonl)."""
    cfg = small_config(sotu, tmp_path / "run", "steps=6", "log_interval=1")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    second = {}

    def launch_second(step, model):
        if step == 2:
            second["proc"] = _run(["-m", "relscale.train", str(empty),
                                   *small_overrides(sotu, tmp_path / "run", "steps=6")])

    result = train(cfg, on_step=launch_second)
    proc = second["proc"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(tmp_path / "run") in proc.stderr and "in use by another training run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert result.status == "done" and sorted(_losses(tmp_path / "run")) == list(range(1, 7))
    # The lock goes with the run: afterwards the finished run is reported as it is.
    assert train(cfg).wall_s == result.wall_s


def test_a_non_finite_final_validation_loss_is_not_done(sotu, tmp_path):
    from relscale.train import NonFiniteValidationLoss

    cfg = small_config(sotu, tmp_path, "steps=4", "ckpt_interval=2")

    def poison(step, model):
        if step == 4:  # after the last optimizer step: the training loss of step 4 was finite
            with torch.no_grad():
                model.norm.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteValidationLoss, match="validation loss is nan after step 4"):
        train(cfg, on_step=poison)
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["status"] == "diverged" and stored["final_val_loss"] is None
    assert stored["diverged_on"] == "validation" and stored["diverged_step"] == 4
    assert not (tmp_path / "final").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    with pytest.raises(TrainingDiverged):  # the stored outcome stands
        train(cfg)


def test_marin_preset_config_trains_on_the_cpu(sotu, tmp_path):
    """The marin sweep's run template (C-AdamC, Llama-3 RoPE, RMSNorm eps 1e-5) on a tiny shape
    trains a few steps; the stored config carries the optimizer and RoPE scaling it used."""
    import copy
    from dataclasses import replace

    from relscale.sweep.presets import marin

    cfg = copy.deepcopy(marin().train)
    cfg.model = replace(cfg.model, vocab_size=4096, hidden=32, layers=2, heads=2, max_seq_len=32)
    cfg.data = replace(cfg.data, path=str(sotu), seq_len=32)
    cfg.optim = replace(cfg.optim, lr=1e-2)
    cfg.steps, cfg.micro_batch, cfg.eval_tokens, cfg.ckpt_interval = 6, 4, 256, 0
    cfg.out_dir, cfg.log_interval = str(tmp_path), 1
    result = train(cfg)
    losses = _losses(tmp_path)
    assert result.status == "done" and losses[6] < losses[1] - 0.3
    stored = json.loads((tmp_path / "final/config.json").read_text())["meta"]["train_config"]
    assert stored["optim"]["name"] == "c_adamc" and stored["optim"]["eps"] == 1e-15
    assert stored["model"]["rope_scaling"] == {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert stored["model"]["rope_theta"] == 500000.0 and stored["model"]["norm_eps"] == 1e-5


def test_activation_checkpointing_trains_the_same_model(sotu, tmp_path):
    plain = train(small_config(sotu, tmp_path / "plain", "steps=3"))
    recomputed = train(small_config(sotu, tmp_path / "ckpt", "steps=3", "activation_checkpointing=true"))
    for step, loss in _losses(tmp_path / "plain").items():
        assert _losses(tmp_path / "ckpt")[step] == pytest.approx(loss, rel=1e-6)
    assert recomputed.final_val_loss == pytest.approx(plain.final_val_loss, rel=1e-6)


def test_threads_flag(sotu, tmp_path):
    from relscale.train.__main__ import main
    from relscale.train.cli import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # the default keeps what torch has
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main([str(REPO / "configs/tiny.toml"), "--threads", "0"]) == 2


def test_a_garbage_result_file_is_named(sotu, tmp_path):
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(DataError, match=r"result.json: unreadable run result"):
        train(small_config(sotu, tmp_path, "steps=2"))
    assert (tmp_path / "result.json").read_text() == "{not json"
