"""The import directions of ARCHITECTURE.md, enforced on the source (no import needed).

Each part (data, train, sweep, eval, fit, kernels) reads another part only through that part's
public package API or its on-disk contract module, never through private names. The table
``ALLOWED`` below is the complete list of cross-part imports; adding one is a design decision that
belongs in ARCHITECTURE.md too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data", "train", "sweep", "eval", "fit", "kernels")

# importer (a module, or a part's package prefix) -> the modules of other parts it may import.
# A package name (``relscale.data``) means its public ``__init__`` API.
ALLOWED: dict[str, set[str]] = {
    # the dispatch point routes ops to the Triton kernels
    "relscale.ops": {"relscale.kernels", "relscale.kernels.cross_entropy", "relscale.kernels.fused_linear_ce",
                     "relscale.kernels.rmsnorm", "relscale.kernels.flash_attention"},
    # final weights: the data's tokenizer (data contract) and the run-folder contract's names
    "relscale.model_io": {"relscale.data", "relscale.data.layout", "relscale.train",
                          "relscale.train.run_dir"},
    # the trainer reads prepared data; its CLI (a caller, not the trainer) attaches eval's dump hook
    "relscale.train": {"relscale.data", "relscale.data.layout"},
    "relscale.train.cli": {"relscale.eval", "relscale.eval.hook"},
    # sweeps call the trainer through train(config) and read prepared data
    "relscale.sweep": {"relscale.data", "relscale.data.layout", "relscale.train", "relscale.train.run_dir",
                       "relscale.train.checkpoint", "relscale.train.cli"},
    # evaluation reads data, run folders and sweep folders through their contracts; DCP tensors
    # only through the trainer's safe loader
    "relscale.eval": {"relscale.data", "relscale.data.layout", "relscale.data.tokenizer",
                      "relscale.train", "relscale.train.run_dir", "relscale.train.checkpoint",
                      "relscale.sweep", "relscale.sweep.layout"},
    # fitting reads tables: sweep results through the torch-free sweep contract, dumps as Parquet
    "relscale.fit": {"relscale.sweep", "relscale.sweep.layout", "relscale.eval.dump"},
    "relscale.data": set(),
    "relscale.kernels": set(),
}
# The top-level modules (config, ops, model, counting, model_io, errors, atomic, ...) form the core
# that every part may use, with two exceptions: fit is numpy/scipy only, and the kernels import
# only torch and triton.
CORE_FOR: dict[str, set[str] | None] = {
    "relscale.fit": {"relscale.errors", "relscale.atomic"},
    "relscale.kernels": set(),
    "relscale.data": {"relscale.errors", "relscale.atomic", "relscale.config"},
}
# The command-line front ends and the demo drive every part.
FRONT_ENDS = ("relscale.cli", "relscale.__main__", "relscale.bench_cli", "relscale.demo")


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "relscale").rglob("*.py"):
        found[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    for path in (ROOT / "kernels").rglob("*.py"):
        found["relscale.kernels." + ".".join(path.relative_to(ROOT / "kernels").with_suffix("").parts)] = path
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


MODULES = _modules()


def _part(module: str) -> str | None:
    """The part a module belongs to: one of PARTS, "core" for top-level modules, None for relscale."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in PARTS else "core"


def _core_allowed(module: str, target: str) -> bool:
    for prefix, allowed in CORE_FOR.items():
        if module == prefix or module.startswith(prefix + "."):
            return target in allowed or target == "relscale._C"
    return True


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(target module, imported name, line) of every absolute relscale import, function-level too."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        absolute = isinstance(node, ast.ImportFrom) and node.level == 0
        if absolute and (node.module or "").startswith("relscale"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("relscale")]
    return found


def _rules_for(module: str) -> set[str]:
    allowed: set[str] = set()
    for prefix, targets in ALLOWED.items():
        if module == prefix or module.startswith(prefix + "."):
            allowed |= targets
    return allowed


def test_the_scan_sees_every_part():
    assert {_part(m) for m in MODULES} >= set(PARTS)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in FRONT_ENDS))
def test_cross_part_imports_follow_the_allowed_directions(module):
    mine = _part(module)
    wrong = []
    for target, name, line in _imports(module):
        theirs = _part(target)
        if theirs is None or theirs == mine:
            continue
        if name.startswith("_") and not (module == "relscale.ext" and name == "_C"):
            wrong.append(f"line {line}: private name {target}.{name}")
        elif theirs == "core":
            if not _core_allowed(module, target):
                wrong.append(f"line {line}: {target} (CORE_FOR allows {module} no such import)")
        elif target not in _rules_for(module):
            wrong.append(f"line {line}: {target} (not in ALLOWED for {module})")
    assert not wrong, f"{MODULES[module].relative_to(ROOT)}: " + "; ".join(wrong)


def test_no_private_names_across_top_level_modules():
    # ops, model, counting, config, model_io ... are parts too: nobody imports their _names,
    # except ext loading the compiled extension relscale._C.
    wrong = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if name.startswith("_") and target.split(".")[:2] != module.split(".")[:2]:
                if (module, name) != ("relscale.ext", "_C"):
                    wrong.append(f"{module} line {line}: {target}.{name}")
    assert not wrong, wrong


def test_the_allowed_table_catches_a_forbidden_import():
    # The check itself can fail: a fit module importing the model would be reported.
    assert "relscale.model" not in _rules_for("relscale.fit.io")
    assert "relscale.eval" not in _rules_for("relscale.train.loop")
    assert "relscale.eval" in _rules_for("relscale.train.cli")
    assert not _core_allowed("relscale.fit.io", "relscale.model")
    assert not _core_allowed("relscale.kernels.rmsnorm", "relscale.ops")


@pytest.mark.parametrize(
    "module",
    ["relscale.fit", "relscale.fit.cli", "relscale.data.layout", "relscale.sweep.layout",
     "relscale.train.run_dir", "relscale.eval.dump"],
)
def test_contracts_and_fit_import_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing {module} imports torch{done.stderr[-400:]}"
