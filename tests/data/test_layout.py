"""The prepared-folder contract (relscale.data.layout): its paths are the files prepare wrote and
PreparedData reads, its manifest reader names what is wrong, and it never imports torch."""

import json
import subprocess
import sys

import pytest

from relscale.data import PreparedData, layout, prepare
from relscale.errors import DataError
from tests.data.test_prepare import small_corpus, write_jsonl


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    source = write_jsonl(root / "corpus.jsonl", small_corpus())
    prepare([str(source)], root / "out", id_field="id", group_fields=["kind"], vocab_size=300,
            val_fraction=0.25, shard_tokens=700, log=lambda m: None)
    return root / "out"


def test_paths_are_the_files_on_disk(prepared):
    manifest = layout.read_manifest(prepared)
    assert layout.is_prepared(prepared) and not layout.is_prepared(prepared / "train")
    assert layout.tokenizer_path(prepared) == prepared / "tokenizer.json"
    assert layout.tokenizer_path(prepared).is_file()
    assert layout.split_names(manifest) == list(layout.SPLITS)
    # every file on disk is one the contract names, and every named file exists
    named = {layout.manifest_path(prepared), layout.tokenizer_path(prepared)}
    for split in layout.split_names(manifest):
        shards = layout.shard_paths(prepared, split)
        assert [p.name for p in shards] == [layout.shard_file_name(i) for i in range(len(shards))]
        named |= {layout.index_path(prepared, split), *shards}
    on_disk = {p for p in prepared.rglob("*") if p.is_file()}
    assert on_disk == named
    assert len(layout.shard_paths(prepared, "train")) > 1  # shard_tokens=700 cuts the stream


def test_group_labels_count_every_document(prepared):
    manifest = layout.read_manifest(prepared)
    assert layout.group_fields(manifest) == ["kind"]
    labels = layout.group_labels(manifest)
    n_docs = sum(layout.split_record(manifest, s)["n_docs"] for s in layout.split_names(manifest))
    rows = small_corpus()
    assert labels == {"kind": {"even": sum(r["kind"] == "even" for r in rows),
                               "odd": sum(r["kind"] == "odd" for r in rows)}}
    assert sum(labels["kind"].values()) == n_docs == len(rows)
    data = PreparedData(prepared)
    assert data.tokenizer_path == layout.tokenizer_path(prepared)
    assert layout.eos_id(manifest) == data.eos_id and layout.vocab_size(manifest) == data.vocab_size


def test_manifest_errors_name_the_file(tmp_path, prepared):
    with pytest.raises(DataError, match="not a prepared data folder"):
        layout.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: unreadable manifest"):
        layout.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"manifest.json: unreadable manifest \(a JSON list"):
        layout.read_manifest(tmp_path)
    manifest = layout.read_manifest(prepared)
    layout.write_manifest(tmp_path, {**manifest, "format_version": 99})
    with pytest.raises(DataError, match="format_version 99"):
        layout.read_manifest(tmp_path)
    with pytest.raises(DataError, match="no split 'test'; splits: train, val"):
        layout.index_path(prepared, "test")
    broken = {key: value for key, value in manifest.items() if key != "tokenizer"}
    with pytest.raises(DataError, match="missing key 'tokenizer'"):
        layout.tokenizer_path(prepared, broken)


def test_write_manifest_round_trips(tmp_path, prepared):
    manifest = layout.read_manifest(prepared)
    path = layout.write_manifest(tmp_path, manifest)
    assert json.loads(path.read_text()) == manifest == layout.read_manifest(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name != "manifest.json"]  # no temp file left


def test_layout_does_not_import_torch(prepared):
    code = (
        "import sys\n"
        "from relscale.data import layout\n"
        f"m = layout.read_manifest({str(prepared)!r})\n"
        f"layout.tokenizer_path({str(prepared)!r}, m); layout.shard_paths({str(prepared)!r}, 'train', m)\n"
        "assert 'torch' not in sys.modules, 'relscale.data.layout imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
