"""The README flow for released checkpoints, end to end: a folder of Hugging Face checkpoints laid
out as on the hub and named like the released IsoFLOP suite -> ``relscale eval FOLDER`` ->
``relscale fit``. Nothing but the folder is given: budget, width and depth come from the names,
training tokens and FLOPs from the names and configs, the tokenizer and BOS from each folder.

The checkpoints are random-init transformers Qwen3ForCausalLM models with Llama-3 RoPE scaling,
saved with ``save_pretrained`` (one sharded, with an index) and their config.json rewritten in the
released files' spelling (``rope_theta`` + ``rope_scaling``), each with a ``tokenizers``
tokenizer.json and a tokenizer_config.json naming the BOS.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from relscale.cli import main
from relscale.counting import flops_per_token_marin, param_counts
from relscale.eval import hf
from relscale.eval.writer import read_settings

from .conftest import make_docs

transformers = pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")

SEQ_LEN = 64  # max_position_embeddings: the training length Levanter writes there
BATCH = 8
BUDGETS = (3e10, 1e11, 3e11)
SHAPES = ((32, 2), (48, 2), (64, 3), (80, 3), (96, 4))  # (d, L); head_dim 16, MLP 4d
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
BOS = "<|endoftext|>"


DOCS = make_docs(24, seed=3)


def planted_excess(b: int, s: int) -> float:
    """Loss above log(vocab) (nats) planted into model s (width index) at budget b: lower at larger
    budgets, and lowest at a width that grows with the budget (index 1, 2, 3: d = 48, 64, 80)."""
    return 0.1 * (len(BUDGETS) - b) + 0.1 * (s - (1 + b)) ** 2


def plant(lm_head: torch.Tensor, excess: float, used: list[int]) -> None:
    """lm_head weights (vocab, d) that cost ``excess`` nats over the uniform prediction on text
    made of the ``used`` tokens: their rows 0 (logit 0, whatever the token), the other rows
    random, so that every position's log-partition is log(n_used + sum_j exp(z_j)) with z_j ~
    N(0, t^2) (the final norm's output has unit RMS: t^2 = d * std^2). With many unused tokens
    the sum is close to n_unused * exp(t^2 / 2), so t^2 = 2 log((V e^excess - n_used) / n_unused)."""
    vocab, d = lm_head.shape
    unused = vocab - len(used)
    t2 = 2 * math.log((vocab * math.exp(excess) - len(used)) / unused)
    lm_head.normal_(0.0, math.sqrt(t2 / d))
    lm_head[used] = 0.0


def released_like(folder, tokenizer, hidden: int, layers: int, seed: int, shard: bool, excess: float) -> None:
    vocab = tokenizer.get_vocab_size()
    config = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 16,
        num_key_value_heads=hidden // 16,
        head_dim=16,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        rope_parameters={**LLAMA3, "rope_theta": 500000.0},
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(BOS),
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    used = {t for d in DOCS for text in (d["text"], " " + d["text"]) for t in tokenizer.encode(text).ids}
    with torch.no_grad():
        plant(model.lm_head.weight, excess, sorted(used))
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    saved = json.loads((folder / "config.json").read_text())
    params = saved.pop("rope_parameters")  # the released files' spelling (transformers 4 / Levanter)
    saved["rope_theta"] = params.pop("rope_theta")
    saved["rope_scaling"] = params
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": BOS})
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("downloads") / "marin-isoflop"
    for b, budget in enumerate(BUDGETS):
        for s, (d, layers) in enumerate(SHAPES):
            name = f"isoflop-{budget:.0e}-d{d}-L{layers}-B{BATCH}-tinycorpus"
            excess = planted_excess(b, s)
            released_like(
                root / name, tokenizer, d, layers, 10 * b + s, shard=(b, s) == (0, 0), excess=excess
            )
    (root / "README.md").write_text("not a checkpoint: ignored")
    return root


@pytest.mark.slow
def test_a_folder_of_released_checkpoints_is_scored_and_fitted(tmp_path, checkpoints, tokenizer):
    sharded = checkpoints / f"isoflop-{BUDGETS[0]:.0e}-d32-L2-B{BATCH}-tinycorpus"
    assert (sharded / "model.safetensors.index.json").is_file()  # the sharded hub layout is covered
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    evals = tmp_path / "evals"
    assert (
        main(
            [
                "eval",
                str(checkpoints),
                "--eval",
                f"docs=text:{docs}",
                "--group-by",
                "century",
                "--out",
                str(evals),
                "--quiet",
            ]
        )
        == 0
    )
    dumps = pd.read_parquet(evals / "docs")
    per_model = dumps.groupby("model_id")[
        ["budget", "params", "tokens", "flops_marin", "hidden", "layers"]
    ].first()
    assert len(per_model) == len(BUDGETS) * len(SHAPES)
    for budget in BUDGETS:
        for d, layers in SHAPES:
            row = per_model.loc[f"isoflop-{budget:.0e}-d{d}-L{layers}-B{BATCH}-tinycorpus"]
            cfg = hf.hf_to_model_config(json.loads((checkpoints / row.name / "config.json").read_text()))
            assert cfg.rope_scaling.type == "llama3"
            per_step = flops_per_token_marin(cfg, SEQ_LEN) * SEQ_LEN * BATCH
            steps = round(budget / per_step)
            assert (row.budget, row.hidden, row.layers) == (budget, d, layers)
            assert row.params == param_counts(cfg).total
            assert row.tokens == steps * BATCH * SEQ_LEN
            assert row.flops_marin == pytest.approx(budget, rel=0.01)  # whole steps miss C by < 1%
    # each model's first document token is predicted from the BOS of tokenizer_config.json
    for dump in (evals / "docs").glob("*.parquet"):
        assert read_settings(dump)["start_id"] == tokenizer.token_to_id(BOS)

    # the planted best width of each budget has the lowest measured loss
    text = dumps[dumps.grouping == "century"]
    loss = text.groupby(["budget", "hidden"]).nll.sum() / text.groupby(["budget", "hidden"]).n_tokens.sum()
    assert [loss[budget].idxmin() for budget in BUDGETS] == [SHAPES[1 + b][0] for b in range(len(BUDGETS))]

    fits = tmp_path / "fits"
    args = [
        "fit",
        str(evals / "docs"),
        "--out",
        str(fits),
        "--no-plots",
        "--n-boot",
        "50",
        "--parametric-boot",
        "2",
    ]
    assert main(args) == 0
    iso = pd.read_csv(fits / "isoflop_budgets.csv").sort_values("budget")
    assert iso["budget"].tolist() == list(BUDGETS)  # one IsoFLOP parabola per named budget
    assert iso["n_points"].tolist() == [len(SHAPES)] * len(BUDGETS)
    assert (iso["n_opt"].diff().dropna() > 0).all()  # the planted optimum grows with the budget
    assert (fits / "relative_laws.csv").is_file() and (fits / "summary.txt").is_file()
