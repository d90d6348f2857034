"""relscale's scores equal lm-evaluation-harness's (``--model hf``, default settings,
``--log_samples``) on random-init transformers Qwen3 and Llama checkpoints with a local BPE:
MMLU-format 5-shot (a question with a trailing space), Anthropic advanced-ai-risk, a template
ending in a space, and rolling log-likelihood with several windows -- per choice and per
document to 1e-4 nats. lm-eval runs through its Python API on local YAML tasks, offline."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from relscale.eval.options import RunOptions
from relscale.eval.runner import evaluate
from relscale.eval.sets import SetOptions

from .lmeval_fixtures import (
    TASKS,
    build_tokenizer,
    run_lm_eval,
    sample_logprobs,
    sample_pairs,
    write_hf_model,
    write_tasks,
)

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (extra: pip install 'relscale[lmeval]')"
)
pytest.importorskip("transformers", reason="transformers is not installed (extra: relscale[interop])")
pytest.importorskip("accelerate", reason="lm-eval's HF model needs accelerate (extra: relscale[lmeval])")

TOL = 1e-4  # nats


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {
        k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")
    }
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lmeval_tasks"))


def relscale_dumps(model_dir, files, out) -> dict[str, pd.DataFrame]:
    """relscale eval on the same data, each set with its layout's defaults (as a user would)."""
    runs = {
        "mmlu": (f"mmlu:{files['mmlu']}", SetOptions(shots=5)),
        "ai_risk": (f"anthropic:{files['ai_risk']}", SetOptions()),
        "spaced": (
            f"spaced=mc:{files['spaced']}",
            SetOptions(template="Question: {question}\nAnswer: ", choice_sep=""),
        ),
        "rolling": (f"text:{files['texts']}", SetOptions()),
    }
    frames = {}
    for key, (spec, sets) in runs.items():
        outcomes = evaluate([model_dir], [spec], RunOptions(out_dir=out, sets=sets, quiet=True))
        frame = pd.read_parquet(outcomes[0].path)
        first = frame.grouping.iloc[0]
        frames[key] = frame[frame.grouping == first].reset_index(drop=True)
    return frames


def lm_eval_by_context(samples: list[dict]) -> dict[str, dict]:
    return {sample_pairs(s)[0][0]: s for s in samples}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_per_choice_and_rolling_loglikelihoods_equal_lm_eval_hf(tmp_path, bpe, task_files, family):
    model_dir = write_hf_model(tmp_path / family, family, bpe, seed=1 if family == "llama" else 0)
    ours = relscale_dumps(model_dir, task_files, tmp_path / "evals")
    theirs = run_lm_eval("hf", f"pretrained={model_dir},dtype=float32", task_files["tasks"], TASKS)["samples"]

    # The spaced word is one token, so the boundary rule matters for the template ending in " ".
    assert len(bpe.encode(" Paris").ids) == 1

    mmlu = {
        **lm_eval_by_context(theirs["t_mmlu_anatomy"]),
        **lm_eval_by_context(theirs["t_mmlu_world_religions"]),
    }
    checks = [
        ("mmlu", mmlu),
        ("ai_risk", lm_eval_by_context(theirs["t_ai_risk"])),
        ("spaced", lm_eval_by_context(theirs["t_spaced"])),
    ]
    for key, reference in checks:
        frame = ours[key]
        assert len(frame) == len(reference), key
        for row in frame.itertuples():
            sample = reference[row.prompt]  # the rendered prompts are identical strings
            assert [c for _, c in sample_pairs(sample)] == list(row.choices), key
            np.testing.assert_allclose(
                row.choice_logprobs, sample_logprobs(sample), atol=TOL, rtol=0, err_msg=key
            )
            assert row.acc == sample["acc"], key
            if "acc_norm" in sample:
                assert row.acc_norm == sample["acc_norm"], key
    # the MMLU question with a trailing space is stripped in its own prompt and as a shot
    assert any("? \n" not in p and "?\nA." in p for p in ours["mmlu"].prompt)
    assert not any("? \nA." in p for p in ours["mmlu"].prompt)

    rolling = {s["doc"]["id"]: -sample_logprobs(s)[0] for s in theirs["t_rolling"]}
    frame = ours["rolling"].set_index("example_id")
    assert sorted(frame.index) == sorted(rolling)
    assert frame.n_tokens.max() > 2 * 128, "a document must need several windows"
    for doc_id, nll in rolling.items():
        assert frame.loc[doc_id, "nll"] == pytest.approx(nll, abs=TOL), doc_id


def _flat_responses(samples: list[dict]) -> list[tuple]:
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        for resp in sample["filtered_resps"]:
            out.append(tuple(resp) if isinstance(resp, list | tuple) else (resp,))
    return out


@pytest.mark.slow
def test_model_relscale_equals_model_hf_on_its_export(tmp_path, bpe, task_files):
    """``--model relscale`` on a relscale checkpoint gives what ``--model hf`` gives on its HF
    export: every request's log-likelihood (1e-4 nats), is_greedy, and every task metric."""
    import relscale.eval.lmeval  # noqa: F401 -- registers --model relscale
    from relscale.eval.hf import export_hf
    from relscale.model_io import save_model

    from .conftest import tiny_model
    from .lmeval_fixtures import MAX_LEN

    tok_path = tmp_path / "tokenizer.json"
    bpe.save(str(tok_path))
    model = tiny_model(bpe.get_vocab_size(), seed=3, max_seq_len=MAX_LEN)
    final = tmp_path / "run" / "final"
    save_model(model, final, {"tokens": 1000})
    export_hf(model, tmp_path / "hf", tokenizer_path=tok_path, eos_token="<|endoftext|>")
    ours = run_lm_eval("relscale", f"pretrained={final},tokenizer={tok_path}", task_files["tasks"], TASKS)
    theirs = run_lm_eval("hf", f"pretrained={tmp_path / 'hf'},dtype=float32", task_files["tasks"], TASKS)
    for task in TASKS:
        got, expected = _flat_responses(ours["samples"][task]), _flat_responses(theirs["samples"][task])
        assert len(got) == len(expected) > 0, task
        np.testing.assert_allclose(
            [g[0] for g in got], [e[0] for e in expected], atol=TOL, rtol=0, err_msg=task
        )
        if len(got[0]) > 1:  # loglikelihood requests: is_greedy too
            assert [g[1] for g in got] == [e[1] for e in expected], task
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                    task,
                    metric,
                )
    assert ours["config"]["relscale_model_id"] == "run"


def test_generation_is_refused_with_a_clear_message(tmp_path, bpe):
    from relscale.eval.lmeval import RelscaleLM
    from relscale.model_io import save_model

    from .conftest import tiny_model

    tok_path = tmp_path / "tokenizer.json"
    bpe.save(str(tok_path))
    save_model(tiny_model(bpe.get_vocab_size()), tmp_path / "m" / "final", {})
    lm = RelscaleLM(pretrained=str(tmp_path / "m" / "final"), tokenizer=str(tok_path))
    with pytest.raises(NotImplementedError, match="log-likelihoods only.*--export-hf"):
        lm.generate_until([])
    from relscale.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown argument"):
        RelscaleLM(pretrained=str(tmp_path / "m" / "final"), tokenizer=str(tok_path), temperature=0.5)
    if not torch.cuda.is_available():  # lm-eval's CLI passes device=cuda by default: the CPU then
        with pytest.warns(UserWarning, match="CUDA is not available; using the CPU"):
            lm = RelscaleLM(pretrained=str(tmp_path / "m" / "final"), tokenizer=str(tok_path), device="cuda")
        assert lm.device.type == "cpu"


@pytest.mark.slow
def test_from_lm_eval_dumps_fit_by_subject(tmp_path, bpe, task_files):
    """lm-eval --log_samples output of several relscale models -> relscale dumps (subjects of the
    group as groups, values equal to the logged ones) -> relscale fit --grouping subject."""
    import relscale.eval.lmeval  # noqa: F401 -- registers --model relscale
    from relscale.cli import main
    from relscale.model_io import save_model

    from .conftest import tiny_model
    from .lmeval_fixtures import MAX_LEN

    tok_path = tmp_path / "tokenizer.json"
    bpe.save(str(tok_path))
    logged = {}
    for k, hidden in enumerate((16, 32, 48)):
        model = tiny_model(bpe.get_vocab_size(), seed=k, hidden=hidden, max_seq_len=MAX_LEN)
        final = tmp_path / "runs" / f"h{hidden}" / "final"
        save_model(model, final, {"tokens": 4000 * (k + 1), "seq_len": MAX_LEN})
        results = run_lm_eval(
            "relscale",
            f"pretrained={final},tokenizer={tok_path}",
            task_files["tasks"],
            ["t_mmlu", "t_ai_risk", "t_rolling"],
            out=tmp_path / "lm_eval_out",
        )
        logged[f"h{hidden}"] = results["samples"]
    evals = tmp_path / "evals"
    assert (
        main(["eval", "--from-lm-eval", str(tmp_path / "lm_eval_out"), "--out", str(evals), "--quiet"]) == 0
    )
    mmlu = pd.read_parquet(evals / "lmeval-t_mmlu")
    assert set(mmlu.model_id) == set(logged)
    subjects = mmlu[mmlu.grouping == "subject"]
    assert set(subjects.group) == {"t_mmlu_anatomy", "t_mmlu_world_religions"}
    assert subjects.params.notna().all() and subjects.flops_marin.notna().all()
    # the dump holds exactly what lm-eval logged
    for sample in logged["h32"]["t_mmlu_anatomy"]:
        row = subjects[
            (subjects.model_id == "h32") & (subjects.example_id == f"t_mmlu_anatomy/{sample['doc_id']}")
        ]
        assert len(row) == 1
        assert list(row.choice_logprobs.iloc[0]) == pytest.approx(sample_logprobs(sample), abs=1e-6)
        assert row.acc.iloc[0] == sample["acc"] and row.prompt.iloc[0] == sample_pairs(sample)[0][0]
    rolling = pd.read_parquet(evals / "lmeval-t_rolling")
    assert (rolling.bpb > 0).all() and len(rolling) == 3 * 4 * 2  # models x docs x (subject, task)
    fit_out = tmp_path / "fit"
    code = main(
        [
            "fit",
            str(evals / "lmeval-t_mmlu"),
            "--grouping",
            "subject",
            "--metric",
            "bpb",
            "--out",
            str(fit_out),
        ]
    )
    assert code == 0 and any(fit_out.iterdir())
    # a second conversion keeps the finished dumps
    before = {p: p.read_bytes() for p in evals.rglob("*.parquet")}
    assert (
        main(["eval", "--from-lm-eval", str(tmp_path / "lm_eval_out"), "--out", str(evals), "--quiet"]) == 0
    )
    assert before == {p: p.read_bytes() for p in evals.rglob("*.parquet")}


def _save_tiny(path, bpe, seed=0):
    from relscale.model_io import save_model

    from .conftest import tiny_model
    from .lmeval_fixtures import MAX_LEN

    save_model(tiny_model(bpe.get_vocab_size(), seed=seed, max_seq_len=MAX_LEN), path, {"tokens": 1000})
    return path


def test_a_sweep_model_is_picked_with_run(tmp_path, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from relscale.errors import ConfigError
    from relscale.eval.lmeval import RelscaleLM
    from relscale.sweep.results import SCHEMA

    tok_path = tmp_path / "tokenizer.json"
    bpe.save(str(tok_path))
    sweep = tmp_path / "sweep"
    for seed, run_id in enumerate(("a", "b")):
        _save_tiny(sweep / "runs" / run_id / "final", bpe, seed)
    rows = [{"run_id": r, "status": "done", "run_dir": f"runs/{r}", "budget": 1e15} for r in ("a", "b")]
    # the sweep's results index (relscale.sweep.results.SCHEMA; unnamed columns are null)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sweep / "results.parquet")
    with pytest.raises(ConfigError, match=r"2 models match \(a, b\); pick one with run=ID"):
        RelscaleLM(pretrained=str(sweep), tokenizer=str(tok_path))
    lm = RelscaleLM(pretrained=str(sweep), tokenizer=str(tok_path), run="b")
    assert lm.get_model_info()["relscale_model_id"] == "b"


@pytest.mark.slow
def test_relscale_lm_eval_command_line_and_its_output_converts(tmp_path, bpe, task_files):
    """The documented command: python -m relscale.eval.lmeval (= relscale-lm-eval) with lm-eval's
    own flags; its --output_path/--log_samples files convert with relscale eval --from-lm-eval."""
    import subprocess
    import sys

    from relscale.cli import main

    tok_path = tmp_path / "tokenizer.json"
    bpe.save(str(tok_path))
    final = _save_tiny(tmp_path / "tiny" / "final", bpe)
    out = tmp_path / "lm_eval_out"
    command = [
        sys.executable, "-m", "relscale.eval.lmeval", "--model", "relscale",
        "--model_args", f"pretrained={final},tokenizer={tok_path}", "--tasks", "t_spaced",
        "--include_path", str(task_files["tasks"]), "--output_path", str(out), "--log_samples",
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "t_spaced" in done.stdout
    evals = tmp_path / "evals"
    assert (
        main(["eval", "--from-lm-eval", str(out), "--out", str(evals), "--quiet", "--meta", "tokens=1000"])
        == 0
    )
    frame = pd.read_parquet(evals / "lmeval-t_spaced" / "tiny.parquet")
    assert len(frame[frame.grouping == "subject"]) == 3 and (frame.tokens == 1000).all()
    assert frame.prompt.str.endswith("Answer: ").all()
