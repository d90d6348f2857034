"""Damaged prepared data is named, never silently used: a shard corrupted in place (same size)
fails `prepare --verify` and the up-to-date check by sha256; out-of-range token ids fail the
loader naming the shard (not a bare IndexError in the embedding); `--vocab-size 0` is refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from relscale.data import PreparedData, SequenceLoader, prepare
from relscale.errors import DataError
from tests.cli.conftest import write_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("robustdata")
    corpus = write_corpus(root / "corpus.jsonl")
    out = root / "prepared"
    prepare([str(corpus)], out, id_field="id", group_fields=["region"], vocab_size=300, shard_tokens=2000,
            log=lambda message: None)
    return corpus, out


def fresh_copy(prepared: tuple[Path, Path], dest: Path) -> Path:
    shutil.copytree(prepared[1], dest)
    return dest


def corrupt_in_place(shard: Path, value: int) -> None:
    """Overwrite 8 tokens in the middle of a uint16 shard; the size stays the same."""
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[len(tokens) // 2: len(tokens) // 2 + 8] = value
    tokens.tofile(shard)


def run_cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    from relscale.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def test_same_size_corruption_fails_verify_and_up_to_date(tmp_path, prepared):
    corpus, _ = prepared
    out = fresh_copy(prepared, tmp_path / "prepared")
    shard = out / "train" / "shard_00002.bin"
    size = shard.stat().st_size
    corrupt_in_place(shard, 7)
    assert shard.stat().st_size == size
    # modified after the manifest: every open (the trainer's too) checks that file's sha256
    with pytest.raises(DataError, match=r"shard_00002\.bin is corrupted"):
        PreparedData(out)
    # with its old mtime restored, sizes alone cannot see it; verify=True (all sha256) does
    manifest_time = (out / "manifest.json").stat().st_mtime
    os.utime(shard, (manifest_time - 10, manifest_time - 10))
    PreparedData(out)
    with pytest.raises(DataError, match=r"shard_00002\.bin is corrupted"):
        PreparedData(out, verify=True)
    code, err = run_cli("prepare", "--verify", out)
    assert code == 2 and "shard_00002.bin is corrupted" in err and "Traceback" not in err
    # re-running the same prepare is not "up to date": it names the shard
    code, err = run_cli("prepare", corpus, "--out", out, "--id-field", "id", "--group-fields", "region",
                        "--vocab-size", "300", "--shard-tokens", "2000")
    assert code == 2 and "shard_00002.bin is corrupted" in err, err
    assert len(err.strip().splitlines()) == 1


def test_out_of_range_token_ids_name_the_shard(tmp_path, prepared):
    out = fresh_copy(prepared, tmp_path / "prepared")
    shard = out / "train" / "shard_00001.bin"
    corrupt_in_place(shard, 65000)  # outside the 300-token vocabulary
    # the old mtime back, so the open's checksum of files newer than the manifest does not see it:
    # this is the loader's own check of token ids
    manifest_time = (out / "manifest.json").stat().st_mtime
    os.utime(shard, (manifest_time - 10, manifest_time - 10))
    data = PreparedData(out)
    loader = SequenceLoader(data, "train", 32, 4, shuffle=False)
    with pytest.raises(DataError, match=r"shard_00001\.bin: token id 65000 .* outside the vocabulary of 300"):
        for _ in range(len(loader)):
            loader.next_batch()
    # the training command ends in one line naming the shard, not an IndexError in the embedding
    from tests.cli.conftest import train_toml

    config = tmp_path / "train.toml"
    config.write_text(train_toml(out, tmp_path / "run", steps=60))
    code, err = run_cli("train", config)
    assert code == 2 and "shard_00001.bin: token id 65000" in err and "Traceback" not in err, err


def test_vocab_size_zero_is_refused(tmp_path, prepared):
    corpus, _ = prepared
    with pytest.raises(DataError, match=r"vocab_size=0 is too small"):
        prepare([str(corpus)], tmp_path / "out", vocab_size=0, log=lambda message: None)
    code, err = run_cli("prepare", corpus, "--out", tmp_path / "out2", "--vocab-size", "0")
    assert code == 2 and "--vocab-size: 0 is too small" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
