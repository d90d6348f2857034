"""lm-eval's rules, checked without lm-eval: the context/continuation whitespace boundary for every
adapter (with a BPE in which " Paris" is one token), the start-token policies, bytes of the
scored tokens, the MMLU layouts and categories, and the eval-side cases of issue 18."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

from relscale.cli import main
from relscale.errors import ConfigError, DataError
from relscale.eval.adapters import MMLU_CATEGORIES
from relscale.eval.options import RunOptions
from relscale.eval.runner import evaluate
from relscale.eval.scoring import (
    StartTokens,
    encode_set,
    encode_text_set,
    resolve_start,
    tokenizer_prefix,
)
from relscale.eval.sets import SetOptions, detect_kind, load_eval_set
from relscale.eval.writer import dump_path, is_finished_dump

from .lmeval_fixtures import build_tokenizer


@pytest.fixture(scope="module")
def bpe():
    tok = build_tokenizer()
    assert len(tok.encode(" Paris").ids) == 1 and len(tok.encode(" London").ids) == 1
    return tok


QWEN_LIKE = None  # filled per test: StartTokens of a tokenizer without BOS


def lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HF rule, hand-transcribed: trailing whitespace of the context moves into the
    continuation; context + continuation is tokenised whole and split at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx) :]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapter_sets(tmp_path) -> dict:
    """An eval set per adapter whose prompt ends in whitespace."""
    mc = _write_jsonl(
        tmp_path / "mc.jsonl",
        [{"question": "the capital of France", "choices": ["Paris", "London"], "answer": 0}],
    )
    mmlu = _write_jsonl(
        tmp_path / "mmlu.jsonl",
        [
            {
                "question": "capital?",
                "subject": "anatomy",
                "choices": ["Paris", "London", "Rome", "D"],
                "answer": 0,
            }
        ],
    )
    anthropic = _write_jsonl(
        tmp_path / "power.jsonl",
        [
            {
                "question": "capital?",
                "answer_matching_behavior": "Paris",
                "answer_not_matching_behavior": "London",
            }
        ],
    )
    bigbench = tmp_path / "capitals.json"
    bigbench.write_text(
        json.dumps(
            {"examples": [{"input": "capital of France?", "target_scores": {"Paris": 1, "London": 0}}]}
        )
    )
    return {
        "mc": load_eval_set(f"mc:{mc}", SetOptions(template="Q: {question}\nA: ", choice_sep="")),
        "mmlu-letters": load_eval_set(
            f"mmlu:{mmlu}", SetOptions(template="{question}\n{choice_lines}Answer: ")
        ),
        "mmlu-cloze": load_eval_set(
            f"mmlu:{mmlu}", SetOptions(mmlu_style="cloze", template="Question: {question}\nAnswer: ")
        ),
        "anthropic": load_eval_set(
            f"anthropic:{anthropic}", SetOptions(template="Human: {question}\n\nAssistant: ")
        ),
        "bigbench": load_eval_set(f"bigbench:{bigbench}", SetOptions()),  # BIG-bench's default "\nA: "
    }


@pytest.mark.parametrize("adapter", ["mc", "mmlu-letters", "mmlu-cloze", "anthropic", "bigbench"])
def test_trailing_whitespace_moves_into_the_continuation_for_every_adapter(tmp_path, bpe, adapter):
    eval_set = adapter_sets(tmp_path)[adapter]
    example = eval_set.examples[0]
    assert example.context != example.context.rstrip(), "the prompt must end in whitespace"
    start = StartTokens("none", (), 0)
    encoded = encode_set(eval_set, bpe, start)
    space = bpe.token_to_id("Ġ")
    for request, continuation in zip(encoded.requests, example.continuations, strict=True):
        ctx, cont = lm_eval_split(bpe, example.context, continuation)
        assert list(request.tokens[: request.score_from]) == ctx
        assert list(request.tokens[request.score_from :]) == cont
        assert ctx[-1] != space  # no lone space token left at the end of the prompt
    if adapter in ("mc", "anthropic", "bigbench"):  # the choice follows with no separator
        paris = encoded.requests[example.choice_texts.index("Paris")]
        assert list(paris.tokens[paris.score_from :]) == bpe.encode(" Paris").ids  # one token


def test_start_token_policies(tmp_path, bpe):
    from tokenizers import Tokenizer, processors

    eos, bos = bpe.token_to_id("<|endoftext|>"), bpe.token_to_id("<s>")
    assert tokenizer_prefix(bpe) == ()
    qwen = resolve_start(bpe, None, bos_id=None, eos_id=eos)
    assert (qwen.policy, qwen.prefix, qwen.first) == ("auto", (), eos)  # lm-eval: EOS as prefix token
    llama_tok = Tokenizer.from_str(bpe.to_str())
    llama_tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    llama = resolve_start(llama_tok, "auto", bos_id=bos, eos_id=eos)
    assert (llama.prefix, llama.first) == ((bos,), bos)
    # add_bos_token in tokenizer_config.json overrides the post-processor
    assert resolve_start(llama_tok, "auto", bos_id=bos, eos_id=eos, add_bos=False).prefix == ()
    assert resolve_start(llama_tok, "none", bos_id=bos, eos_id=eos).prefix == ()
    assert resolve_start(bpe, "eos", bos_id=None, eos_id=eos).prefix == (eos,)
    assert resolve_start(bpe, "<s>", bos_id=None, eos_id=eos).prefix == (bos,)
    with pytest.raises(ConfigError, match="--start-token bos: .* no BOS"):
        resolve_start(bpe, "bos", bos_id=None, eos_id=eos)
    with pytest.raises(ConfigError, match="neither auto, bos, eos, none nor a token"):
        resolve_start(bpe, "<nope>", bos_id=None, eos_id=eos)
    # mc: the tokenizer's BOS precedes the context; a document: prefix token, then that BOS (lm-eval)
    rows = [{"question": "x", "choices": ["Paris", "Rome"], "answer": 0}]
    mc = load_eval_set(f"mc:{_write_jsonl(tmp_path / 'q.jsonl', rows)}", SetOptions())
    request = encode_set(mc, llama_tok, llama).requests[0]
    assert request.tokens[0] == bos and request.tokens[1] != bos
    text = load_eval_set(
        f"text:{_write_jsonl(tmp_path / 't.jsonl', [{'text': 'Paris London'}])}", SetOptions()
    )
    doc = encode_set(text, llama_tok, llama).requests[0]
    assert list(doc.tokens[:2]) == [bos, bos] and doc.score_from == 1
    assert list(encode_set(text, bpe, qwen).requests[0].tokens) == [eos, *bpe.encode("Paris London").ids]


def test_bytes_of_a_conditional_continuation_are_those_of_its_scored_tokens(tmp_path, bpe):
    """'é' is two bytes (C3 A9) and, unmerged in this BPE, two tokens: cutting between them
    leaves one scored byte, not the whole character."""
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "Paris é"}])
    eval_set = load_eval_set(f"text:{path}", SetOptions())
    tokens = bpe.encode("Paris é").tokens
    assert tokens[-2:] == ["Ã", "©"]
    encoded = encode_text_set(eval_set, bpe, StartTokens("none", (), 0), prefix_tokens=len(tokens) - 1)
    assert encoded.n_bytes == [1]
    whole = encode_text_set(eval_set, bpe, StartTokens("none", (), 0))
    assert whole.n_bytes == [len("Paris é".encode())]


def _write_hendrycks(root, subjects, n_dev=5, n_test=3, bad_row=False):
    for split, n in (("dev", n_dev), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as handle:
                writer = csv.writer(handle)
                for i in range(n):
                    question = f"{subject} {split} question {i}?" + (" " if i == 1 else "")
                    # choice "A" sits at index 3: the answer column is a letter, never a choice's text
                    writer.writerow([question, "Paris", "London", "Rome, Italy", "A", "ABCD"[i % 4]])
                if bad_row and split == "test":
                    writer.writerow(["too", "few", "columns"])


def test_mmlu_original_csv_layout_five_shot_with_categories(tmp_path):
    root = tmp_path / "data"
    _write_hendrycks(root, ["anatomy", "world_religions", "my_subject"])
    assert detect_kind(root) == "mmlu"
    eval_set = load_eval_set(str(root), SetOptions(shots=5))
    assert len(eval_set.examples) == 9
    by_id = {e.example_id: e for e in eval_set.examples}
    anatomy = by_id["anatomy/2"]
    assert anatomy.groups == {"subject": "anatomy", "category": "stem"}
    assert by_id["world_religions/1"].groups["category"] == "humanities"
    assert by_id["my_subject/1"].groups["category"] == "unknown"
    parts = anatomy.context.split("\n\n")
    assert parts[0] == "The following are multiple choice questions (with answers) about anatomy."
    assert (
        len(parts) == 7
        and parts[2] == "anatomy dev question 1?\nA. Paris\nB. London\nC. Rome, Italy\nD. A\nAnswer: B"
    )
    assert [by_id[f"anatomy/{n}"].answer for n in (1, 2, 3)] == [0, 1, 2]
    assert by_id["anatomy/2"].answer == 1 and anatomy.continuations == [" A", " B", " C", " D"]
    assert by_id["anatomy/2"].context.endswith(
        "anatomy test question 1?\nA. Paris\nB. London\nC. Rome, Italy\nD. A\nAnswer:"
    )
    bad_root = tmp_path / "bad"
    _write_hendrycks(bad_root, ["anatomy"], bad_row=True)
    with pytest.raises(DataError, match=r"anatomy_test\.csv, row 4: 3 columns, expected 6"):
        from relscale.eval.formats import check_bad_rows

        check_bad_rows(load_eval_set(str(bad_root), SetOptions()), skip_bad=False)


def test_mmlu_categories_are_lm_evals():
    mmlu_configs = pytest.importorskip(
        "lm_eval.tasks.mmlu._generate_configs", reason="lm-eval is not installed"
    )
    assert MMLU_CATEGORIES == mmlu_configs.SUBJECTS
    assert len(MMLU_CATEGORIES) == 57


# --------------------------------------------------------------------------------- issue 18
def _bigbench(path, word):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"examples": [{"input": f"{word}?", "target_scores": {"yes": 1, "no": 0}}]}))
    return path


def test_two_bigbench_files_in_one_folder_get_two_names_and_a_clash_is_refused(tmp_path, model_dir):
    a = _bigbench(tmp_path / "tasks" / "alpha.json", "alpha")
    b = _bigbench(tmp_path / "tasks" / "beta.json", "beta")
    names = {load_eval_set(f"bigbench:{p}", SetOptions()).name for p in (a, b)}
    assert names == {"bigbench-alpha", "bigbench-beta"}
    c = _bigbench(tmp_path / "one" / "same" / "task.json", "one")
    d = _bigbench(tmp_path / "two" / "same" / "task.json", "two")
    with pytest.raises(
        DataError, match=r"one/same/task\.json and .*two/same/task\.json are both named 'bigbench-same'"
    ):
        evaluate(
            [model_dir],
            [f"bigbench:{c}", f"bigbench:{d}"],
            RunOptions(out_dir=tmp_path / "evals", quiet=True),
        )
    assert not (tmp_path / "evals").exists()


def test_all_bad_rows_with_skip_bad_write_no_dump_and_garbage_is_not_done(tmp_path, model_dir, capsys):
    path = _write_jsonl(tmp_path / "mc.jsonl", [{"question": "x", "choices": ["a"], "answer": 0}] * 2)
    out = tmp_path / "evals"
    outcomes = evaluate([model_dir], [f"mc:{path}"], RunOptions(out_dir=out, skip_bad=True))
    assert [o.status for o in outcomes] == ["empty"]
    printed = capsys.readouterr().out
    assert "0 examples to score; no dump written" in printed
    assert "0 dump(s) written, 0 already there, 1 eval set(s) with no examples" in printed
    assert not outcomes[0].path.exists()
    # fixed input; a garbage file where the dump goes is not a finished dump
    _write_jsonl(path, [{"question": "x", "choices": ["union", "war"], "answer": 0}])
    target = dump_path(out, "mc", "tiny")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("garbage")
    assert not is_finished_dump(target)
    outcomes = evaluate([model_dir], [f"mc:{path}"], RunOptions(out_dir=out, quiet=True))
    assert [o.status for o in outcomes] == ["written"] and is_finished_dump(target)
    assert len(pd.read_parquet(target)) == 1


def test_context_above_max_seq_len_is_refused_in_one_line(tmp_path, model_dir, capsys):
    code = main(["eval", str(model_dir), "--context", "100000", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--context 100000 exceeds the model's max_seq_len 64" in err


def test_threads_are_set_for_eval(tmp_path, model_dir, corpus):
    evaluate(
        [model_dir],
        [f"text:{corpus}"],
        RunOptions(out_dir=tmp_path / "e", threads=2, quiet=True, sets=SetOptions(limit=2)),
    )
    assert torch.get_num_threads() == 2  # the autouse fixture restores it


def test_mc_dump_rows_carry_prompt_and_paper_metrics(tmp_path, model_dir):
    path = _write_jsonl(
        tmp_path / "mc.jsonl",
        [{"question": "the nation", "choices": ["union", "war", "peace trade"], "answer": 2}],
    )
    outcome = evaluate([model_dir], [f"mc:{path}"], RunOptions(out_dir=tmp_path / "e", quiet=True))[0]
    row = pd.read_parquet(outcome.path).iloc[0]
    assert row.prompt == "Question: the nation\nAnswer:"
    assert list(row.choices) == [" union", " war", " peace trade"]
    logprobs = np.asarray(row.choice_logprobs)
    per_byte = logprobs / np.array([5, 3, 11])
    assert row.choice_logprob == logprobs[2] and row.choice_logprob_norm == pytest.approx(per_byte[2])
    assert row.choice_prob_norm == pytest.approx(np.exp(per_byte[2]) / np.exp(per_byte).sum())
    assert row.nll == -logprobs[2] and row.n_bytes == len(" peace trade")
    assert row.bpb == pytest.approx(row.nll / (np.log(2) * row.n_bytes))


@pytest.mark.parametrize("post_processor", [False, True])
def test_auto_asks_transformers_whether_the_bos_is_added(tmp_path, bpe, post_processor):
    """The generic PreTrainedTokenizerFast ignores add_bos_token and follows tokenizer.json's
    post-processor; relscale's `auto` follows whatever transformers (so lm-eval) does."""
    pytest.importorskip("transformers", reason="transformers is not installed (extra: relscale[interop])")
    from tokenizers import Tokenizer, processors

    from relscale.eval.scoring import hf_special_tokens

    tok = Tokenizer.from_str(bpe.to_str())
    bos = tok.token_to_id("<s>")
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    bos_id, eos_id, adds_bos = hf_special_tokens(tmp_path, tok)
    assert (bos_id, eos_id, adds_bos) == (bos, tok.token_to_id("<|endoftext|>"), post_processor)
    start = resolve_start(tok, "auto", bos_id=bos_id, eos_id=eos_id, add_bos=adds_bos)
    assert start.prefix == ((bos,) if post_processor else ())
