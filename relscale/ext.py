"""Python face of the compiled extension ``relscale._C`` (built from ``csrc/`` by setup.py).

Importing ``relscale._C`` registers ``torch.ops.relscale.{rope, rope_, swiglu, swiglu_backward}``
with CPU (and, in a CUDA build, CUDA) kernels. This module adds what torch.compile and autograd
need on top — fake (meta) kernels and backward formulas — and the functions the model calls.

Every tensor argument may be a strided or expanded view: the binding copies q, k, gate, up,
grad_out, positions and inv_freq contiguous at the op boundary (in-place RoPE alone refuses a
non-contiguous q/k). Autocast: the ops have no autocast kernel on purpose, so they run in the dtype
they are given (fp32 math inside; the model feeds them outputs of autocast Linears, already bf16).

When the extension is missing (not built, no compiler, ABI mismatch) ``available()`` returns False
and warns once; the op functions raise, and ``relscale.ops`` picks the torch backend instead.
"""

from __future__ import annotations

import warnings

import torch

try:
    from relscale import _C  # noqa: F401  (the import registers the ops)

    _IMPORT_ERROR: str | None = None
except (ImportError, OSError) as exc:  # OSError: a shared library the build linked is missing
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_warned_unavailable = False


def available() -> bool:
    """Whether the compiled extension loaded; warns once (per process) when it did not."""
    global _warned_unavailable
    if _C is None and not _warned_unavailable:
        _warned_unavailable = True
        warnings.warn(
            f"relscale._C is not available ({_IMPORT_ERROR}); RoPE and SwiGLU fall back to torch ops. "
            "Build it with `pip install --no-build-isolation -e .` (see csrc/README.md).",
            RuntimeWarning,
            stacklevel=2,
        )
    return _C is not None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels (a CPU-only build has none)."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("relscale::rope", "CUDA")


def _require() -> None:
    if _C is None:
        raise RuntimeError(
            f"relscale._C is not built or failed to load ({_IMPORT_ERROR}); rebuild it with "
            "`pip install --no-build-isolation -e .` or use the torch backend (model.kernels: torch)"
        )


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (..., Hq, D) and k (..., Hk, D) at int64 ``positions`` (one per token,
    any shape with that many elements) with the frequency table ``inv_freq`` (D // 2,) from
    :func:`relscale.ops.rope_inv_freq` (moved to q's device as float64 here if it is not already).

    Hugging Face rotate-half convention (Su et al., "RoFormer", 2021), fp32 math, the angle
    ``position * inv_freq`` formed to float64 accuracy. Strided q, k, positions and inv_freq are
    copied contiguous by the op. ``inplace=True`` overwrites q and k (they must be contiguous) and
    returns them; it has no autograd, so it is for no-grad use only. Raises RuntimeError naming the
    argument for a wrong shape, dtype or device.
    """
    _require()
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float64)
    if not inplace:
        return torch.ops.relscale.rope(q, k, positions, inv_freq)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("relscale.ext.rope(inplace=True) has no autograd; use inplace=False when training")
    torch.ops.relscale.rope_(q, k, positions, inv_freq)
    return q, k


def rope_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``rope`` w.r.t. q and k: the same rotation by the negative angle."""
    _require()
    inv_freq = inv_freq.to(device=grad_q.device, dtype=torch.float64)
    return torch.ops.relscale.rope(grad_q, grad_k, positions, inv_freq, True)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused (fp32 math); differentiable."""
    _require()
    return torch.ops.relscale.swiglu(gate, up)


def swiglu_backward(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up) of ``swiglu`` in one fused pass."""
    _require()
    return torch.ops.relscale.swiglu_backward(grad_out, gate, up)


# ------------------------------------------------------------------ fake kernels and autograd
if _C is not None:

    @torch.library.register_fake("relscale::rope")
    def _rope_fake(q, k, positions, inv_freq, inverse=False):
        return q.new_empty(q.shape), k.new_empty(k.shape)  # the kernel returns contiguous tensors

    @torch.library.register_fake("relscale::rope_")
    def _rope_inplace_fake(q, k, positions, inv_freq, inverse=False):
        return None

    @torch.library.register_fake("relscale::swiglu")
    def _swiglu_fake(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("relscale::swiglu_backward")
    def _swiglu_backward_fake(grad_out, gate, up):
        return gate.new_empty(gate.shape), up.new_empty(up.shape)

    def _rope_setup_context(ctx, inputs, output):
        _, _, positions, inv_freq, *rest = inputs
        ctx.save_for_backward(positions, inv_freq)
        ctx.inverse = bool(rest[0]) if rest else False

    def _rope_grad(ctx, grad_q, grad_k):
        positions, inv_freq = ctx.saved_tensors
        # a rotation's transpose is the rotation by the opposite angle; this op is itself
        # differentiable, so double backward works too. No gradient for the frequency table.
        grad_q, grad_k = torch.ops.relscale.rope(grad_q, grad_k, positions, inv_freq, not ctx.inverse)
        return grad_q, grad_k, None, None, None

    def _swiglu_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _swiglu_grad(ctx, grad_out):
        gate, up = ctx.saved_tensors
        return torch.ops.relscale.swiglu_backward(grad_out, gate, up)

    torch.library.register_autograd("relscale::rope", _rope_grad, setup_context=_rope_setup_context)
    torch.library.register_autograd("relscale::swiglu", _swiglu_grad, setup_context=_swiglu_setup_context)
