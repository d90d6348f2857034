"""Scoring requests -> context windows -> packed, document-masked batches.

A :class:`Request` is a token sequence whose tokens from ``score_from`` on are scored, each
predicted from the tokens before it. Its first token is the "beginning" token (EOS for our
models, see :mod:`relscale.eval.scoring`), so ``score_from >= 1``.

Sliding windows
---------------
A request longer than the context ``C`` is cut into windows of at most ``C`` input tokens. The
scored targets are split into consecutive chunks: the first ends at target ``C`` (or, when
scoring starts later than that, ``stride`` targets after the first scored one), each later chunk
holds the next ``stride`` targets. A chunk's window is the ``C`` tokens just before the chunk's
end, so every target is scored exactly once, and with at least ``C - stride + 1`` tokens of context
once the document is longer than ``C``: the most context a window of ``C`` tokens ending at the
chunk's end can give. ``stride = C`` means no overlap (cheapest), ``stride = C // 2`` (the default)
doubles the cost of long documents and gives every token at least half a window of context.

Packing
-------
Windows are placed into rows of ``pack_len`` tokens by best-fit decreasing; each window is its own
segment: positions restart at 0 and ``cu_seqlens`` (over the flattened batch) stops attention at
its boundary, so a window's losses do not depend on its neighbours -- results are independent of
batch size and packing. Only the tail of a row is padding (its own segment, targets ignored).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Request:
    """One scoring request: ``tokens`` (int64, (n,)) and the index of the first scored token
    (every token from there on is predicted from those before it)."""

    tokens: np.ndarray  # int64 (n,): the beginning token, then the example's tokens
    score_from: int  # index of the first scored token

    @property
    def n_scored(self) -> int:
        """Tokens scored: ``len(tokens) - score_from`` (0 when negative)."""
        return max(0, len(self.tokens) - self.score_from)


@dataclass(frozen=True)
class Window:
    """A slice of one request that fits the context: input ``tokens[lo:hi]`` predicting
    ``tokens[lo+1:hi+1]``, of which targets from ``first_scored`` (absolute index) on are scored."""

    request: int
    lo: int  # input tokens are tokens[lo:hi]; they predict tokens[lo + 1 : hi + 1]
    hi: int
    first_scored: int  # absolute index of the first target this window scores

    @property
    def length(self) -> int:
        """Input tokens of the window: ``hi - lo``."""
        return self.hi - self.lo


def plan_windows(n_tokens: int, score_from: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(lo, hi, first_scored) of the windows that score targets ``score_from .. n_tokens-1``."""
    if score_from < 1:
        raise ValueError(f"score_from={score_from}: the first token has no context to be predicted from")
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must be in [1, context={context}]")
    windows = []
    start = score_from
    end = min(n_tokens, max(context + 1, score_from + stride))
    while start < n_tokens:
        windows.append((max(0, end - 1 - context), end - 1, start))
        start, end = end, min(n_tokens, end + stride)
    return windows


def make_windows(requests: Sequence[Request], context: int, stride: int) -> list[Window]:
    """Every request's windows (:func:`plan_windows`) of at most ``context`` tokens, ``stride``
    new targets per window after the first, in request order."""
    return [
        Window(i, lo, hi, first)
        for i, request in enumerate(requests)
        for lo, hi, first in plan_windows(len(request.tokens), request.score_from, context, stride)
    ]


def pack_rows(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` per row, rows of at most ``pack_len``.
    Deterministic (ties broken by index)."""
    if lengths and max(lengths) > pack_len:
        raise ValueError(f"a window of {max(lengths)} tokens does not fit rows of {pack_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            rows.append([i])
            space, row = pack_len - lengths[i], len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


@dataclass
class PackedBatch:
    """A batch of windows packed into rows of ``pack_len`` tokens (shapes on each field), with
    the segment offsets of document-masked attention."""

    tokens: np.ndarray  # int64 (B, S)
    targets: np.ndarray  # int64 (B, S), IGNORE_INDEX where nothing is scored
    positions: np.ndarray  # int64 (B, S), restarting at 0 in every segment
    cu_seqlens: np.ndarray  # int32 (n_segments + 1,), offsets over the flattened B*S tokens
    owner: np.ndarray  # int64 (B*S,), the request each scored token belongs to, -1 elsewhere
    n_real_tokens: int  # tokens that are not padding
    one_per_row: bool = False  # each row one window then padding: plain causal attention suffices

    @property
    def max_seqlen(self) -> int:
        """The row length S (an upper bound on every segment's length)."""
        return self.tokens.shape[1]


def build_batch(
    requests: Sequence[Request],
    windows: Sequence[Window],
    rows: Sequence[Sequence[int]],
    pack_len: int,
    pad_id: int = 0,
) -> PackedBatch:
    """The :class:`PackedBatch` of ``rows`` (each a list of window indices into ``windows``,
    total length at most ``pack_len``); padding is ``pad_id`` with no target."""
    batch = len(rows)
    tokens = np.full((batch, pack_len), pad_id, dtype=np.int64)
    targets = np.full((batch, pack_len), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((batch, pack_len), dtype=np.int64)
    owner = np.full(batch * pack_len, -1, dtype=np.int64)
    boundaries = [0]
    real = 0
    for r, row in enumerate(rows):
        offset = 0
        for w in row:
            window = windows[w]
            seq = requests[window.request].tokens
            n = window.length
            tokens[r, offset : offset + n] = seq[window.lo : window.hi]
            positions[r, offset : offset + n] = np.arange(n)
            skip = window.first_scored - (window.lo + 1)  # leading targets that are context only
            targets[r, offset + skip : offset + n] = seq[window.first_scored : window.hi + 1]
            flat = r * pack_len + offset
            owner[flat + skip : flat + n] = window.request
            offset += n
            boundaries.append(r * pack_len + offset)
        real += offset
        if offset < pack_len:  # the padding tail is a segment of its own
            positions[r, offset:] = np.arange(pack_len - offset)
            boundaries.append((r + 1) * pack_len)
    return PackedBatch(tokens, targets, positions, np.asarray(boundaries, dtype=np.int32), owner, real)


def iter_row_batches(
    requests: Sequence[Request],
    context: int,
    stride: int,
    batch_tokens: int,
    pad_id: int = 0,
) -> Iterator[PackedBatch]:
    """Every window of every request, one window per row (longest first), rows as long as the
    batch's longest window and as many as fit ``batch_tokens``. Padding only follows a window, so
    plain causal attention gives each window exactly its own scores: the fast path where
    document-masked attention is not (the CPU)."""
    windows = make_windows(requests, context, stride)
    order = sorted(range(len(windows)), key=lambda i: (-windows[i].length, i))
    start = 0
    while start < len(order):
        width = windows[order[start]].length
        rows = max(1, batch_tokens // width)
        chunk = order[start : start + rows]
        batch = build_batch(requests, windows, [[w] for w in chunk], width, pad_id)
        batch.one_per_row = True
        yield batch
        start += rows


def iter_batches(
    requests: Sequence[Request],
    context: int,
    stride: int,
    pack_len: int,
    batch_rows: int,
    pad_id: int = 0,
) -> Iterator[PackedBatch]:
    """Every window of every request, packed, ``batch_rows`` rows at a time (longest first)."""
    if pack_len < context:
        raise ValueError(f"pack_len={pack_len} is shorter than the context={context}")
    windows = make_windows(requests, context, stride)
    rows = pack_rows([w.length for w in windows], pack_len)
    for start in range(0, len(rows), batch_rows):
        yield build_batch(requests, windows, rows[start : start + batch_rows], pack_len, pad_id)
