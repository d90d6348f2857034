"""The run-folder contract (relscale.train.run_dir): what the trainer writes is what it names,
read without torch, and a moved run folder still holds everything needed to load the model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from relscale.config import to_dict
from relscale.errors import DataError
from relscale.train import run_dir
from tests.train.conftest import REPO, small_config


@pytest.fixture(scope="module")
def trained(sotu, tmp_path_factory):
    from relscale.train import train

    out = tmp_path_factory.mktemp("rundir") / "run"
    cfg = small_config(sotu, out, "steps=4", "ckpt_interval=2", "log_interval=2")
    return cfg, train(cfg), out


def test_the_contract_imports_no_torch():
    code = "import sys, relscale.train.run_dir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_run_folder_holds_what_the_contract_names(trained):
    cfg, result, out = trained
    assert run_dir.is_run_dir(out) and not run_dir.is_run_dir(out / "final")
    assert run_dir.read_train_config(out) == json.loads(json.dumps(to_dict(cfg)))
    stored = run_dir.read_result(out)
    assert stored["status"] == result.status == "done" and stored["steps"] == 4
    assert [r["step"] for r in run_dir.read_metrics(out) if "loss" in r] == [2, 4]
    # only the newest complete checkpoint is kept; its fingerprint names the model shape
    (latest,) = run_dir.list_checkpoints(out)
    assert latest.step == 4 and latest.path == run_dir.step_dir(out, 4) and latest.path.is_dir()
    assert latest.fingerprint()["model.hidden"] == cfg.model.hidden == 32
    assert latest.meta()["step"] == 4 and run_dir.latest_checkpoint(out) == latest
    assert run_dir.is_model_folder(run_dir.final_dir(out))
    tokenizer, eos_id = run_dir.model_tokenizer(run_dir.final_dir(out))
    assert tokenizer == run_dir.final_dir(out) / run_dir.TOKENIZER and isinstance(eos_id, int)
    config = run_dir.read_model_folder_config(run_dir.final_dir(out))
    assert config["tokenizer"]["file"] == "tokenizer.json"  # relative: the folder can move


def test_list_checkpoints_skips_incomplete_and_foreign_folders(tmp_path):
    root = run_dir.checkpoints_dir(tmp_path)
    for step in (30, 5, 120):
        run_dir.step_dir(tmp_path, step).mkdir(parents=True)
        (run_dir.step_dir(tmp_path, step) / run_dir.CHECKPOINT_META).write_text(json.dumps({"step": step}))
    run_dir.step_dir(tmp_path, 200).mkdir()  # being written: no checkpoint.json yet
    (root / ".tmp_step_0000300").mkdir()
    (root / "step_12").mkdir()  # not the trainer's name
    assert [c.step for c in run_dir.list_checkpoints(tmp_path)] == [5, 30, 120]
    assert run_dir.latest_checkpoint(tmp_path).step == 120
    assert run_dir.list_checkpoints(tmp_path / "none") == []
    assert run_dir.latest_checkpoint(tmp_path / "none") is None
    (run_dir.step_dir(tmp_path, 30) / run_dir.CHECKPOINT_META).write_text("{oops")
    with pytest.raises(DataError, match=r"step_0000030/checkpoint\.json: unreadable checkpoint metadata"):
        run_dir.list_checkpoints(tmp_path)[1].meta()


def test_unreadable_files_are_named(tmp_path):
    assert run_dir.read_result(tmp_path) is None and run_dir.read_train_config(tmp_path) is None
    run_dir.result_path(tmp_path).write_text("[1, 2]")
    with pytest.raises(DataError, match=r"result\.json: unreadable run result \(a JSON list, not an obj"):
        run_dir.read_result(tmp_path)
    run_dir.result_path(tmp_path).write_text('{"steps": 3}')
    with pytest.raises(DataError, match=r"result\.json: not a run result \(no status\)"):
        run_dir.read_result(tmp_path)
    run_dir.metrics_path(tmp_path).write_text('{"step": 1}\nbad\n{"step": 3}\n{"step": 4, "lo')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: unreadable metrics record"):
        run_dir.read_metrics(tmp_path)
    run_dir.metrics_path(tmp_path).write_text('{"step": 1}\n{"step": 2, "lo')  # cut short by a crash
    assert run_dir.read_metrics(tmp_path) == [{"step": 1}]
    final = run_dir.final_dir(tmp_path)
    final.mkdir()
    (final / run_dir.WEIGHTS).write_bytes(b"")
    (final / run_dir.MODEL_CONFIG).write_text("{")
    with pytest.raises(DataError, match=r"final/config\.json: unreadable model config"):
        run_dir.is_model_folder(final)


def test_a_moved_run_folder_loads_with_its_own_tokenizer(trained, tmp_path):
    """A copy of the run folder elsewhere loads the same weights and finds its tokenizer next to
    them: nothing in final/ that loading needs points outside it (eval's side of this:
    tests/eval/test_hub_layout.py's moved-run-folder test)."""
    import torch

    from relscale.model_io import load_model, read_model_tokenizer

    _, _, out = trained
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(out, moved)
    model, meta = load_model(run_dir.final_dir(moved))
    original, _ = load_model(run_dir.final_dir(out))
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    path, _ = read_model_tokenizer(run_dir.final_dir(moved))
    assert path == run_dir.final_dir(moved) / "tokenizer.json"
    assert path.read_bytes() == (run_dir.final_dir(out) / "tokenizer.json").read_bytes()
