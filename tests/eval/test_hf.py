"""Hugging Face interop: export -> import is exact; with `transformers` installed (an optional
extra), our logits equal transformers' on the same weights in both directions; unsupported
features are refused naming the config key."""

from __future__ import annotations

import json

import pytest
import torch

from relscale.errors import DataError
from relscale.eval import hf

from .conftest import tiny_model

VOCAB = 97
VARIANTS = [  # (Qwen3-style: QK-norm, untied), Llama, tied + GQA, a head_dim unlike hidden/heads
    dict(qk_norm=True, tie_embeddings=False),
    dict(qk_norm=False, tie_embeddings=False, kv_heads=4),
    dict(qk_norm=True, tie_embeddings=True, kv_heads=1, rope_theta=500.0),
    dict(qk_norm=False, tie_embeddings=True, head_dim=16, norm_eps=1e-5),
]


def tokens(n: int = 19, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(3))


def transformers_or_skip():
    try:
        import transformers
    except ImportError:
        reason = "transformers is not installed (optional extra: pip install transformers)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return transformers


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_import_round_trip_is_exact(tmp_path, variant):
    model = tiny_model(VOCAB, seed=5, **variant)
    hf.export_hf(model, tmp_path / "hf", meta={"tokens": 1000, "seq_len": 32})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM" if variant["qk_norm"] else "LlamaForCausalLM"]
    loaded, meta = hf.load_hf_model(tmp_path / "hf")
    assert meta == {"tokens": 1000, "seq_len": 32}
    assert loaded.cfg.qk_norm == model.cfg.qk_norm and loaded.cfg.tie_embeddings == model.cfg.tie_embeddings
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    if variant["tie_embeddings"]:
        assert loaded.output.weight is loaded.embed.weight
    with torch.no_grad():
        assert torch.equal(model(tokens()), loaded(tokens()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_export_matches_transformers_logits(tmp_path, variant):
    transformers = transformers_or_skip()
    model = tiny_model(VOCAB, seed=6, **variant)
    hf.export_hf(model, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(tokens()).logits
        got = model(tokens())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _tiny_hf(transformers, family: str, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        **extra,
    )
    if family == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
        model_cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(7)
    model = model_cls(config).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("family,tied", [("qwen3", False), ("llama", False), ("qwen3", True)])
def test_transformers_checkpoint_imports_with_equal_logits(tmp_path, family, tied):
    transformers = transformers_or_skip()
    theirs = _tiny_hf(transformers, family, tie_word_embeddings=tied)
    theirs.save_pretrained(tmp_path / "hf")
    ours, _ = hf.load_hf_model(tmp_path / "hf")
    assert ours.cfg.qk_norm == (family == "qwen3") and ours.cfg.tie_embeddings == tied
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), theirs(tokens()).logits, atol=1e-5, rtol=1e-5)


def _write_config(path, **changes):
    model = tiny_model(VOCAB, seed=1, qk_norm=True)
    hf.export_hf(model, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling.rope_type"),
        (
            dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "factor": 4.0}),
            "rope_parameters.rope_type",
        ),
        (dict(attention_bias=True), "attention_bias"),
        (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "architectures"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    ],
)
def test_unsupported_features_are_refused_naming_the_key(tmp_path, changes, key):
    _write_config(tmp_path, **changes)
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        hf.load_hf_model(tmp_path)


def test_missing_and_unknown_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _write_config(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="q_proj.bias"):
        hf.load_hf_model(tmp_path)
    del state["model.layers.0.self_attn.q_proj.bias"], state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="model.norm.weight missing"):
        hf.load_hf_model(tmp_path)


def test_sharded_checkpoints_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(VOCAB, seed=2)
    hf.export_hf(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = hf.load_hf_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), model(tokens()))


def test_beginning_token_prefers_bos_then_eos(tmp_path, tokenizer):
    _write_config(tmp_path, bos_token_id=None, eos_token_id=None)
    with pytest.raises(DataError, match="start-token"):
        hf.beginning_token(tmp_path, tokenizer)
    _write_config(tmp_path, bos_token_id=None, eos_token_id=[5, 6])
    assert hf.beginning_token(tmp_path, tokenizer) == 5
    _write_config(tmp_path, bos_token_id=7, eos_token_id=5)
    assert hf.beginning_token(tmp_path, tokenizer) == 7
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|endoftext|>"}}))
    assert hf.beginning_token(tmp_path, tokenizer) == tokenizer.token_to_id("<|endoftext|>")


def test_an_unreadable_meta_file_is_named(tmp_path):
    """relscale_meta.json next to an exported checkpoint: read into the model's meta; garbage
    there is a DataError naming the file, not a raw JSON error."""
    from relscale.eval.discover import discover_models, read_info
    from relscale.eval.options import RunOptions

    hf.export_hf(tiny_model(VOCAB, seed=5), tmp_path / "hf", meta={"tokens": 1000, "seq_len": 32})
    [entry] = discover_models([tmp_path / "hf"])
    assert read_info(entry, RunOptions()).meta["tokens"] == 1000
    (tmp_path / "hf" / hf.META_FILE).write_text("{not json")
    with pytest.raises(DataError, match=r"relscale_meta\.json: unreadable model meta"):
        read_info(entry, RunOptions())
