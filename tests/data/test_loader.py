"""SequenceLoader: coverage, determinism, document metadata, data-parallel layout, exact resume."""

import json
import random

import numpy as np
import pytest
import torch

from relscale.data import PreparedData, SequenceLoader, document_segments, prepare, validation_batches
from relscale.errors import ConfigError, DataError

SEQ_LEN = 32
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()


def write_corpus(path, n_docs=80, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n_docs):
        n_words = rng.choice([3, 8, 20, 45, 90])  # many documents shorter than a sequence, some longer
        rows.append({"id": f"doc{i:03d}", "text": " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same corpus prepared twice: one shard per split, and many 700-token shards."""
    root = tmp_path_factory.mktemp("loader")
    source = write_corpus(root / "corpus.jsonl")
    options = dict(id_field="id", vocab_size=300, val_fraction=0.2, log=lambda m: None)
    one = PreparedData(prepare([str(source)], root / "one_shard", **options).out_dir)
    many = PreparedData(prepare([str(source)], root / "many_shards", shard_tokens=700, **options).out_dir)
    assert len(many.manifest["splits"]["train"]["shards"]) > 3
    return one, many


def flat(data, split="train"):
    return np.concatenate([np.asarray(s) for s in data.shards(split)]).astype(np.int64)


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(a, b):
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "targets", "positions", "cu_seqlens")
    )


def window_starts(batch, stream):
    """Recover each row's window start by matching it against every multiple of SEQ_LEN."""
    lookup = {stream[s : s + SEQ_LEN + 1].tobytes(): s for s in range(0, len(stream) - SEQ_LEN, SEQ_LEN)}
    full = torch.cat([batch.tokens, batch.targets[:, -1:]], dim=1).numpy()
    return [lookup[row.tobytes()] for row in full]


def test_epoch_covers_distinct_windows(corpus):
    data = corpus[0]
    stream = flat(data)
    loader = SequenceLoader(data, "train", SEQ_LEN, micro_batch=4, seed=3)
    n_windows = (len(stream) - 1) // SEQ_LEN
    assert loader.n_windows == n_windows and loader.steps_per_epoch == n_windows // 4
    starts = []
    for batch in batches(loader, loader.steps_per_epoch):
        assert batch.tokens.dtype == batch.targets.dtype == batch.positions.dtype == torch.int64
        assert batch.cu_seqlens.dtype == torch.int32 and batch.max_seqlen == SEQ_LEN
        torch.testing.assert_close(batch.targets[:, :-1], batch.tokens[:, 1:])
        starts += window_starts(batch, stream)
    assert len(set(starts)) == len(starts) == loader.steps_per_epoch * 4  # no window twice in an epoch
    assert len(starts) > n_windows - 4  # only the remainder of a global batch is left out
    assert starts != sorted(starts)  # shuffled
    assert loader.epoch == 1 and loader.step == 0


def test_shard_layout_does_not_change_batches(corpus):
    one, many = corpus
    a = SequenceLoader(one, "train", SEQ_LEN, micro_batch=3, seed=5)
    b = SequenceLoader(many, "train", SEQ_LEN, micro_batch=3, seed=5)
    for x, y in zip(batches(a, a.steps_per_epoch + 2), batches(b, b.steps_per_epoch + 2)):
        assert same(x, y)


def test_seeded_and_deterministic(corpus):
    data = corpus[0]
    a, b = (SequenceLoader(data, "train", SEQ_LEN, 4, seed=1) for _ in range(2))
    first = batches(a, 3)
    assert all(same(x, y) for x, y in zip(first, batches(b, 3)))
    other = batches(SequenceLoader(data, "train", SEQ_LEN, 4, seed=2), 3)
    assert not all(same(x, y) for x, y in zip(first, other))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    np.testing.assert_array_equal(
        a.permutation(1), SequenceLoader(data, "train", SEQ_LEN, 4, seed=2).permutation(0)
    )


def reference_segments(tokens, eos_id):
    """Token-by-token: a segment starts at each sequence start and after each EOS."""
    positions, cu = [], []
    for row_index, row in enumerate(tokens.tolist()):
        position = 0
        for i in range(len(row)):
            if i == 0 or row[i - 1] == eos_id:
                position = 0
                cu.append(row_index * len(row) + i)
            positions.append(position)
            position += 1
    cu.append(tokens.size)
    return np.array(positions).reshape(tokens.shape), np.array(cu)


def test_positions_and_cu_seqlens(corpus):
    data = corpus[0]
    stream = flat(data)
    doc_starts = set(data.documents("train")["start"].tolist())
    loader = SequenceLoader(data, "train", SEQ_LEN, micro_batch=4, seed=0)
    n_segments = 0
    for batch in batches(loader, 6):
        positions, cu = reference_segments(batch.tokens.numpy(), data.eos_id)
        np.testing.assert_array_equal(batch.positions.numpy(), positions)
        np.testing.assert_array_equal(batch.cu_seqlens.numpy(), cu)
        # Against the index: a token at a document's start offset has position 0, and vice versa
        # away from the sequence start.
        for row, start in enumerate(window_starts(batch, stream)):
            for i in range(1, SEQ_LEN):
                assert (batch.positions[row, i].item() == 0) == (start + i in doc_starts)
        n_segments += len(cu) - 1
    assert n_segments >= 6 * 4 + 10  # the corpus really packs documents inside sequences
    plain = SequenceLoader(data, "train", SEQ_LEN, micro_batch=4, doc_masking=False).next_batch()
    np.testing.assert_array_equal(plain.positions.numpy(), np.tile(np.arange(SEQ_LEN), (4, 1)))
    np.testing.assert_array_equal(plain.cu_seqlens.numpy(), np.arange(5) * SEQ_LEN)


def test_document_segments_hand_example():
    tokens = np.array([[5, 0, 7, 8], [0, 0, 9, 9]])
    positions, cu = document_segments(tokens, eos_id=0)
    np.testing.assert_array_equal(positions, [[0, 1, 0, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(cu, [0, 2, 4, 5, 6, 8])


def test_grad_accum_equals_data_parallel_ranks(corpus):
    data = corpus[0]
    accum = SequenceLoader(data, "train", SEQ_LEN, 2, seed=4, grad_accum=2)
    ranks = [SequenceLoader(data, "train", SEQ_LEN, 2, seed=4, world_size=2, rank=r) for r in (0, 1)]
    assert accum.steps_per_epoch == ranks[0].steps_per_epoch
    for _ in range(accum.steps_per_epoch + 3):  # across an epoch boundary
        for rank in ranks:
            assert same(accum.next_batch(), rank.next_batch())


def test_exact_resume_mid_epoch_mid_step_and_across_epochs(corpus):
    data = corpus[1]
    make = lambda: SequenceLoader(data, "train", SEQ_LEN, 3, seed=7, grad_accum=2)  # noqa: E731
    reference = make()
    total = 2 * reference.steps_per_epoch * 2 + 5
    expected = batches(reference, total)
    for cut in (3, reference.steps_per_epoch * 2 - 1, reference.steps_per_epoch * 2 + 4):
        first = make()
        batches(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives JSON
        assert all(isinstance(v, int) for v in state["position"].values())
        resumed = make()
        resumed.load_state_dict(state)
        assert all(same(x, y) for x, y in zip(batches(resumed, total - cut), expected[cut:]))


def test_resume_with_another_layout_at_a_step_boundary(corpus):
    data = corpus[0]
    accum = SequenceLoader(data, "train", SEQ_LEN, 2, seed=9, grad_accum=2)
    batches(accum, 6)  # 3 steps
    wide = SequenceLoader(data, "train", SEQ_LEN, 4, seed=9)
    wide.load_state_dict(accum.state_dict())
    for _ in range(4):
        halves = [accum.next_batch(), accum.next_batch()]
        whole = wide.next_batch()
        assert torch.equal(whole.tokens, torch.cat([h.tokens for h in halves]))
    accum.next_batch()  # now mid-step: the layout must match
    with pytest.raises(ConfigError, match="mid-step with micro_batch=2; resuming with micro_batch=4"):
        wide.load_state_dict(accum.state_dict())
    with pytest.raises(ConfigError, match="seed=9"):
        SequenceLoader(data, "train", SEQ_LEN, 4, seed=1).load_state_dict(wide.state_dict())


def test_validation_order(corpus):
    data = corpus[1]
    stream = flat(data, "val")
    n_windows = (len(stream) - 1) // SEQ_LEN
    rows = torch.cat([b.tokens for b in validation_batches(data, SEQ_LEN, 5)])
    expected = np.stack([stream[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN] for w in range(n_windows)])
    np.testing.assert_array_equal(rows.numpy(), expected)
    assert len(list(validation_batches(data, SEQ_LEN, 5, max_batches=2))) == 2
    loader = SequenceLoader(data, "val", SEQ_LEN, 5)
    in_order = list(loader)  # one pass, no shuffling, remainder windows left out
    assert len(in_order) == n_windows // 5 == len(loader)
    np.testing.assert_array_equal(
        torch.cat([b.tokens for b in in_order]).numpy(), expected[: len(in_order) * 5]
    )


def test_shape_errors_are_named(corpus):
    data = corpus[0]
    n_tokens = data.n_tokens("val")
    with pytest.raises(
        DataError, match=rf"'val' .* has {n_tokens} tokens, fewer than one window of seq_len \+ 1"
    ):
        SequenceLoader(data, "val", n_tokens, 1)
    with pytest.raises(
        DataError, match=r"global batch of micro_batch 1000 x grad_accum 2 x world_size 1 = 2000"
    ):
        SequenceLoader(data, "train", SEQ_LEN, 1000, grad_accum=2)
    with pytest.raises(DataError, match="no split 'test'"):
        SequenceLoader(data, "test", SEQ_LEN, 1)
    with pytest.raises(ConfigError, match="rank=2"):
        SequenceLoader(data, "train", SEQ_LEN, 1, rank=2, world_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_match_cpu(corpus):
    data = corpus[0]
    cpu = SequenceLoader(data, "train", SEQ_LEN, 4, seed=2)
    gpu = SequenceLoader(data, "train", SEQ_LEN, 4, seed=2, device="cuda")
    for x, y in zip(batches(cpu, 3), batches(gpu, 3)):
        assert y.tokens.is_cuda and y.cu_seqlens.is_cuda and y.cu_seqlens.dtype == torch.int32
        assert same(x, y.to("cpu"))
