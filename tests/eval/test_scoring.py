"""Scores equal a direct float64 computation, do not depend on batching or packing, and the
metrics (bits per byte, conditional scoring, multiple-choice probabilities) mean what they say."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from relscale.eval.packing import plan_windows
from relscale.eval.scoring import (
    ScoreSettings,
    encode_set,
    eval_mode,
    metrics,
    score_requests,
)
from relscale.eval.sets import SetOptions, load_eval_set

from .conftest import SEQ_LEN, nll_direct, tiny_model, windowed_reference


@pytest.fixture(scope="module")
def text_set(corpus):
    return load_eval_set(f"text:{corpus}", SetOptions(group_by=["century", "kind"]))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.get_vocab_size(), seed=1)


def test_whole_documents_equal_direct_float64(model, text_set, tokenizer):
    encoded = encode_set(text_set, tokenizer, start=0)
    longest = max(len(r.tokens) for r in encoded.requests)
    result = score_requests(model, encoded.requests, ScoreSettings(context=longest, batch_tokens=4 * longest))
    expected = [nll_direct(model, r.tokens) for r in encoded.requests]
    np.testing.assert_allclose(result.nll, expected, rtol=2e-6, atol=1e-5)
    assert result.tokens_scored == sum(len(r.tokens) - 1 for r in encoded.requests)


@pytest.mark.parametrize("stride,layout", [(SEQ_LEN, "packed"), (10, "packed"), (10, "rows")])
def test_sliding_windows_equal_unbatched_chunks(model, text_set, tokenizer, stride, layout):
    encoded = encode_set(text_set, tokenizer, start=0, prefix_tokens=3)
    requests = encoded.requests[:12]
    assert max(len(r.tokens) for r in requests) > 3 * SEQ_LEN  # windows do slide
    settings = ScoreSettings(context=SEQ_LEN, stride=stride, batch_tokens=96, layout=layout)
    result = score_requests(model, requests, settings)
    expected = [windowed_reference(model, r.tokens, r.score_from, SEQ_LEN, stride) for r in requests]
    np.testing.assert_allclose(result.nll, expected, rtol=2e-6, atol=1e-5)
    # The reference's chunks are the packing module's windows, derived independently.
    for r in requests:
        assert len(plan_windows(len(r.tokens), r.score_from, SEQ_LEN, stride)) >= 2


def test_independent_of_batch_size_packing_and_layout(model, text_set, tokenizer):
    requests = encode_set(text_set, tokenizer, start=0).requests
    runs = [
        score_requests(
            model, requests, ScoreSettings(context=SEQ_LEN, batch_tokens=bt, pack_len=pl, layout=layout)
        ).nll
        for bt, pl, layout in [
            (SEQ_LEN, SEQ_LEN, "packed"),
            (512, 64, "packed"),
            (10_000, 101, "packed"),
            (SEQ_LEN, None, "rows"),  # one window per row, plain causal attention
            (1000, None, "rows"),
        ]
    ]
    np.testing.assert_allclose(
        runs[0],
        [windowed_reference(model, r.tokens, 1, SEQ_LEN, SEQ_LEN) for r in requests],
        rtol=2e-6,
        atol=1e-5,
    )
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=1e-5, atol=1e-5)


def test_text_metrics_bytes_and_bpb(model, text_set, tokenizer):
    encoded = encode_set(text_set, tokenizer, start=0)
    nll = score_requests(model, encoded.requests, ScoreSettings(context=SEQ_LEN)).nll
    rows = metrics(text_set, encoded, nll)
    assert len(rows) == len(text_set.examples)
    for row, example in zip(rows, text_set.examples):
        assert row["n_bytes"] == len(example.text.encode("utf-8"))
        assert row["n_tokens"] == len(tokenizer.encode(example.text, add_special_tokens=False).ids)
        assert row["bpb"] == pytest.approx(row["nll"] / (math.log(2) * row["n_bytes"]))
        assert row["groups"] == {"century": example.groups["century"], "kind": example.groups["kind"]}


def test_conditional_scoring_after_k_tokens(model, text_set, tokenizer):
    k = 5
    full = encode_set(text_set, tokenizer, start=0)
    cond = encode_set(text_set, tokenizer, start=0, prefix_tokens=k)
    settings = ScoreSettings(context=200)
    per_token_full = []
    for r in full.requests[:5]:  # per-token losses of the whole document, float64
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.as_tensor(r.tokens[:-1])[None])[0].double(), -1)
        per_token_full.append(-logp.gather(1, torch.as_tensor(r.tokens[1:])[:, None])[:, 0].numpy())
    nll = score_requests(model, cond.requests[:5], settings).nll
    for i, losses in enumerate(per_token_full):
        assert nll[i] == pytest.approx(losses[k:].sum(), rel=2e-6)  # the same context, fewer targets
    rows = metrics(text_set, cond, score_requests(model, cond.requests, settings).nll)
    for row, i in zip(rows, cond.kept):
        example = text_set.examples[i]
        ids = tokenizer.encode(example.text, add_special_tokens=False)
        assert row["n_tokens"] == len(ids.ids) - k
        # Bytes of the scored part: the text from the first scored token's character on.
        assert row["n_bytes"] == len(example.text[ids.offsets[k][0] :].encode("utf-8"))
        assert row["n_bytes"] == len(tokenizer.decode(ids.ids[k:]).encode("utf-8"))


def test_documents_too_short_for_the_prefix_are_reported(text_set, tokenizer):
    lengths = [len(tokenizer.encode(e.text, add_special_tokens=False).ids) for e in text_set.examples]
    k = sorted(lengths)[3]
    encoded = encode_set(text_set, tokenizer, start=0, prefix_tokens=k)
    short = [e.example_id for e, n in zip(text_set.examples, lengths) if n <= k]
    assert [b.row for b in encoded.bad_rows] == short and "nothing left to score" in encoded.bad_rows[
        0
    ].reason


def test_multiple_choice_logprobs_and_probabilities(tmp_path, model, tokenizer):
    rows = [
        {"question": "the nation and the", "choices": ["union", "war", "people congress"], "answer": 0},
        {"question": "great duty of", "choices": ["liberty", "trade"], "answer": "trade", "group": "b"},
        {"question": "tax year", "choices": ["law", "state", "army", "navy"], "answer": 3},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = load_eval_set(f"mc:{path}", SetOptions())
    encoded = encode_set(mc, tokenizer, start=0)
    out = metrics(mc, encoded, score_requests(model, encoded.requests, ScoreSettings(context=64)).nll)
    for row, example in zip(out, mc.examples):
        context_ids = tokenizer.encode(example.context, add_special_tokens=False).ids
        expected = []
        for choice in example.continuations:
            whole = tokenizer.encode(example.context + choice, add_special_tokens=False).ids
            assert whole[: len(context_ids)] == context_ids
            tokens = np.asarray([0, *whole])
            expected.append(-nll_direct(model, tokens, first_scored=1 + len(context_ids)))
        np.testing.assert_allclose(row["choice_logprobs"], expected, rtol=2e-6, atol=1e-5)
        # per byte of the choice text (without the separator), as lm-eval's acc_bytes
        n_bytes = np.array([len(c.encode("utf-8")) for c in example.choice_texts], dtype=float)
        np.testing.assert_allclose(row["choice_logprobs_norm"], np.array(expected) / n_bytes, rtol=2e-6)
        chars = np.array([len(c) for c in example.choice_texts], dtype=float)
        assert row["acc_norm"] == float(np.argmax(np.array(expected) / chars) == example.answer)
        per_byte = np.array(expected) / n_bytes
        assert row["choice_logprob_norm"] == pytest.approx(per_byte[example.answer], rel=2e-6)
        norm_probs = np.exp(per_byte) / np.exp(per_byte).sum()
        assert row["choice_prob_norm"] == pytest.approx(norm_probs[example.answer], rel=1e-5)
        # bpb of the right answer: its scored tokens are " " + the choice here (no split character)
        right = example.continuations[example.answer]
        assert row["n_bytes"] == len(right.encode("utf-8"))
        bpb = -expected[example.answer] / (math.log(2) * row["n_bytes"])
        assert row["bpb"] == pytest.approx(bpb, rel=2e-6)
        assert row["prompt"] == example.context
        probs = np.exp(expected) / np.exp(expected).sum()
        assert row["prob_correct"] == pytest.approx(probs[example.answer], rel=1e-5)
        assert row["logprob_correct"] == pytest.approx(expected[example.answer], rel=2e-6)
        assert row["acc"] == float(np.argmax(expected) == example.answer)
    assert [ex.answer for ex in mc.examples] == [0, 1, 3]
    assert mc.examples[0].context == "Question: the nation and the\nAnswer:"
    assert mc.examples[0].continuations == [" union", " war", " people congress"]


def test_eval_mode_scores_plain_nll_and_restores_the_model(tokenizer, text_set):
    model = tiny_model(tokenizer.get_vocab_size(), seed=1, z_loss=1e-2)
    model.train()
    requests = encode_set(text_set, tokenizer, start=0).requests[:4]
    nll = score_requests(model, requests, ScoreSettings(context=200)).nll
    np.testing.assert_allclose(nll, [nll_direct(model, r.tokens) for r in requests], rtol=2e-6)
    assert model.training and model.cfg.z_loss == 1e-2
    with eval_mode(model):
        assert not model.training and model.cfg.z_loss == 0.0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bf16 autocast + Triton kernels)"
)
def test_gpu_bf16_scores_close_to_fp32(model, text_set, tokenizer):
    requests = encode_set(text_set, tokenizer, start=0).requests
    cpu = score_requests(model, requests, ScoreSettings(context=SEQ_LEN)).nll
    gpu_model = tiny_model(tokenizer.get_vocab_size(), seed=1).cuda()
    gpu = score_requests(gpu_model, requests, ScoreSettings(context=SEQ_LEN, dtype="bf16")).nll
    n = np.array([r.n_scored for r in requests])
    assert np.abs(gpu - cpu).max() / n.mean() < 0.05  # bf16: per-token agreement within 0.05 nats


def test_triton_kernels_path_scores_like_torch():
    """The GPU path (Triton RMSNorm, varlen flash attention, fused linear cross-entropy with
    reduction="none") on the same packed batches; on the CPU through Triton's interpreter."""
    from relscale.config import KernelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = KernelConfig(rms_norm="triton", attention="triton", cross_entropy="triton")
    reference = tiny_model(97, seed=0)
    triton_model = tiny_model(97, seed=0, kernels=kernels).to(device)
    rng = np.random.default_rng(0)
    from relscale.eval.packing import Request

    requests = [Request(rng.integers(0, 97, size=n), s) for n, s in [(10, 1), (30, 4), (5, 2), (17, 1)]]
    settings = ScoreSettings(context=16, batch_tokens=64, dtype="fp32", layout="packed")  # varlen kernel
    expected = score_requests(reference, requests, settings).nll
    np.testing.assert_allclose(score_requests(triton_model, requests, settings).nll, expected, rtol=1e-5)


def test_one_token_choices_after_one_prompt_share_a_forward_pass(model):
    """Requests scoring one token after identical input tokens (MMLU's " A".." D") run as one
    window; each still gets its own exact log-prob and is_greedy, also past the context."""
    from relscale.eval.packing import Request

    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size
    ctx = rng.integers(1, vocab, 30)
    requests = [Request(np.concatenate([ctx, [t]]), 30) for t in (5, 9, 13, 5)]
    requests.append(Request(np.concatenate([ctx[:20], [7, 8]]), 20))  # two tokens: not shared
    requests.append(Request(np.concatenate([ctx[:10], [3]]), 10))  # alone: not shared
    result = score_requests(model, requests, ScoreSettings(context=24), greedy=True)
    expected = [windowed_reference(model, r.tokens, r.score_from, 24, 24) for r in requests]
    np.testing.assert_allclose(result.nll, expected, rtol=2e-6, atol=1e-6)
    assert result.tokens_real == 24 + 21 + 10  # the four shared requests ran as one window
    with torch.no_grad():
        logits = model(torch.as_tensor(ctx[-24:], dtype=torch.long)[None])[0, -1]
    top = int(logits.argmax())
    assert list(result.greedy[:4]) == [t == top for t in (5, 9, 13, 5)]
    plain = score_requests(model, requests, ScoreSettings(context=24))
    np.testing.assert_allclose(plain.nll, expected, rtol=2e-6, atol=1e-6)
