"""End to end: dumps of a model dir, a sweep, a run's DCP checkpoints, a HF export and the
training hook; columns as COMMON.md lists them; finished dumps are never overwritten."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from relscale.cli import main
from relscale.config import DataConfig, TrainConfig
from relscale.counting import param_counts, run_flops
from relscale.data import PreparedData
from relscale.eval.hook import make_dump_hook
from relscale.eval.options import RunOptions
from relscale.eval.runner import evaluate
from relscale.eval.writer import read_settings
from relscale.model_io import load_model, save_model

from .conftest import SEQ_LEN, tiny_config, tiny_model, windowed_reference

COMMON_COLUMNS = [
    "model_id",
    "params",
    "non_embedding_params",
    "tokens",
    "flops_train",
    "flops_marin",
    "budget",
    "hidden",
    "layers",
    "dataset",
    "group",
    "example_id",
]
TEXT_METRICS = ["nll", "n_tokens", "n_bytes", "bpb"]
MC_METRICS = ["choice_logprobs", "choice_logprobs_norm", "logprob_correct", "prob_correct", "acc"]


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "quiz.jsonl"
    rows = [
        {
            "question": f"the {w} of",
            "choices": ["union", "war", "trade"],
            "answer": i % 3,
            "group": f"g{i % 2}",
        }
        for i, w in enumerate(["nation", "people", "state", "law"])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def opts_for(out, **kw) -> RunOptions:
    return RunOptions(out_dir=out, quiet=True, **kw)


def test_model_dir_dumps_columns_values_and_no_overwrite(tmp_path, model_dir, data_dir, mc_file, capsys):
    out = tmp_path / "evals"
    outcomes = evaluate([model_dir], ["default", f"mc:{mc_file}"], RunOptions(out_dir=out))
    printed = capsys.readouterr().out
    assert "grouping" in printed and "bpb" in printed and "prob_correct" in printed  # summary tables
    text_path, mc_path = (o.path for o in outcomes)
    assert text_path == out / "tinydata-val" / "tiny.parquet" and mc_path == out / "quiz" / "tiny.parquet"

    text = pd.read_parquet(text_path)
    assert set(COMMON_COLUMNS + ["grouping"] + TEXT_METRICS) <= set(text.columns)
    data = PreparedData(data_dir)
    index = data.documents("val")
    assert len(text) == 2 * len(index)  # one row per example per grouping (century, kind)
    assert sorted(text.grouping.unique()) == ["century", "kind"]
    model, meta = load_model(model_dir)
    counts = param_counts(model.cfg)
    first = text.iloc[0]
    assert (first.model_id, first.params, first.non_embedding_params) == (
        "tiny",
        counts.total,
        counts.non_embedding,
    )
    assert (first.tokens, first.flops_train, first.flops_marin) == (12345, 1.5e9, 5e8)
    assert math.isnan(first.budget) and first.hidden == 32 and first.layers == 2
    century = text[text.grouping == "century"].set_index("example_id")
    for row in range(0, len(index), 5):  # the dump equals direct scoring of [EOS] + document
        doc = index.iloc[row]
        tokens = np.concatenate([[data.eos_id], data.doc_tokens("val", row)])
        got = century.loc[doc.doc_id]
        assert got.group == doc.century and got.n_bytes == doc.n_bytes and got.n_tokens == doc.length
        expected = windowed_reference(model, tokens, 1, SEQ_LEN, SEQ_LEN)  # lm-eval windows
        assert got.nll == pytest.approx(expected, rel=2e-6)
        assert got.bpb == pytest.approx(got.nll / (math.log(2) * got.n_bytes))
    settings = read_settings(text_path)
    assert settings["context"] == SEQ_LEN and settings["stride"] == SEQ_LEN
    assert settings["start_id"] == data.eos_id

    mc = pd.read_parquet(mc_path)
    assert set(COMMON_COLUMNS + MC_METRICS) <= set(mc.columns) and len(mc) == 4
    assert all(len(v) == 3 for v in mc.choice_logprobs)
    assert all(max(v) < 0 for v in mc.choice_logprobs)
    probs = [np.exp(v)[a] / np.exp(v).sum() for v, a in zip(mc.choice_logprobs, mc.answer)]
    np.testing.assert_allclose(mc.prob_correct, probs, rtol=1e-9)

    before = text_path.stat().st_mtime_ns, text_path.read_bytes()
    again = evaluate([model_dir], ["default", f"mc:{mc_file}"], opts_for(out))
    assert [o.status for o in again] == ["exists", "exists"]
    assert (text_path.stat().st_mtime_ns, text_path.read_bytes()) == before
    forced = evaluate([model_dir], ["default"], opts_for(out, force=True))
    assert forced[0].status == "written"
    pd.testing.assert_frame_equal(pd.read_parquet(text_path), text)  # deterministic


def test_batching_options_do_not_change_the_dump(tmp_path, model_dir):
    a = evaluate([model_dir], ["default"], opts_for(tmp_path / "a", batch_tokens=SEQ_LEN))[0].path
    b = evaluate([model_dir], ["default"], opts_for(tmp_path / "b", batch_tokens=4096, pack_len=100))[0].path
    np.testing.assert_allclose(pd.read_parquet(a).nll, pd.read_parquet(b).nll, rtol=1e-5)


def test_sweep_directory_evaluates_finished_runs(tmp_path, model_dir, tokenizer):
    from relscale.sweep.results import SCHEMA

    sweep = tmp_path / "sweep"
    rows = []
    for i, (run_id, status) in enumerate([("r1", "done"), ("r2", "done"), ("r3", "failed")]):
        final = sweep / "runs" / run_id / "final"
        if status == "done":
            _, meta = load_model(model_dir)
            save_model(tiny_model(tokenizer.get_vocab_size(), seed=10 + i), final, meta)
        rows.append(
            {"run_id": run_id, "status": status, "budget": 1e15 * (i + 1), "run_dir": f"runs/{run_id}"}
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sweep / "results.parquet")
    assert main(["eval", str(sweep), "--quiet"]) == 0  # default: the held-out split, into SWEEP/evals
    dumps = pd.read_parquet(sweep / "evals" / "tinydata-val")
    assert sorted(dumps.model_id.unique()) == ["r1", "r2"]
    assert dumps.groupby("model_id").budget.first().to_dict() == {"r1": 1e15, "r2": 2e15}
    r1, r2 = (dumps[dumps.model_id == r].nll.to_numpy() for r in ("r1", "r2"))
    assert not np.allclose(r1, r2)  # different weights, different dumps


def test_hf_export_scores_like_the_original(tmp_path, model_dir, corpus):
    hf_dir = tmp_path / "hf" / "tiny-hf"
    assert main(["eval", str(model_dir), "--export-hf", str(hf_dir), "--quiet"]) == 0
    assert (hf_dir / "tokenizer.json").is_file()
    ours = evaluate([model_dir], [f"docs=text:{corpus}"], opts_for(tmp_path / "o"))[0].path
    theirs = evaluate([hf_dir], [f"docs=text:{corpus}"], opts_for(tmp_path / "o"))[0].path
    a, b = pd.read_parquet(ours), pd.read_parquet(theirs)
    assert b.model_id.iloc[0] == "tiny-hf" and b.tokens.iloc[0] == 12345  # meta travels with the export
    np.testing.assert_allclose(a.nll, b.nll, rtol=1e-6)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir, tokenizer):
    from relscale.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(
        model=tiny_config(tokenizer.get_vocab_size()),
        data=DataConfig(path=str(data_dir), seq_len=SEQ_LEN),
        steps=4,
        micro_batch=2,
        ckpt_interval=2,
        out_dir=str(root / "run"),
        device="cpu",
        progress=False,
        eval_batches=1,
    )
    tokens_per_step = cfg.micro_batch * SEQ_LEN
    hook = make_dump_hook(
        "default",
        root / "hook",
        [2, 4],
        data_path=data_dir,
        run_id="run",
        seq_len=SEQ_LEN,
        tokens_per_step=tokens_per_step,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: see conftest.one_thread
    try:
        train(cfg, on_step=hook)
    finally:
        torch.set_num_threads(threads)
    return root, cfg


def test_training_hook_checkpoints_and_final_agree(trained_run, tmp_path):
    root, cfg = trained_run
    hook_dir = root / "hook" / "tinydata-val"
    assert sorted(p.name for p in hook_dir.glob("*.parquet")) == [
        "run@step_0000002.parquet",
        "run@step_0000004.parquet",
    ]
    outcomes = evaluate([root / "run"], ["default"], opts_for(tmp_path))
    assert [o.model_id for o in outcomes] == ["run"]
    outcomes = evaluate([root / "run"], ["default"], opts_for(tmp_path), checkpoints=True)
    assert [(o.model_id, o.status) for o in outcomes] == [("run@step_0000004", "written"), ("run", "exists")]
    hooked = pd.read_parquet(hook_dir / "run@step_0000004.parquet")
    ckpt = pd.read_parquet(outcomes[0].path)
    final = pd.read_parquet(outcomes[1].path)
    np.testing.assert_allclose(hooked.nll, final.nll, rtol=1e-6)  # the hook saw the final weights
    np.testing.assert_allclose(ckpt.nll, final.nll, rtol=1e-6)  # so does the DCP checkpoint
    early = pd.read_parquet(hook_dir / "run@step_0000002.parquet")
    assert not np.allclose(early.nll, final.nll)
    expected = run_flops(cfg.model, SEQ_LEN, 4 * cfg.micro_batch * SEQ_LEN)
    for frame in (hooked, ckpt, final):
        assert frame.tokens.iloc[0] == expected.tokens
        assert frame.flops_train.iloc[0] == pytest.approx(expected.flops_train)
        assert frame.flops_marin.iloc[0] == pytest.approx(expected.flops_marin)
    assert ckpt.step.iloc[0] == 4 and early.step.iloc[0] == 2 and pd.isna(final.step.iloc[0])


def test_user_errors_exit_2(tmp_path, model_dir, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert (
        main(["eval", str(model_dir), "--eval", f"text:{bad}", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    )
    assert f"{bad}, row 2" in capsys.readouterr().err
    assert (
        main(["eval", str(model_dir), "--eval", f"text:{bad}", "--out", str(tmp_path / "o"), "--skip-bad"])
        == 0
    )
    assert "skipped 1 malformed row" in capsys.readouterr().out
    assert (tmp_path / "o" / "bad" / "bad_rows.jsonl").is_file()
    assert len(pd.read_parquet(tmp_path / "o" / "bad" / "tiny.parquet")) == 1


def test_default_set_without_its_data_folder_says_to_pass_data(tmp_path):
    # A run folder moved without its prepared data: the hint is --data, not re-running prepare.
    from relscale.errors import DataError
    from relscale.eval.sets import SetOptions, load_eval_set

    with pytest.raises(DataError, match=r"gone is not a prepared data folder .*pass --data DIR"):
        load_eval_set("default", SetOptions(data_dir=tmp_path / "gone"))
