"""Sliding windows and packing: every target scored once, with the promised context; packed
batches keep documents apart (segments, positions) and waste only row tails."""

from __future__ import annotations

import numpy as np
import pytest

from relscale.eval.packing import (
    IGNORE_INDEX,
    Request,
    build_batch,
    iter_batches,
    make_windows,
    pack_rows,
    plan_windows,
)


@pytest.mark.parametrize("n_tokens", [2, 5, 17, 18, 19, 40, 101])
@pytest.mark.parametrize("context,stride", [(8, 8), (8, 4), (8, 1), (8, 3), (17, 9)])
@pytest.mark.parametrize("score_from", [1, 3, 12, 30])
def test_windows_score_each_target_once_with_most_context(n_tokens, context, stride, score_from):
    windows = plan_windows(n_tokens, score_from, context, stride)
    scored = []
    for lo, hi, first in windows:
        assert 0 <= lo < hi and hi - lo <= context  # a window fits the context
        assert lo + 1 <= first <= hi  # its scored targets are among its predictions
        targets = list(range(first, hi + 1))
        scored += targets
        for p in targets:
            # Context of target p is tokens[lo:p]; once the document is long enough it holds at
            # least context - stride + 1 tokens, and the window ends at its last target.
            assert p - lo >= min(p, context - stride + 1)
        if hi - lo < context:  # a short window only where the document start limits it
            assert lo == 0
    assert scored == list(range(score_from, n_tokens))  # each target once, in order


def test_no_overlap_windows_are_consecutive_blocks():
    # stride == context: the classic non-overlapping blocks tokens[kC:(k+1)C] -> next tokens.
    assert plan_windows(20, 1, 6, 6) == [(0, 6, 1), (6, 12, 7), (12, 18, 13), (13, 19, 19)]


def test_bad_window_arguments():
    with pytest.raises(ValueError, match="score_from"):
        plan_windows(10, 0, 4, 2)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 1, 4, 5)


def test_best_fit_decreasing_packs_tightly_and_deterministically():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6, 2, 2]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == -(-sum(lengths) // 10)  # 40 tokens in 4 full rows: no waste here
    assert rows == pack_rows(lengths, 10)
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([11], 10)


def test_batch_layout_segments_positions_targets():
    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(1, 50, size=n).astype(np.int64), s) for n, s in [(5, 1), (9, 4), (3, 2)]]
    windows = make_windows(requests, context=8, stride=8)
    rows = pack_rows([w.length for w in windows], 10)
    batch = build_batch(requests, windows, rows, 10)
    flat_tokens, flat_targets = batch.tokens.reshape(-1), batch.targets.reshape(-1)
    flat_positions = batch.positions.reshape(-1)
    cu = batch.cu_seqlens
    assert cu[0] == 0 and cu[-1] == batch.tokens.size and np.all(np.diff(cu) > 0)
    assert set(range(0, batch.tokens.size, 10)) <= set(cu.tolist())  # rows end segments
    for start, end in zip(cu[:-1], cu[1:]):
        np.testing.assert_array_equal(flat_positions[start:end], np.arange(end - start))
        # Inside a segment a scored target is the next input token: windows are contiguous text.
        inner = np.arange(start, end - 1)
        scored = inner[flat_targets[inner] != IGNORE_INDEX]
        np.testing.assert_array_equal(flat_targets[scored], flat_tokens[scored + 1])
    # Scored tokens per request: exactly its scored targets, labelled with their owner.
    for i, request in enumerate(requests):
        mine = batch.owner == i
        assert mine.sum() == request.n_scored
        assert sorted(flat_targets[mine].tolist()) == sorted(request.tokens[request.score_from :].tolist())
    assert np.all(flat_targets[batch.owner < 0] == IGNORE_INDEX)
    assert batch.n_real_tokens == sum(w.length for w in windows)


def test_iter_batches_covers_every_window_once():
    requests = [Request(np.arange(n, dtype=np.int64) + 1, 1) for n in (3, 30, 12, 7, 50)]
    seen = np.zeros(len(requests), dtype=int)
    for batch in iter_batches(requests, context=8, stride=4, pack_len=16, batch_rows=3):
        assert batch.tokens.shape[1] == 16 and batch.tokens.shape[0] <= 3
        np.add.at(seen, batch.owner[batch.owner >= 0], 1)
    assert seen.tolist() == [r.n_scored for r in requests]
    with pytest.raises(ValueError, match="shorter than the context"):
        next(iter_batches(requests, context=8, stride=4, pack_len=6, batch_rows=1))
