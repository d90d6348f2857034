"""The sweep-folder contract (relscale.sweep.layout) and one truth per config knob: readers get
runs, states and results through it (also from a damaged index), it never imports torch, and a
sweep config that sets a key the grid owns is refused naming the key."""

import json
import subprocess
import sys
import warnings

import pytest

from relscale.config import DataConfig, OptimConfig, TrainConfig
from relscale.errors import ConfigError, DataError
from relscale.sweep import layout
from relscale.sweep.results import INDEX_FILE, update_index
from relscale.sweep.spec import SweepConfig, load_sweep_config, sweep_config_from_dict
from tests.sweep.test_registry import finish, synthetic_sweep


def test_sweep_runs_lists_every_run_with_its_state(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 4)
    done, diverged, running = sweep.claim("w"), sweep.claim("w"), sweep.claim("w")
    finish(sweep, done, "done")
    finish(sweep, diverged, "diverged")
    for claim in (done, diverged):
        sweep.release(claim)
    runs = layout.sweep_runs(sweep.root)
    assert [r.run_id for r in runs] == [r.run_id for r in sweep.records]
    assert [r.state for r in runs] == ["done", "diverged", "running", "pending"]
    assert runs[0].run_dir == sweep.root / "runs" / done.record.folder
    assert runs[0].folder == done.record.folder
    assert runs[0].row["final_val_loss"] == 2.0 and runs[0].row["status"] == "done"  # the results row
    assert runs[3].row == sweep.records[3].row  # the grid row while unfinished
    assert running.lease.run_id == runs[2].run_id
    train = layout.run_train_config(sweep.root, runs[3].run_id)  # the config values the run trains with
    assert train.steps == runs[3].row["steps"] and train.out_dir == str(runs[3].run_dir)


def test_finished_runs_joins_index_and_new_marks(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 4)
    for status in ("done", "diverged", "done"):
        finish(sweep, sweep.claim("w"), status)
    assert update_index(sweep) == 3
    late = sweep.claim("w")
    finish(sweep, late)  # finished after the index was written
    assert layout.is_sweep_dir(sweep.root) and not layout.is_sweep_dir(tmp_path)
    done = layout.finished_runs(sweep.root)
    assert len(done) == 3 and all(r.state == "done" for r in done)
    assert done[-1].run_id == late.record.run_id  # the mark-only run comes after the index's
    assert {r.run_dir for r in done} == {sweep.root / "runs" / r.folder for r in done}
    assert len(layout.finished_runs(sweep.root, ("done", "diverged"))) == 4
    # the same answer without the run listing (a copied results folder)
    (sweep.root / "runs.json").unlink()
    (sweep.root / "sweep.json").unlink()
    assert layout.finished_runs(sweep.root) == done


def reference_finished(sweep_dir):
    """The evaluator's listing before the contract existed (relscale/eval/runner.py _sweep_runs at
    8d0c9cd), kept here as the independent reference: the index's done rows, then done marks."""
    import pyarrow.parquet as pq

    runs = {}
    index = sweep_dir / "results.parquet"
    if index.is_file():
        for row in pq.read_table(index).to_pylist():
            if row.get("status") == "done":
                runs[row["run_id"]] = (sweep_dir / (row.get("run_dir") or f"runs/{row['run_id']}"), row)
    for mark in sorted((sweep_dir / "marks").glob("*.done")):
        run_id = mark.name[: -len(".done")]
        if run_id in runs or mark.name.startswith("."):
            continue
        row = json.loads(mark.read_text()).get("row") or {}
        runs[run_id] = (sweep_dir / (row.get("run_dir") or f"runs/{run_id}"), row)
    return [(run_id, run_dir, row) for run_id, (run_dir, row) in runs.items()]


def test_finished_runs_equals_the_evaluators_former_listing(tmp_path):
    """finished_runs replaced relscale.eval.runner._sweep_runs: the same runs, dirs and rows."""
    sweep = synthetic_sweep(tmp_path / "s", 5)
    for status in ("done", "failed", "done"):
        finish(sweep, sweep.claim("w"), status)
    update_index(sweep)
    finish(sweep, sweep.claim("w"))
    ours = [(r.run_id, r.run_dir, r.row) for r in layout.finished_runs(sweep.root)]
    expected = reference_finished(sweep.root)
    assert len(ours) == 3
    assert [(a, b) for a, b, _ in ours] == [(a, b) for a, b, _ in expected]
    assert [row["budget"] for *_, row in ours] == [row["budget"] for *_, row in expected]
    assert [row["final_val_loss"] for *_, row in ours] == [row["final_val_loss"] for *_, row in expected]


def test_read_results_rebuilds_or_assembles_from_the_marks(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 3)
    for _ in range(3):
        finish(sweep, sweep.claim("w"))
    # no results.parquet yet: assembled from the marks in memory, nothing written
    table = layout.read_results(sweep.root)
    assert table.num_rows == 3 and not layout.results_path(sweep.root).exists()
    assert update_index(sweep) == 3
    expected = layout.read_results(sweep.root).to_pylist()
    assert sorted(map(json.dumps, table.to_pylist())) == sorted(map(json.dumps, expected))
    layout.results_path(sweep.root).write_bytes(b"PAR1 garbage PAR1")
    with pytest.warns(UserWarning, match="rebuilding it from the run marks"):
        assert layout.read_results(sweep.root).to_pylist() == expected
    # an unreadable index with no marks to rebuild it from is an error naming the file, left as it is
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / INDEX_FILE).write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"{INDEX_FILE}: unreadable results index.*no marks/"):
        layout.read_results(lone)
    assert (lone / INDEX_FILE).read_bytes() == b"not parquet"
    assert layout.read_results(tmp_path / "nothing-here").num_rows == 0


def test_contracts_do_not_import_torch(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 2)
    finish(sweep, sweep.claim("w"))
    code = (
        "import sys, warnings\n"
        "from relscale.sweep import layout\n"
        "import relscale.data.layout, relscale.fit.io\n"
        f"assert len(layout.finished_runs({str(sweep.root)!r})) == 1\n"
        f"assert len(layout.sweep_runs({str(sweep.root)!r})) == 2\n"
        f"assert layout.read_results({str(sweep.root)!r}).num_rows == 1\n"
        "bad = [m for m in ('torch', 'triton') if m in sys.modules]\n"
        "assert not bad, f'a contract module imported {bad}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ one truth per config knob

BASE = {"budgets": [1e18], "seq_len": 128}


@pytest.mark.parametrize(
    "train, beta2_rule, key",
    [
        ({"data": {"seq_len": 64}}, "marin", r"train\.data\.seq_len: 64 is set by the grid from seq_len "
                                             r"\(grid value: 128\)"),
        ({"data": {"path": "elsewhere"}}, "marin", r"train\.data\.path: 'elsewhere' .*\[\[datasets\]\] path"),
        ({"model": {"hidden": 256}}, "marin", r"train\.model\.hidden: .*\[width\]"),
        ({"model": {"layers": 3}}, "marin", r"train\.model\.layers: .*\[depth\]"),
        ({"model": {"max_seq_len": 512}}, "marin", r"train\.model\.max_seq_len: 512 .*seq_len"),
        ({"model": {"mlp_hidden": 512}}, "marin", r"train\.model\.mlp_hidden: .*mlp_ratio"),
        ({"optim": {"lr": 1e-3}}, "marin", r"train\.optim\.lr: 0\.001 .*\[lr\]"),
        ({"optim": {"lr": 0.02}}, "fixed", r"train\.optim\.lr: 0\.02 .*\[lr\]"),
        ({"optim": {"beta2": 0.99}}, "marin", r"train\.optim\.beta2: 0\.99 .*\[beta2\]"),
        ({"optim": {"preset": "marin"}}, "marin", r"train\.optim\.preset: 'marin' is refused"),
        ({"steps": 5}, "marin", r"train\.steps: 5 .*budgets"),
        ({"micro_batch": 2}, "marin", r"train\.micro_batch: 2 .*\[batch\]"),
        ({"out_dir": "x"}, "marin", r"train\.out_dir: 'x' .*sweep directory"),
    ],
)
def test_a_key_the_grid_owns_is_refused(tmp_path, train, beta2_rule, key):
    path = tmp_path / "sweep.toml"
    with pytest.raises(ConfigError, match=key) as info:
        sweep_config_from_dict({**BASE, "beta2": {"rule": beta2_rule}, "train": train}, str(path))
    assert str(info.value).startswith(f"{path}: train.")


def test_the_toml_example_of_the_issue_is_refused(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('budgets = [1e18]\nseq_len = 128\n[train.data]\nseq_len = 64\n')
    message = r"sweep\.toml: train\.data\.seq_len: 64 .*remove it from \[train\.data\]"
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(path)


def test_values_the_grid_would_give_anyway_are_accepted():
    cfg = sweep_config_from_dict({
        **BASE, "beta2": {"rule": "fixed"}, "datasets": [{"name": "a", "path": "p"}],
        "train": {"data": {"seq_len": 128, "path": "p"}, "optim": {"beta2": 0.99},
                  "model": {"max_seq_len": 128, "qk_norm": False}, "seed": 3}})
    # beta2 rule "fixed": [train.optim] beta2 is the source
    assert cfg.train.optim.beta2 == 0.99 and cfg.train.seed == 3
    # two datasets: the data path differs per run
    with pytest.raises(ConfigError, match=r"train\.data\.path: 'p' .*\[\[datasets\]\]"):
        sweep_config_from_dict({**BASE, "datasets": [{"name": "a", "path": "p"}, {"name": "b", "path": "q"}],
                                "train": {"data": {"path": "p"}}})


def test_a_config_built_in_python_is_checked_too():
    with pytest.raises(ConfigError, match=r"train\.data\.seq_len: 64 is set by the grid"):
        SweepConfig(budgets=[1e18], seq_len=128, train=TrainConfig(data=DataConfig(seq_len=64))).validate()
    with pytest.raises(ConfigError, match=r"train\.optim\.lr: 0\.5"):
        SweepConfig(budgets=[1e18], train=TrainConfig(optim=OptimConfig(lr=0.5))).validate()
    SweepConfig(budgets=[1e18], seq_len=64, train=TrainConfig(data=DataConfig(seq_len=64))).validate()


def test_a_full_dump_loads_back(tmp_path, micro_config):
    """sweep_config_to_dict written as TOML lists every train key at its default: not a conflict."""
    from relscale.sweep.executors import to_toml
    from relscale.sweep.spec import sweep_config_to_dict

    cfg = micro_config()
    path = tmp_path / "dump.toml"
    path.write_text(to_toml(sweep_config_to_dict(cfg)))
    assert load_sweep_config(path) == cfg


def test_a_stored_sweep_json_is_not_rechecked():
    """sweep.json stores every train key; reading it back must not count them as set by hand."""
    from relscale.sweep.presets import tiny
    from relscale.sweep.spec import sweep_config_from_json, sweep_config_to_dict

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = json.loads(json.dumps(sweep_config_to_dict(tiny())))
        assert sweep_config_from_json(data) == tiny()


@pytest.mark.parametrize("command", [["grid"], ["sweep", "run", "{tmp}/sweep", "--config"]])
def test_the_cli_refuses_it_in_one_line_exit_2(tmp_path, capsys, command):
    from relscale.cli import main

    path = tmp_path / "sweep.toml"
    path.write_text('budgets = [1e18]\nseq_len = 128\n[train.data]\nseq_len = 64\n')
    argv = [part.format(tmp=tmp_path) for part in command] + [str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.data.seq_len: 64 is set by the grid from seq_len" in err
    assert not (tmp_path / "sweep").exists()  # nothing created


def test_one_config_check_before_the_grid_is_built(tmp_path):
    """init_sweep on a folder holding another sweep is refused by Sweep.check_same_config, naming
    the differing keys, before the grid (which would need the prepared data) is built."""
    from relscale.sweep.spec import DatasetSpec, sweep_config_to_dict
    from relscale.sweep.start import init_sweep

    cfg = SweepConfig(budgets=[1e18], datasets=[DatasetSpec(name="x", path=str(tmp_path / "no-data"))])
    sweep = synthetic_sweep(tmp_path / "s", 2, config={**sweep_config_to_dict(cfg), "budgets": [2e18]})
    with pytest.raises(ConfigError, match=r"another config; differences \(existing -> given\): "
                                          r"budgets: \[2e\+18\] -> \[1e\+18\]$"):
        init_sweep(sweep.root, cfg)
    assert init_sweep(sweep.root, SweepConfig(budgets=[2e18], datasets=cfg.datasets)).root == sweep.root
