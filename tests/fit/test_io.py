"""Inputs: eval-dump aggregation (ratio of sums, transforms), the sweep index, tables, bad input."""

import math

import numpy as np
import pandas as pd
import pytest

from relscale.errors import DataError
from relscale.fit import DroppedDataWarning, aggregate_dumps, from_table, load, read_dumps, read_results_index


def _model_columns(model: str, params: float, tokens: float) -> dict:
    return {
        "model_id": model,
        "params": params,
        "non_embedding_params": params * 0.8,
        "tokens": tokens,
        "flops_train": 6 * params * tokens,
        "flops_marin": 2 * params * tokens,
        "budget": 2 * params * tokens,
        "hidden": 64,
        "layers": 2,
    }


def _text_dump(model, params, tokens, nll, n_tokens, n_bytes, group=None, dataset="paloma"):
    n = len(nll)
    return pd.DataFrame(
        {
            **{k: [v] * n for k, v in _model_columns(model, params, tokens).items()},
            "dataset": dataset,
            "group": [group] * n,
            "example_id": np.arange(n),
            "nll": nll,
            "n_tokens": n_tokens,
            "n_bytes": n_bytes,
            "bpb": np.asarray(nll) / (math.log(2) * np.asarray(n_bytes)),
        }
    )


def _mc_dump(model, params, tokens, acc, prob, group):
    n = len(acc)
    return pd.DataFrame(
        {
            **{k: [v] * n for k, v in _model_columns(model, params, tokens).items()},
            "dataset": "mmlu",
            "group": group,
            "example_id": np.arange(n),
            "acc": acc,
            "prob_correct": prob,
            "logprob_correct": np.log(prob),
        }
    )


def test_text_metrics_are_ratios_of_sums(tmp_path):
    _text_dump("a", 1e6, 1e8, [10.0, 30.0], [5, 15], [20, 60], group="web").to_parquet(tmp_path / "a.parquet")
    _text_dump("b", 2e6, 1e8, [8.0, 2.0], [4, 1], [10, 10], group="web").to_parquet(tmp_path / "b.parquet")
    examples = read_dumps(tmp_path)
    nll = aggregate_dumps(examples, metric="nll").frame.set_index("model_id")
    assert nll.loc["a", "error"] == pytest.approx(40 / 20)  # not the mean of per-example ratios
    assert nll.loc["b", "error"] == pytest.approx(10 / 5)
    bpb = aggregate_dumps(examples, metric="bpb", flops="flops_train")
    assert bpb.frame.set_index("model_id").loc["a", "error"] == pytest.approx(40 / (math.log(2) * 80))
    assert bpb.flop_convention == "flops_train"
    assert bpb.frame.set_index("model_id").loc["a", "flops"] == pytest.approx(6e14)


def test_multiple_choice_transforms_and_group_labels(tmp_path):
    _mc_dump("a", 1e6, 1e8, [1, 0, 1, 1], [0.9, 0.2, 0.6, 0.7], "algebra").to_parquet(tmp_path / "a.parquet")
    examples = read_dumps([tmp_path / "a.parquet"])
    acc = aggregate_dumps(examples, metric="acc")
    assert acc.transform == "one_minus" and acc.frame["error"].iloc[0] == pytest.approx(0.25)
    prob = aggregate_dumps(examples, metric="prob_correct")
    assert prob.frame["error"].iloc[0] == pytest.approx(-math.log(0.6))
    logp = aggregate_dumps(examples, metric="logprob_correct", transform="neg")
    assert logp.frame["error"].iloc[0] == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.6, 0.7])))
    assert acc.groups == ["algebra"]
    text = _text_dump("a", 1e6, 1e8, [1.0], [1], [4], group=None, dataset="c4")
    assert aggregate_dumps(text, metric="nll").groups == ["c4"]  # no group: the dataset names it


def test_bad_dumps_name_the_column_file_and_row(tmp_path):
    bad = _text_dump("a", 1e6, 1e8, [1.0, np.nan, 2.0], [1, 1, 1], [4, 4, 4], group="web")
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"'nll'.*bad\.parquet:1"):
        aggregate_dumps(read_dumps(tmp_path), metric="nll")
    with pytest.raises(DataError, match="n_bytes"):
        aggregate_dumps(bad.drop(columns=["n_bytes"]), metric="bpb")
    with pytest.raises(DataError, match="unknown metric"):
        aggregate_dumps(bad, metric="perplexity")
    perfect = _mc_dump("a", 1e6, 1e8, [1, 1], [0.9, 0.8], "x")
    with pytest.raises(DataError, match="> 0"):  # accuracy 1 -> error 0 cannot be fitted in log space
        aggregate_dumps(perfect, metric="acc")
    with pytest.raises(DataError, match="does not exist"):
        read_dumps(tmp_path / "missing")


def test_results_index_keeps_finished_runs(tmp_path):
    index = pd.DataFrame(
        {
            "run_id": ["r1", "r2", "r3"],
            "dataset": "sotu",
            "budget": 1e18,
            "params": [1e6, 2e6, 4e6],
            "tokens": [1e8, 5e7, 2.5e7],
            "flops_train": 6e14,
            "flops_marin": 2e14,
            "final_val_loss": [3.0, 2.9, np.nan],
            "status": ["done", "done", "failed"],
        }
    )
    index.to_parquet(tmp_path / "results.parquet")
    data = read_results_index(tmp_path)
    assert list(data.frame["model_id"]) == ["r1", "r2"] and data.flop_convention == "flops_marin"
    assert load(tmp_path / "results.parquet").frame.shape[0] == 2  # detected as an index
    index.loc[1, "final_val_loss"] = np.nan
    index.to_parquet(tmp_path / "results.parquet")
    with pytest.raises(DataError, match=r"'final_val_loss'.*\[1\]"):
        read_results_index(tmp_path)


def test_tables_name_missing_columns_and_nan_rows(tmp_path):
    table = pd.DataFrame({"N": [1e6, 2e6, 3e6], "C": [1e18, 1e18, 1e18], "L": [3.0, np.nan, 2.8]})
    with pytest.raises(DataError, match="'loss'"):
        from_table(table, columns={"params": "N", "flops": "C"})
    with pytest.raises(DataError, match=r"'L'.*rows \[1\]"):
        from_table(table, columns={"params": "N", "flops": "C", "loss": "L"})
    with pytest.warns(DroppedDataWarning, match=r"\[1\]"):
        data = from_table(table, columns={"params": "N", "flops": "C", "loss": "L"}, dropna=True)
    assert data.frame["tokens"].tolist() == pytest.approx([1e18 / 6e6, 1e18 / 18e6])  # D = C / 6N
    assert data.flop_convention == "C"
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="'Q'"):
        load(tmp_path / "t.csv", columns={"params": "N", "flops": "C", "loss": "Q"})


def test_dumps_with_several_groupings_are_kept_apart_or_selected():
    import pandas as pd

    from relscale.fit.io import aggregate_dumps

    rows = []
    for model, scale in (("m1", 1.0), ("m2", 2.0)):
        for doc, (century, kind) in enumerate((("1800s", "spoken"), ("1900s", "written"))):
            for grouping, group in (("century", century), ("sotu_type", kind)):
                rows.append(dict(model_id=model, params=10 * scale, non_embedding_params=5 * scale,
                                 tokens=100 * scale, flops_train=3e3 * scale, flops_marin=1e3 * scale,
                                 dataset="d", grouping=grouping, group=group, example_id=str(doc),
                                 nll=(doc + 1) * 10.0 / scale, n_tokens=10, n_bytes=40))
    frame = pd.DataFrame(rows)
    labelled = aggregate_dumps(frame, metric="nll")
    expected = ["century=1800s", "century=1900s", "sotu_type=spoken", "sotu_type=written"]
    assert sorted(labelled.groups) == expected
    century = aggregate_dumps(frame, metric="nll", grouping="century")
    assert sorted(century.groups) == ["1800s", "1900s"]
    values = century.frame.set_index(["model_id", "group"])["value"]
    assert values[("m1", "1900s")] == 2.0 and values[("m2", "1800s")] == 0.5  # nll / n_tokens
    import pytest

    from relscale.errors import DataError

    with pytest.raises(DataError, match="no rows with grouping 'party'"):
        aggregate_dumps(frame, metric="nll", grouping="party")
