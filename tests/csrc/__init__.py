"""Tests of the compiled extension relscale._C (csrc/) and its Python face relscale.ext."""

import os

import pytest
import torch

from relscale import ext

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Every op test runs on the CPU and, where a GPU and the CUDA build are present, on CUDA.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and ext.has_cuda_kernels()),
            reason="needs a CUDA device and relscale._C built with CUDA",
        ),
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Bounds on |kernel - float64 reference| relative to the reference: fp32 math then one rounding
# to the storage type, so half an ulp of the storage type plus a little fp32 noise.
RTOL = {torch.float32: 2e-6, torch.float16: 2**-11 + 1e-5, torch.bfloat16: 2**-8 + 1e-5}
ATOL = {torch.float32: 2e-6, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def require_extension() -> None:
    """Skip outside CI when the extension was not built; in CI a missing extension is a failure."""
    if ext.available():
        return
    message = f"relscale._C is not built ({ext._IMPORT_ERROR})"
    if IN_CI:
        pytest.fail(message + "; CI must build it (pip install --no-build-isolation -e .)")
    pytest.skip(message)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """actual (any storage dtype) against a float64 reference, with the bound of actual's dtype."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=RTOL[actual.dtype], atol=ATOL[actual.dtype]
    )
