"""Checkpoints as they lie on disk: hub names, the hub cache, sharded indexes that point out of the
model folder (refused), and a relscale run folder that still evaluates after it is moved."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from relscale.cli import main
from relscale.config import DataConfig, TrainConfig
from relscale.counting import flops_per_token_marin
from relscale.errors import DataError
from relscale.eval import hf
from relscale.eval.discover import discover_models
from relscale.eval.options import RunOptions
from relscale.eval.runner import evaluate
from relscale.model_io import read_model_tokenizer, save_model

from .conftest import SEQ_LEN, tiny_config, tiny_model

VOCAB = 97


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ sharded indexes
def sharded(folder, seed: int = 2):
    """An exported model re-saved as two shards + index (the hub's layout for large models)."""
    model = tiny_model(VOCAB, seed=seed)
    hf.export_hf(model, folder)
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / file)
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors").unlink()
    write_index(folder, weight_map)
    return model, weight_map


def write_index(folder, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def point_first_entry_at(folder, weight_map, target: str) -> None:
    first = next(iter(weight_map.values()))
    write_index(folder, {k: (target if v == first else v) for k, v in weight_map.items()})


def test_shard_outside_the_model_folder_is_refused(tmp_path):
    model_dir = tmp_path / "models" / "m"
    model_dir.mkdir(parents=True)
    _, weight_map = sharded(model_dir)
    first = next(iter(weight_map.values()))
    outside = tmp_path / "x.safetensors"  # a valid safetensors file, two levels up
    shutil.copy(model_dir / first, outside)

    point_first_entry_at(model_dir, weight_map, "../../x.safetensors")
    with pytest.raises(DataError, match=r"\.\./\.\./x\.safetensors.*outside the model folder"):
        hf.load_hf_model(model_dir)

    point_first_entry_at(model_dir, weight_map, str(outside))  # an absolute path
    with pytest.raises(DataError, match="outside the model folder"):
        hf.load_hf_model(model_dir)

    link = model_dir / "model-link.safetensors"  # a symlink inside that leads out
    link.symlink_to(outside)
    point_first_entry_at(model_dir, weight_map, link.name)
    with pytest.raises(DataError, match="leads outside the model folder"):
        hf.load_hf_model(model_dir)

    (model_dir / "model.safetensors.index.json").unlink()  # the single-file layout, same rule
    (model_dir / "model.safetensors").symlink_to(outside)
    with pytest.raises(DataError, match="leads outside the model folder"):
        hf.load_hf_model(model_dir)


def test_shard_symlink_inside_the_folder_and_missing_shard(tmp_path):
    model, weight_map = sharded(tmp_path)
    first = next(iter(weight_map.values()))
    (tmp_path / "sub").mkdir()
    (tmp_path / first).rename(tmp_path / "sub" / first)
    (tmp_path / first).symlink_to(tmp_path / "sub" / first)  # stays inside: allowed
    loaded, _ = hf.load_hf_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), model(tokens()))
    (tmp_path / first).unlink()
    with pytest.raises(DataError, match=f"shard '{first}' missing"):
        hf.load_hf_model(tmp_path)


def hub_cache_repo(root, name: str, model) -> tuple:
    """A Hugging Face cache repository ``models--ORG--NAME``: files in blobs/, the snapshot's
    entries symlinks ``../../blobs/<hash>`` to them, refs/main naming the snapshot."""
    staging = root / "staging"
    hf.export_hf(model, staging)
    repo = root / f"models--marin-community--{name}"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(file, blob)
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    staging.rmdir()
    return repo, snapshot


def test_hub_cache_snapshots_load_through_their_blob_links(tmp_path):
    model = tiny_model(VOCAB, seed=3)
    repo, snapshot = hub_cache_repo(tmp_path / "hub", "tiny-hub", model)
    loaded, _ = hf.load_hf_model(snapshot)
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), model(tokens()))
    # the repository, its snapshot and the cache root all discover it under the repository name
    for path in (repo, snapshot, tmp_path / "hub"):
        (entry,) = discover_models([path])
        assert (entry.kind, entry.path, entry.model_id) == ("hf", snapshot, "tiny-hub")
    (repo / "refs" / "main").unlink()
    (repo / "snapshots" / "def456").mkdir()
    with pytest.raises(DataError, match="2 snapshots"):
        discover_models([repo])


# ------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "name,fields",
    [
        ("isoflop-1e+19-d2048-L21-B128-nemo-wo-dclm", (1e19, 2048, 21, 128, "nemo-wo-dclm")),
        ("isoflop-1ep18-d1024-L11-B8", (1e18, 1024, 11, 8, None)),  # relscale's grid spelling
        ("isoflop-6ep19-d3584-L35-B16-dclm-0123abcd", (6e19, 3584, 35, 16, "dclm-0123abcd")),
        ("isoflop-3e18-d512-L6-B32-comma", (3e18, 512, 6, 32, "comma")),
        ("isoflop-1.5e+20-d4096-L40-B256-x", (1.5e20, 4096, 40, 256, "x")),
    ],
)
def test_checkpoint_names_parse(name, fields):
    parsed = hf.parse_checkpoint_name(name)
    assert (parsed.budget, parsed.hidden, parsed.layers, parsed.batch, parsed.sweep) == fields


@pytest.mark.parametrize(
    "name", ["tiny", "isoflop-1e19-d2048-L21", "my-isoflop-1e19-d2048-L21-B8", "isoflop-x"]
)
def test_other_names_are_not_checkpoint_names(name):
    assert hf.parse_checkpoint_name(name) is None


def test_tokens_from_a_name_by_hand():
    """d=512, L=6 at seq_len 4096, the marin preset's shapes (head_dim 128, MLP 4d, vocab 128256):
    Levanter's forward FLOPs per token written out by hand (tests/sweep/test_grid.py's formula)."""
    cfg = tiny_config(
        128256, hidden=512, layers=6, heads=4, kv_heads=4, head_dim=128, mlp_hidden=2048, max_seq_len=4096
    )
    d, s, heads = 512, 4096, 4
    per_layer = (
        2 * 3 * d * 4 * d
        + 2 * d * 3 * d
        + 2 * d * d
        + (2 * s * s * d + 3 * s * s * heads + 2 * s * s * d) / s
    )
    per_token = 6 * per_layer + 2 * d * 128256
    assert flops_per_token_marin(cfg, s) == per_token
    budget, batch = 1e18, 32
    steps = round(budget / (per_token * s * batch))  # 30353 steps of 32 x 4096 tokens
    meta = hf.meta_from_name("isoflop-1e+18-d512-L6-B32-dclm", cfg, {}, "here")
    assert meta == {
        "budget": 1e18,
        "tokens": steps * batch * s,
        "seq_len": s,
        "steps": steps,
        "global_batch": 32,
    }
    assert abs(steps * batch * s * per_token / budget - 1) < 0.01
    # keys already known win; a name that is not an IsoFLOP name changes nothing
    assert hf.meta_from_name("isoflop-1e+18-d512-L6-B32", cfg, {"tokens": 5, "budget": 2e18}, "x") == {
        "tokens": 5,
        "budget": 2e18,
    }
    assert hf.meta_from_name("my-model", cfg, {"a": 1}, "x") == {"a": 1}
    # a run's intermediate checkpoint: the budget of the run, no tokens from the name
    assert hf.meta_from_name("isoflop-1e+18-d512-L6-B32", cfg, {}, "x", tokens=False) == {"budget": 1e18}


def test_names_that_contradict_the_checkpoint_are_refused():
    cfg = tiny_config(
        128256, hidden=512, layers=6, heads=4, kv_heads=4, head_dim=128, mlp_hidden=2048, max_seq_len=4096
    )
    with pytest.raises(
        DataError, match=r"here: the name .* says d=1024, L=6 but config.json has hidden_size=512"
    ):
        hf.meta_from_name("isoflop-1e+18-d1024-L6-B32", cfg, {}, "here")
    with pytest.raises(DataError, match="not a whole number of steps.*--meta seq_len"):
        hf.meta_from_name("isoflop-1e+11-d512-L6-B32", cfg, {}, "here")  # far less than one step
    with pytest.raises(DataError, match="not a whole number of steps"):  # a wrong seq_len: 2.5 steps
        hf.meta_from_name("isoflop-1e+18-d512-L6-B32", cfg, {"seq_len": 2_000_000}, "here")


def test_isoflop_like_names_that_do_not_parse_are_refused_unless_a_budget_is_given():
    cfg = tiny_config(128256, hidden=512, layers=6, heads=4, max_seq_len=4096)
    for name in ("isoflop-abc-d512-L6-B32-x", "isoflop-1e+18-d512-L6-B32-"):
        with pytest.raises(DataError, match=r"here: folder name .* starts like an IsoFLOP checkpoint name"):
            hf.meta_from_name(name, cfg, {}, "here")
        assert hf.meta_from_name(name, cfg, {"budget": 1e18}, "here") == {"budget": 1e18}
    assert hf.meta_from_name("my-model", cfg, {}, "here") == {}


def test_unreadable_tokenizer_and_weights_are_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("")
    with pytest.raises(DataError, match=r"model/tokenizer\.json: unreadable tokenizer"):
        hf.load_hf_tokenizer(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match=r"model/model\.safetensors: unreadable safetensors weights"):
        hf._load_safetensors(folder)


def test_model_names_in_other_scripts_keep_distinct_dump_files():
    from relscale.eval.dump import dump_path

    a, b = (dump_path("out", "set", f"isoflop-1e+11-d32-L2-B8-m{c}ne") for c in "\u00ef\u00f6")
    assert a != b and a.name.endswith("m\u00efne.parquet")


# ------------------------------------------------------------------------- a moved run folder
@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("set") / "speeches.jsonl"
    rows = [
        {"id": f"s{i}", "text": f"the nation and the union of year {i} war peace trade"} for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_final_folder_stores_the_tokenizer(tmp_path, data_dir):
    from relscale.data import PreparedData

    data = PreparedData(data_dir)
    model = tiny_model(data.vocab_size, seed=9)
    final = save_model(
        model, tmp_path / "final", {"data_path": str(data_dir), "tokens": 100, "seq_len": SEQ_LEN}
    )
    path, eos_id = read_model_tokenizer(final)
    assert path == final / "tokenizer.json" and eos_id == data.eos_id
    assert path.read_bytes() == (data_dir / data.manifest["tokenizer"]["file"]).read_bytes()
    assert json.loads((final / "config.json").read_text())["tokenizer"] == {
        "file": "tokenizer.json",
        "eos_id": data.eos_id,
    }
    # without a tokenizer or a data_path none is stored
    assert read_model_tokenizer(save_model(model, tmp_path / "bare", {"tokens": 1})) is None


def test_moved_run_folder_still_evaluates(tmp_path, data_dir, text_set):
    """A trained run, then its folder moved and the prepared data it names gone: the tokenizer
    next to the weights is enough, and the scores are those of the unmoved run."""
    from relscale.data import PreparedData
    from relscale.train.loop import train

    data_copy = tmp_path / "data"
    shutil.copytree(data_dir, data_copy)
    vocab = PreparedData(data_copy).vocab_size
    cfg = TrainConfig(
        model=tiny_config(vocab),
        data=DataConfig(path=str(data_copy), seq_len=SEQ_LEN),
        steps=2,
        micro_batch=2,
        ckpt_interval=0,
        out_dir=str(tmp_path / "here" / "run"),
        device="cpu",
        progress=False,
        eval_batches=1,
    )
    train(cfg)
    final = tmp_path / "here" / "run" / "final"
    assert (final / "tokenizer.json").is_file()
    spec = [f"speeches=text:{text_set}"]
    before = evaluate([final], spec, RunOptions(out_dir=tmp_path / "before", quiet=True))[0].path

    shutil.move(tmp_path / "here" / "run", tmp_path / "there")
    shutil.rmtree(data_copy)
    after = evaluate([tmp_path / "there"], spec, RunOptions(out_dir=tmp_path / "after", quiet=True))[0].path
    a, b = pd.read_parquet(before), pd.read_parquet(after)
    assert len(a) == 6
    np.testing.assert_array_equal(a.nll.to_numpy(), b.nll.to_numpy())
    assert a.n_tokens.tolist() == b.n_tokens.tolist()
    # the moved run also exports with its own tokenizer, and the export scores the same
    exported = tmp_path / "exported"
    assert main(["eval", str(tmp_path / "there"), "--export-hf", str(exported), "--quiet"]) == 0
    assert (exported / "tokenizer.json").read_bytes() == (
        tmp_path / "there" / "final" / "tokenizer.json"
    ).read_bytes()
    hf_dump = evaluate([exported], spec, RunOptions(out_dir=tmp_path / "hf", quiet=True))[0].path
    np.testing.assert_allclose(pd.read_parquet(hf_dump).nll.to_numpy(), a.nll.to_numpy(), rtol=1e-6)


def test_a_bad_name_in_a_folder_stops_before_anything_is_scored(tmp_path, text_set, tokenizer):
    folder = tmp_path / "released"
    for name in ("isoflop-1e+18-d32-L2-B8-x", "isoflop-1e+18-d64-L2-B8-x"):  # the second is d=32 too
        hf.export_hf(tiny_model(tokenizer.get_vocab_size(), seed=1), folder / name)
        tokenizer.save(str(folder / name / "tokenizer.json"))
    (entry, bad) = discover_models([folder])
    assert (entry.model_id, bad.model_id) == ("isoflop-1e+18-d32-L2-B8-x", "isoflop-1e+18-d64-L2-B8-x")
    out = tmp_path / "evals"
    with pytest.raises(DataError, match="isoflop-1e\\+18-d64-L2-B8-x: the name .* says d=64"):
        evaluate([folder], [f"s=text:{text_set}"], RunOptions(out_dir=out, quiet=True))
    assert not out.exists() or not any(out.rglob("*.parquet"))


def test_a_model_folder_with_an_unreadable_config_is_named(tmp_path):
    model_dir = tmp_path / "run" / "final"
    save_model(tiny_model(VOCAB, seed=1), model_dir)
    (model_dir / "config.json").write_text('{"model": ')
    with pytest.raises(DataError, match=r"final/config\.json: unreadable model config \(Expecting value"):
        discover_models([model_dir])
    with pytest.raises(DataError, match=r"final/config\.json: unreadable model config"):
        discover_models([tmp_path / "run"])
