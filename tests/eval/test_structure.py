"""The eval package's structure: no import cycle between its modules, the dump contract without
torch, and the trainer-facing hook importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import relscale.eval

PACKAGE = Path(relscale.eval.__file__).parent


def _eval_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The relscale.eval modules (files of ``package``) that ``path`` imports anywhere (module
    level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "relscale.eval":  # from relscale.eval import hf, adapters, ...
                found |= {a.name for a in node.names if (package / f"{a.name}.py").is_file()}
            elif node.module.startswith("relscale.eval."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("relscale.eval.")}
    return found - {path.stem}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> modules it imports), by depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_eval_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _eval_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert {"dump", "sets", "discover", "hook", "runner", "writer", "formats", "adapters"} <= set(graph)
    assert {"dump", "runner"} <= graph["hook"]  # the walker sees module-level imports
    assert "adapters" in graph["sets"] and "formats" in graph["adapters"]
    assert _cycles(graph) == [], "import cycles in relscale.eval"


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The walker and the search really find a cycle, also through an import inside a function."""
    (tmp_path / "a.py").write_text("from relscale.eval.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from relscale.eval import c\n")
    (tmp_path / "c.py").write_text("import relscale.eval.a\n")
    (tmp_path / "d.py").write_text("from relscale.eval.a import x\n")
    graph = {name: _eval_imports(tmp_path / f"{name}.py", tmp_path) for name in "abcd"}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_dump_contract_and_hook_import_alone():
    """relscale.eval.dump (what the fits read) imports no torch; hook and sets import on their own."""
    code = (
        "import sys\n"
        "import relscale.eval.dump\n"
        "assert 'torch' not in sys.modules, 'relscale.eval.dump imported torch'\n"
        "import relscale.eval.sets\n"
        "import relscale.eval.hook\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_dump_contract_schema_and_settings_round_trip(tmp_path):
    from relscale.errors import DataError
    from relscale.eval import dump, writer

    path = dump.dump_path(tmp_path, "ice/GB texts", "run@step_0000010")
    assert path == tmp_path / "ice_GB_texts" / "run@step_0000010.parquet"
    columns = {name: None for name, _ in dump.MODEL_FIELDS} | {"model_id": "m"}
    rows = [{"example_id": "0", "groups": {"century": "19th"}, "nll": 2.0, "n_tokens": 4, "n_bytes": 8,
             "bpb": 2.0 / (8 * 0.6931471805599453)}]
    assert writer.write_dump(path, "text", columns, "ice", rows, {"context": 64, "kind": "text"})
    assert dump.is_finished_dump(path)
    assert dump.read_settings(path) == {"context": 64, "kind": "text"}
    table = pq.read_table(path)
    assert table.schema.remove_metadata() == dump.schema("text")
    assert table.column("grouping").to_pylist() == ["century"]
    assert table.column("group").to_pylist() == ["19th"]
    assert dump.dump_files(path.parent) == [path]
    assert dump.has_dump_columns(table.column_names)
    assert not dump.has_dump_columns(["run_id", "model_id", "params"])  # a results table
    garbage = tmp_path / "x.parquet"
    garbage.write_bytes(b"not parquet")
    assert not dump.is_finished_dump(garbage)
    with pytest.raises(DataError, match="x.parquet: not a readable eval dump"):
        dump.read_settings(garbage)
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")  # Parquet without our metadata
    assert not dump.is_finished_dump(tmp_path / "plain.parquet")


def test_eval_knows_run_and_sweep_folders_only_through_their_contracts():
    """No eval module spells a file name of the sweep folder or the run folder's checkpoints:
    they go through relscale.sweep.layout and relscale.train.run_dir (issue 16)."""
    from relscale.sweep import layout
    from relscale.train import run_dir

    names = [layout.RESULTS_INDEX, layout.RUN_LISTING, layout.SWEEP_CONFIG, f'"{layout.MARKS_DIR}"',
             f'"{run_dir.CHECKPOINTS}"', run_dir.CHECKPOINT_META, "step_(", ".done", "STEP_DIR", "read_meta("]
    found = {
        (path.name, name)
        for path in PACKAGE.glob("*.py")
        for name in names
        if name in path.read_text()
    }
    assert found == set()


def test_package_exports_resolve():
    """Every name relscale.eval offers lazily (relscale/demo.py, relscale/train/cli.py use them)
    is found in its module, and the compatibility names of runner.py still import."""
    import importlib

    for name in relscale.eval.__all__:
        assert getattr(relscale.eval, name) is not None, name
    runner = importlib.import_module("relscale.eval.runner")
    for name in ("RunOptions", "discover_models", "read_info", "load_weights", "load_tokenizer_for",
                 "model_columns", "own_tokenizer", "_sweep_runs", "evaluate", "Evaluator"):
        assert hasattr(runner, name), name
