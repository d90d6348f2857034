"""The build switches of setup.py's _extensions() and the warn-once fallback of relscale.ext."""

import ast
import warnings
from pathlib import Path

import pytest
import torch
from setuptools import Distribution, Extension
from torch.utils import cpp_extension

from relscale import ext

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"


@pytest.fixture(scope="module")
def setup_module_namespace() -> dict:
    """setup.py's imports and functions, without running its setup() call."""
    tree = ast.parse(SETUP_PY.read_text())
    definitions = ast.Import | ast.ImportFrom | ast.FunctionDef | ast.Assign
    keep = [node for node in tree.body if isinstance(node, definitions)]
    # drop `ext_modules, cmdclass = _extensions()`: the tests call it under their own settings
    keep = [n for n in keep if not (isinstance(n, ast.Assign) and "_extensions()" in ast.unparse(n))]
    namespace = {"__file__": str(SETUP_PY), "__name__": "relscale_setup"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(SETUP_PY), "exec"), namespace)
    return namespace


def test_build_switches(setup_module_namespace, monkeypatch):
    extensions = setup_module_namespace["_extensions"]
    monkeypatch.setenv("RELSCALE_BUILD_EXT", "0")
    assert extensions() == ([], {})
    monkeypatch.setenv("RELSCALE_BUILD_EXT", "gpu")
    with pytest.raises(SystemExit, match="RELSCALE_BUILD_EXT='gpu'"):
        extensions()

    cuda_possible = setup_module_namespace["_cuda_toolchain"](cpp_extension) is None
    monkeypatch.delenv("RELSCALE_BUILD_EXT")
    [ext_module], cmdclass = extensions()
    assert ext_module.name == "relscale._C" and ext_module.optional_build
    assert any(src.endswith(".cu") for src in ext_module.sources) == cuda_possible
    assert "build_ext" in cmdclass

    monkeypatch.setenv("RELSCALE_BUILD_EXT", "cpu")
    [ext_module], _ = extensions()
    assert not ext_module.optional_build and not any(src.endswith(".cu") for src in ext_module.sources)

    monkeypatch.setenv("RELSCALE_BUILD_EXT", "cuda")
    if cuda_possible:
        [ext_module], _ = extensions()
        assert "-gencode=arch=compute_90,code=sm_90" in ext_module.extra_compile_args["nvcc"]
    else:
        with pytest.raises(SystemExit, match="CUDA cannot be built"):
            extensions()


@pytest.mark.parametrize("optional", [True, False])
def test_failed_build_warns_only_when_optional(setup_module_namespace, tmp_path, optional):
    source = tmp_path / "broken.cpp"
    source.write_text("#error deliberately broken\n")
    extension = Extension("broken_ext", [str(source)], language="c++")
    extension.optional_build = optional
    build_ext = setup_module_namespace["_optional_build_ext"](cpp_extension.BuildExtension)
    command = build_ext(Distribution({"name": "probe", "ext_modules": [extension]}))
    command.build_temp, command.build_lib = str(tmp_path / "temp"), str(tmp_path / "lib")
    command.ensure_finalized()
    if optional:
        with pytest.warns(UserWarning, match="building broken_ext failed"):
            command.run()
        assert command.extensions == []  # nothing left for setuptools to copy or list
    else:
        with pytest.raises(Exception, match="(?i)error"):
            command.run()


def test_unavailable_extension_warns_once_and_ops_raise(monkeypatch):
    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "_IMPORT_ERROR", "ImportError: simulated")
    monkeypatch.setattr(ext, "_warned_unavailable", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ext.available() is False
        assert ext.available() is False
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "fall back to torch ops" in messages[0] and "simulated" in messages[0]
    assert not ext.has_cuda_kernels()
    x = torch.zeros(2, 1, 4)
    with pytest.raises(RuntimeError, match="relscale._C is not built"):
        ext.rope(x, x, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="relscale._C is not built"):
        ext.swiglu(x, x)
