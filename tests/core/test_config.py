"""Config loading and validation: every rejection names the offending key."""

from pathlib import Path

import pytest

from relscale.config import (
    ModelConfig,
    TrainConfig,
    config_hash,
    load_train_config,
    parse_overrides,
    to_dict,
    train_config_from_dict,
)
from relscale.errors import ConfigError


def test_defaults_validate_and_round_trip():
    cfg = load_train_config()
    assert isinstance(cfg, TrainConfig)
    assert train_config_from_dict(to_dict(cfg)) == cfg


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 7\n[model]\nhidden = 48\nheads = 3\n[optim]\nschedule = "cosine"\n')
    cfg = load_train_config(path, ["model.layers=3", "optim.lr=1e-3", "dump_steps=[1, 5]"])
    assert (cfg.steps, cfg.model.hidden, cfg.model.heads, cfg.model.layers) == (7, 48, 3, 3)
    assert cfg.optim.schedule == "cosine" and cfg.optim.lr == 1e-3 and cfg.dump_steps == [1, 5]
    assert cfg.model.d_head == 16 and cfg.model.d_ff == 192 and cfg.model.n_kv_heads == 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.hiddn=64"], "model.hiddn: unknown key"),
        (["stepz=3"], "stepz: unknown key"),
        (["steps=1.5"], "steps: expected int"),
        (["model.qk_norm=1"], "model.qk_norm: expected bool"),
        (["model.hidden=30"], "model.heads: hidden=30 is not divisible by heads=4"),
        (["model.kv_heads=3"], "model.kv_heads: heads=4 is not a multiple of kv_heads=3"),
        (["model.head_dim=7"], "model.head_dim: 7 must be even"),
        (["optim.schedule=linear"], "optim.schedule: 'linear' is not one of"),
        (["model.kernels.attention=cuda_graph"], "model.kernels.attention: 'cuda_graph' is not one of"),
        (["data.seq_len=8192"], "data.seq_len: 8192 exceeds model.max_seq_len"),
        (["micro_batch=0"], "micro_batch: must be positive"),
        (["dump_steps=[1, 'a']"], "dump_steps[1]: expected int"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_train_config(None, overrides)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_train_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_train_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[modle]\nhidden = 3\n")
    with pytest.raises(ConfigError, match=r"unknown.toml: modle: unknown key"):
        load_train_config(unknown)


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x y", "d='q'", "e=true"]) == {
        "a": {"b": 1, "c": "x y"}, "d": "q", "e": True}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_config_hash_tracks_every_field():
    a, b = ModelConfig(), ModelConfig(rope_theta=5e5)
    assert config_hash(a) == config_hash(ModelConfig()) and config_hash(a) != config_hash(b)


def test_activation_checkpointing_flag():
    assert load_train_config().activation_checkpointing is False
    assert load_train_config(None, ["activation_checkpointing=true"]).activation_checkpointing is True
    with pytest.raises(ConfigError, match="activation_checkpointing: expected bool"):
        load_train_config(None, ["activation_checkpointing=1"])


def test_rope_scaling_config_is_validated_naming_the_key():
    cfg = load_train_config(None, ['model.rope_scaling.type="llama3"', "model.rope_scaling.factor=32.0"])
    assert cfg.model.rope_scaling.type == "llama3" and cfg.model.rope_scaling.factor == 32.0
    assert train_config_from_dict(to_dict(cfg)) == cfg
    for overrides, message in [
        (['model.rope_scaling.type="yarn"'], "model.rope_scaling.type: 'yarn' is not one of"),
        (['model.rope_scaling.type="llama3"', "model.rope_scaling.factor=0.5"],
         "model.rope_scaling.factor: must be >= 1"),
        (['model.rope_scaling.type="llama3"', "model.rope_scaling.high_freq_factor=1.0"],
         "model.rope_scaling.high_freq_factor: must exceed low_freq_factor"),
        (["model.rope_scaling.scale=2.0"], "model.rope_scaling.scale: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_train_config(None, overrides)


def test_shipped_configs_resolve_by_name_and_paths_win(tmp_path, monkeypatch):
    """``tiny`` / ``tiny.toml`` name the packaged file from any directory; an existing path is used
    as it is (a local tiny.toml shadows the packaged one); anything else is refused naming it."""
    from relscale.config import PACKAGED_CONFIGS, resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny") == resolve_config("tiny.toml") == PACKAGED_CONFIGS / "tiny.toml"
    assert resolve_config("marin", "sweep") == PACKAGED_CONFIGS / "sweeps" / "marin.toml"
    local = tmp_path / "tiny.toml"
    local.write_text("steps = 3\n")
    assert resolve_config("tiny.toml") == Path("tiny.toml") and load_train_config("tiny.toml").steps == 3
    assert load_train_config("tiny").steps == 200  # a bare name: the shipped config
    for bad in ("nope", "sub/tiny", "tiny.yaml"):
        with pytest.raises(ConfigError, match=rf"^{bad}: config file not found .*small-gpu, tiny"):
            resolve_config(bad)
    with pytest.raises(ConfigError, match="marin, tiny"):
        resolve_config("tiny-cpu", "sweep")


def test_every_shipped_config_is_package_data_and_loads():
    """setup.py's package_data globs cover every shipped TOML (so a wheel carries them), and each
    loads as its kind."""
    import ast

    from relscale.config import PACKAGED_CONFIGS, packaged_configs
    from relscale.sweep.spec import load_sweep_config

    repo = PACKAGED_CONFIGS.parents[1]
    setup = ast.parse((repo / "setup.py").read_text())
    (globs,) = [
        ast.literal_eval(kw.value)["relscale"]
        for node in ast.walk(setup) if isinstance(node, ast.Call)
        for kw in node.keywords if kw.arg == "package_data"
    ]
    package = PACKAGED_CONFIGS.parent
    shipped = sorted(p.relative_to(package).as_posix() for p in PACKAGED_CONFIGS.rglob("*.toml"))
    covered = sorted({p.relative_to(package).as_posix() for g in globs for p in package.glob(g)})
    assert shipped and covered == shipped, (shipped, globs)  # Path.glob: "*" stops at "/", as in setuptools
    assert set(packaged_configs("train")) == {"tiny", "small-gpu"}
    for path in packaged_configs("train").values():
        load_train_config(path)
    for name, path in packaged_configs("sweep").items():
        assert load_sweep_config(path).name == name
