"""Llama-3 RoPE scaling through Hugging Face checkpoints, against transformers as the reference.

A random-init transformers Qwen3ForCausalLM / LlamaForCausalLM with ``rope_type: llama3`` is saved
with ``save_pretrained``, in transformers 5's spelling (``rope_parameters``) and rewritten into
transformers 4's (``rope_theta`` + ``rope_scaling``, the spelling of the released IsoFLOP
checkpoints); relscale imports it and its fp32 logits equal transformers' to 1e-4 on 96-token
sequences. A small ``original_max_position_embeddings`` (16) makes the scaled frequencies matter
at this size: the same weights with plain RoPE differ by far more than 1e-3. The other direction
too: a relscale model with llama3 scaling, exported, loads in transformers with equal logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from relscale.config import RopeScalingConfig
from relscale.errors import DataError
from relscale.eval import hf

from .conftest import tiny_model

VOCAB = 97
SEQ = 96  # well past original_max_position_embeddings, so the scaled low frequencies turn far
SCALING = dict(type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
THETA = 10000.0

transformers = pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(11))


def hf_model(family: str, seed: int = 7):
    """A random transformers model with llama3 RoPE scaling; weights large enough that positions
    matter (random norm weights too, so a swapped norm cannot go unnoticed)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={**LLAMA3, "rope_theta": THETA},
    )
    if family == "qwen3":
        config, cls = transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def to_v4_spelling(model_dir) -> dict:
    """Rewrite a saved config.json into transformers 4's spelling (rope_theta + rope_scaling)."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    path.write_text(json.dumps(config))
    return config


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_import_llama3_rope_matches_transformers(tmp_path, family, spelling):
    theirs = hf_model(family)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"  # what transformers 5 writes
    if spelling == "rope_scaling":
        config = to_v4_spelling(tmp_path)
        assert "rope_parameters" not in config and config["rope_scaling"]["rope_type"] == "llama3"
        # the reference reads this spelling too
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert theirs.config.rope_parameters["rope_type"] == "llama3"
    ours, _ = hf.load_hf_model(tmp_path)
    assert ours.cfg.rope_theta == THETA
    assert ours.cfg.rope_scaling == RopeScalingConfig(factor=4.0, **SCALING)
    x = tokens()
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours(x)
        assert max_diff(got, expected) <= 1e-4
        ours.cfg.rope_scaling = RopeScalingConfig()  # the same weights with plain RoPE
        ours._rope_tables.clear()
        assert max_diff(ours(x), expected) > 1e-3  # the scaling is what made them agree


@pytest.mark.parametrize("qk_norm", [True, False])
def test_export_llama3_rope_loads_in_transformers(tmp_path, qk_norm):
    scaling = RopeScalingConfig(factor=8.0, **SCALING)
    shape = dict(qk_norm=qk_norm, max_seq_len=128, rope_theta=THETA)
    model = tiny_model(VOCAB, seed=4, rope_scaling=scaling, **shape)
    hf.export_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # both spellings, saying the same thing
    assert config["rope_scaling"] == {**LLAMA3, "factor": 8.0}
    assert config["rope_parameters"] == {**LLAMA3, "factor": 8.0, "rope_theta": THETA}
    assert config["rope_theta"] == THETA
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert theirs.config.rope_parameters["rope_type"] == "llama3"
    x = tokens()
    with torch.no_grad():
        expected = theirs(x).logits
        assert max_diff(model(x), expected) <= 1e-4
        plain = tiny_model(VOCAB, seed=4, **shape)
        assert max_diff(plain(x), expected) > 1e-3
    back, _ = hf.load_hf_model(tmp_path / "hf")  # and back into relscale, exactly
    assert back.cfg.rope_scaling == scaling
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def write_config(path, **changes) -> None:
    model = tiny_model(VOCAB, seed=1, qk_norm=True)
    hf.export_hf(model, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_released_checkpoint_spelling_reads_as_llama3(tmp_path):
    """The released IsoFLOP checkpoints' keys (issue 12): theta 500000 and Llama 3.1's scaling."""
    released = {**LLAMA3, "factor": 8.0, "original_max_position_embeddings": 8192}
    theta, scaling = hf.read_rope({"rope_theta": 500000, "rope_scaling": released})
    assert theta == 500000.0
    expected = {**SCALING, "factor": 8.0, "original_max_position_embeddings": 8192}
    assert scaling == RopeScalingConfig(**expected)
    legacy = {k if k != "rope_type" else "type": v for k, v in released.items()}  # older files say "type"
    assert hf.read_rope({"rope_theta": 500000, "rope_scaling": legacy}) == (theta, scaling)
    # transformers' fallback: original_max_position_embeddings from max_position_embeddings
    short = {k: v for k, v in released.items() if k != "original_max_position_embeddings"}
    _, fallback = hf.read_rope({"rope_scaling": short, "max_position_embeddings": 4096})
    assert fallback.original_max_position_embeddings == 4096
    assert hf.read_rope({}) == (10000.0, RopeScalingConfig())


DEFAULT = {"rope_type": "default", "rope_theta": THETA}
NO_FACTOR = {k: v for k, v in LLAMA3.items() if k != "factor"}


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_parameters.rope_type"),
        (dict(rope_scaling={"type": "longrope"}, rope_parameters=None), "rope_scaling.rope_type"),
        (dict(rope_scaling=NO_FACTOR, rope_parameters=None), "rope_scaling.factor"),
        (dict(rope_scaling={**LLAMA3, "factor": 0.5}, rope_parameters=None), "rope_scaling.factor"),
        (dict(rope_scaling={**LLAMA3, "high_freq_factor": 1.0}, rope_parameters=None), "high_freq_factor"),
        (dict(rope_scaling=LLAMA3, rope_parameters=DEFAULT), "disagree"),
        (dict(rope_theta=500000.0, rope_parameters=DEFAULT), "rope_theta"),
        (dict(rope_parameters={**DEFAULT, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        (dict(rope_scaling="llama3"), "rope_scaling"),
    ],
)
def test_bad_rope_configs_are_refused_naming_the_key(tmp_path, changes, key):
    write_config(tmp_path, **changes)
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        hf.load_hf_model(tmp_path)
