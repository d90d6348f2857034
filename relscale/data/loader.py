"""Deterministic, resumable batches of packed sequences.

A split's token stream (all shards, concatenated; windows may cross shard boundaries) is cut into
windows of seq_len + 1 tokens starting at multiples of seq_len: window w = stream[w*S : w*S+S+1],
so inputs are window[:-1] and targets window[1:], and consecutive windows share one token.

Each epoch e visits the windows in the order of a seeded permutation (seed + e); the global batch
of a step is micro_batch x grad_accum x world_size windows, and micro-step m of step s on rank r
reads perm[((s*grad_accum + m)*world_size + r)*micro_batch : ... + micro_batch]. So one process
with grad_accum=2 sees exactly the windows that two ranks with grad_accum=1 see together. Windows
that do not fill a last global batch are skipped for that epoch (the next epoch's permutation
differs). Validation (shuffle=False, the default for splits other than "train") keeps the
windows in stream order.

Document masking: a document starts at the token after an EOS. Positions count from 0 at each
document start and at each sequence start (RoPE is relative, and attention never crosses a
segment, so a sequence that begins mid-document starts at position 0 too); cu_seqlens marks the
same segment starts over the flattened B*S tokens. The target of an EOS token is the first token
of the next document; it is kept (the model learns how documents begin).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from relscale.data.dataset import PreparedData
from relscale.errors import ConfigError, DataError

STATE_VERSION = 1


@dataclass
class Batch:
    """One micro-batch of packed sequences: B windows of S tokens (S = seq_len), with the
    document segmentation the attention kernels use (see the module docstring)."""

    tokens: torch.Tensor  # (B, S) int64 inputs
    targets: torch.Tensor  # (B, S) int64 next tokens
    positions: torch.Tensor  # (B, S) int64, 0 at every segment start
    cu_seqlens: torch.Tensor  # (n_segments + 1,) int32 offsets over the flattened B*S tokens
    max_seqlen: int  # an upper bound on segment length (= S), known without a device sync

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor moved to ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S): sequences and tokens per sequence."""
        return tuple(self.tokens.shape)


def document_segments(
    tokens: np.ndarray, eos_id: int, doc_masking: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(positions (B, S) int64, cu_seqlens int32) for a (B, S) batch of input tokens."""
    batch, seq_len = tokens.shape
    is_start = np.zeros((batch, seq_len), dtype=bool)
    is_start[:, 0] = True
    if doc_masking:
        is_start[:, 1:] = tokens[:, :-1] == eos_id
    flat_start = is_start.ravel()
    index = np.arange(batch * seq_len, dtype=np.int64)
    # Position = distance to the latest segment start at or before each token.
    latest_start = np.maximum.accumulate(np.where(flat_start, index, 0))
    positions = (index - latest_start).reshape(batch, seq_len)
    cu_seqlens = np.append(np.flatnonzero(flat_start), batch * seq_len).astype(np.int32)
    return positions, cu_seqlens


def _make_batch(windows: np.ndarray, eos_id: int, doc_masking: bool, device: str | torch.device) -> Batch:
    windows = windows.astype(np.int64)
    tokens, targets = windows[:, :-1], windows[:, 1:]
    positions, cu_seqlens = document_segments(tokens, eos_id, doc_masking)
    batch = Batch(
        tokens=torch.from_numpy(np.ascontiguousarray(tokens)),
        targets=torch.from_numpy(np.ascontiguousarray(targets)),
        positions=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=tokens.shape[1],
    )
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned host memory lets the copy overlap with compute.
        batch = Batch(
            *(t.pin_memory() for t in (batch.tokens, batch.targets, batch.positions, batch.cu_seqlens)),
            max_seqlen=batch.max_seqlen,
        )
        return batch.to(device, non_blocking=True)
    return batch if device.type == "cpu" else batch.to(device)


def _open(data: PreparedData | str | Path) -> PreparedData:
    return data if isinstance(data, PreparedData) else PreparedData(data)


def _count_windows(data: PreparedData, split: str, seq_len: int) -> int:
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} must be >= 1")
    n_tokens = data.n_tokens(split)
    if n_tokens < seq_len + 1:
        raise DataError(
            f"split {split!r} of {data.data_dir} has {n_tokens} tokens, fewer than one window "
            f"of seq_len + 1 = {seq_len + 1}"
        )
    return (n_tokens - 1) // seq_len


class SequenceLoader:
    """Deterministic, resumable micro-batches of one split (see the module docstring for the order).

    ``data``: a PreparedData or its folder; ``seq_len``: tokens per sequence; ``micro_batch``:
    sequences per micro-step on this rank; ``rank``/``world_size``: this process's share of the
    global batch of micro_batch x grad_accum x world_size sequences; ``shuffle`` (default: True
    for "train" only). ConfigError for a bad batch layout; DataError when the split holds fewer
    windows than one global batch.
    """

    def __init__(
        self,
        data: PreparedData | str | Path,
        split: str,
        seq_len: int,
        micro_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        doc_masking: bool = True,
        device: str | torch.device = "cpu",
        shuffle: bool | None = None,
    ):
        for name, value in (
            ("micro_batch", micro_batch),
            ("grad_accum", grad_accum),
            ("world_size", world_size),
        ):
            if value < 1:
                raise ConfigError(f"{name}={value} must be >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data = _open(data)
        self.split, self.seq_len, self.micro_batch = split, seq_len, micro_batch
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.doc_masking, self.device = doc_masking, device
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.eos_id = self.data.eos_id
        self.stream = self.data.stream(split)
        self.n_windows = _count_windows(self.data, split, seq_len)
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = self.n_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"split {split!r} has {self.n_windows} windows of seq_len {seq_len}: fewer than one "
                f"global batch of micro_batch {micro_batch} x grad_accum {grad_accum} x world_size "
                f"{world_size} = {self.global_batch} sequences"
            )
        self.epoch = self.step = self.micro = 0
        self._permutation: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_step(self) -> int:
        """Input tokens of one optimizer step over all ranks (global batch x seq_len)."""
        return self.global_batch * self.seq_len

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of an epoch: a permutation seeded by seed + epoch, or stream order."""
        if self._permutation is None or self._permutation[0] != epoch:
            order = (
                np.random.Generator(np.random.PCG64(self.seed + epoch)).permutation(self.n_windows)
                if self.shuffle
                else np.arange(self.n_windows)
            )
            self._permutation = (epoch, order)
        return self._permutation[1]

    def window_ids(self, epoch: int, step: int, micro: int) -> np.ndarray:
        """The windows this rank reads at (epoch, step, micro-step)."""
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.micro_batch
        return self.permutation(epoch)[first : first + self.micro_batch]

    def read_windows(self, window_ids: np.ndarray) -> np.ndarray:
        """Token windows (len(window_ids), seq_len + 1). Raises DataError naming the shard when a
        token id is outside the vocabulary (a shard corrupted on disk), instead of an IndexError
        deep in the embedding."""
        span = self.seq_len + 1
        windows = np.stack(
            [self.stream.read(int(w) * self.seq_len, int(w) * self.seq_len + span) for w in window_ids]
        )
        vocab = self.data.vocab_size
        if windows.size and int(windows.max()) >= vocab:
            row, column = np.argwhere(windows >= vocab)[0]
            position = int(window_ids[row]) * self.seq_len + int(column)
            raise DataError(
                f"{self.stream.shard_name(position)}: token id {int(windows[row, column])} at stream "
                f"position {position} is outside the vocabulary of {vocab} (the shard is corrupted; "
                f"`relscale prepare --verify {self.data.data_dir}` names it, `--force` rebuilds it)"
            )
        return windows

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank, advancing (micro-step, step, epoch)."""
        windows = self.read_windows(self.window_ids(self.epoch, self.step, self.micro))
        self.micro += 1
        if self.micro == self.grad_accum:
            self.micro, self.step = 0, self.step + 1
            if self.step == self.steps_per_epoch:
                self.step, self.epoch = 0, self.epoch + 1
        return _make_batch(windows, self.eos_id, self.doc_masking, self.device)

    def __iter__(self) -> Iterator[Batch]:
        """Training order forever; without shuffling, the rest of the current epoch only."""
        epoch = self.epoch
        while self.shuffle or self.epoch == epoch:
            yield self.next_batch()

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.grad_accum

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position (epoch, step, micro-step) and the layout it was taken under (JSON-safe)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
            "position": {"epoch": self.epoch, "step": self.step, "micro": self.micro},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where state_dict() was taken.

        At a step boundary the layout (micro_batch, grad_accum, world_size) may change as long as the
        global batch is the same: a step covers the same windows whatever the layout.
        """
        try:
            position = {key: int(state["position"][key]) for key in ("epoch", "step", "micro")}
            expected = {
                "split": self.split,
                "seed": self.seed,
                "seq_len": self.seq_len,
                "n_windows": self.n_windows,
                "shuffle": self.shuffle,
                "global_batch": self.global_batch,
            }
            for key, value in expected.items():
                if state[key] != value:
                    raise ConfigError(f"loader state has {key}={state[key]!r} but this loader has {value!r}")
            if position["micro"] != 0:
                for key in ("micro_batch", "grad_accum", "world_size"):
                    if state[key] != getattr(self, key):
                        raise ConfigError(
                            f"loader state was taken mid-step with {key}={state[key]}; resuming "
                            f"with {key}={getattr(self, key)} needs a step boundary"
                        )
        except KeyError as error:
            raise ConfigError(f"loader state is missing key {error}") from error
        if not (
            position["epoch"] >= 0
            and 0 <= position["step"] < self.steps_per_epoch
            and 0 <= position["micro"] < self.grad_accum
        ):
            raise ConfigError(
                f"loader state position {position} is out of range (steps_per_epoch="
                f"{self.steps_per_epoch}, grad_accum={self.grad_accum})"
            )
        self.epoch, self.step, self.micro = position["epoch"], position["step"], position["micro"]


def validation_batches(
    data: PreparedData | str | Path,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    split: str = "val",
    doc_masking: bool = True,
    device: str | torch.device = "cpu",
) -> Iterator[Batch]:
    """Every window of a split in stream order, batch_size at a time (the last batch may be smaller)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    data = _open(data)
    n_windows = _count_windows(data, split, seq_len)
    stream = data.stream(split)
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for first in range(0, n_batches * batch_size, batch_size):
        ids = range(first, min(first + batch_size, n_windows))
        windows = np.stack([stream.read(w * seq_len, w * seq_len + seq_len + 1) for w in ids])
        yield _make_batch(windows, data.eos_id, doc_masking, device)
