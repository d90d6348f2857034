"""Fused output projection + cross-entropy that never holds the N x V logits.

Tokens are processed in chunks of C rows. Per chunk: logits = hidden_c @ weight.T (a matmul in the
input dtype), the cross-entropy kernel of ``relscale.kernels.cross_entropy`` writes the per-token
loss and, in place over the chunk's logits, d loss / d logits; then
    grad_hidden_c = d_logits @ weight        (written straight into its rows of grad_hidden)
    grad_weight  += d_logits.T @ hidden_c    (accumulated in fp32)
C comes from a memory budget for one chunk of logits (``default_chunk_rows``: 1/32 of the GPU's
memory, 17408 rows at V = 128256 in bf16 on an H200); results do not depend on C beyond fp32
summation order.

Autocast: under ``torch.autocast`` the public functions cast hidden and weight to the autocast dtype
at the boundary (as autocast does for a Linear), so all three GEMMs run in bf16/fp16 with fp32
accumulation; the gradients flow back through that cast to fp32 parameters.

reduction "mean" / "sum": the gradients are computed in the forward (as in Liger-Kernel) and the
backward only scales them by grad_output, in place and skipped on the device when it is 1.
Extra memory at the peak: one chunk of logits (C x V, input dtype) + the fp32 weight-gradient
accumulator (V x H x 4 bytes, only when the weight is not fp32) + the gradients themselves.

reduction "none": the weight gradient sums grad_output[i] * d_logits_i.T @ hidden_i over tokens, so
it cannot be formed before grad_output is known, and keeping every chunk's d_logits would be the
N x V buffer we avoid. So the forward saves only logsumexp per token (N floats) and the backward
recomputes each chunk's logits (one extra matmul per chunk), then writes d_logits already scaled
by grad_output in one pass. Same memory bound as above.

Only the tensors passed in are used: an FSDP2-sharded weight works once it is gathered (the
gathered tensor is an ordinary tensor here), and a non-contiguous view of a weight is fine.

Custom ops (with fake implementations): ``relscale::linear_cross_entropy_fwd_`` (fills the gradient
buffers it is given), ``relscale::linear_cross_entropy_bwd`` (reduction "none") and
``relscale::scale_rows_``; autograd through ``LinearCrossEntropyFunction`` (torch.library refuses
autograd formulas on mutating ops). No host sync anywhere, so torch.compile(fullgraph=True) and CUDA
graphs see opaque ops.
"""

from __future__ import annotations

import functools

import torch
from relscale.kernels._autocast import autocast_inputs
from relscale.kernels.cross_entropy import (
    check_reduction,
    check_softcap,
    check_targets,
    launch_cross_entropy,
    mean_scale,
    reduce_losses,
)

# Chunk size from a memory budget. One chunk of logits (C x V in the input dtype) is the only
# N-dependent buffer, so C is the largest multiple of CHUNK_ROW_MULTIPLE rows whose logits fit in the
# budget: 1/32 of the device's memory on a GPU (4.4 GiB on an H200: C = 17408 rows at V = 128256 in
# bf16, so a 65k-token micro-step streams the fp32 weight-gradient accumulator 4 times instead of 64),
# 256 MiB on the CPU; never fewer than MIN_CHUNK_ROWS rows nor more than there are tokens. The rule
# depends only on the device's total memory (not on what is free), so a run is reproducible.
LOGITS_BUDGET_FRACTION = 32  # budget = total device memory / this
CPU_LOGITS_BUDGET_BYTES = 256 << 20
CHUNK_ROW_MULTIPLE = 256  # whole tensor-core tiles of the weight-gradient matmul's inner dimension
MIN_CHUNK_ROWS = 256
_addmm_out_dtype_works = [True]  # flipped once if this torch's CUDA addmm lacks out_dtype


@functools.cache
def _device_total_memory(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).total_memory


def logits_budget_bytes(device: torch.device) -> int:
    """Bytes one chunk of logits may take on ``device`` (see the rule above)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_total_memory(index) // LOGITS_BUDGET_FRACTION
    return CPU_LOGITS_BUDGET_BYTES


def default_chunk_rows(
    n_rows: int, vocab: int, itemsize: int = 2, budget_bytes: int = CPU_LOGITS_BUDGET_BYTES
) -> int:
    """Token rows per chunk: the most whole multiples of CHUNK_ROW_MULTIPLE whose (rows, vocab)
    logits of ``itemsize`` bytes fit in ``budget_bytes``, at least MIN_CHUNK_ROWS, at most ``n_rows``."""
    rows = budget_bytes // max(vocab * itemsize, 1)
    rows = max(MIN_CHUNK_ROWS, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)
    return max(1, min(n_rows, rows))


def _accumulate_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32 and a, b in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _addmm_out_dtype_works[0]:
        try:  # cuBLAS: bf16 x bf16 with fp32 C and fp32 output, no rounding of the chunk's product
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _addmm_out_dtype_works[0] = False
    # older CUDA torch, and the CPU (no out_dtype matmul there): a GEMM in the input dtype (fp32
    # accumulation inside, the chunk's product rounded once), chunks still add up in fp32
    acc.add_(torch.mm(a, b))


def _check(hidden, weight, targets, reduction, softcap, chunk_size) -> None:
    check_reduction(reduction)
    check_softcap(softcap)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be (N, H) and weight (V, H), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64 (or int32), got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} differ")
    if chunk_size < 0:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1 (0 = automatic), got {chunk_size}")


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    z_loss_weight: float,
    softcap: float | None,
    chunk_size: int,
    scale: torch.Tensor | None,
    lse: torch.Tensor,
    lse_given: bool,
    grad_hidden: torch.Tensor | None,
    grad_weight_acc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (loss, z_loss); with a ``scale`` also the gradients into the given buffers."""
    n_rows = hidden.shape[0]
    targets = targets.contiguous()  # once here, not per chunk (the kernel reads one value per row)
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    z_losses = torch.empty_like(losses)
    if not chunk_size:
        chunk_size = default_chunk_rows(
            n_rows, weight.shape[0], hidden.element_size(), logits_budget_bytes(hidden.device)
        )
    chunk = min(chunk_size, max(n_rows, 1))
    want_grad = scale is not None and (grad_hidden is not None or grad_weight_acc is not None)
    # One logits buffer reused by every chunk: the peak is exactly one chunk, no allocator churn.
    logits_buffer = torch.empty(chunk, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        hidden_c = hidden[start:end]
        logits = torch.mm(hidden_c, weight.t(), out=logits_buffer[: end - start])
        chunk_scale = scale[start:end] if scale is not None and scale.dim() == 1 else scale
        launch_cross_entropy(
            logits, targets[start:end], losses[start:end], z_losses[start:end], lse[:, start:end],
            grad=logits if want_grad else None, scale=chunk_scale, ignore_index=ignore_index,
            z_loss_weight=z_loss_weight, softcap=softcap, lse_given=lse_given,
        )
        if not want_grad:
            continue
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight_acc is not None:
            _accumulate_matmul_(grad_weight_acc, logits.t(), hidden_c)
    return losses, z_losses


def _weight_grad_accumulator(grad_weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 buffer that weight-gradient chunks are added into (the gradient itself if fp32)."""
    if grad_weight.numel() == 0:
        return None
    if grad_weight.dtype == torch.float32:
        return grad_weight.zero_()
    return torch.zeros(grad_weight.shape, dtype=torch.float32, device=grad_weight.device)


def _check_grad_buffer(name: str, buf: torch.Tensor, like: torch.Tensor) -> None:
    if buf.numel() and (buf.shape != like.shape or buf.dtype != like.dtype or not buf.is_contiguous()):
        raise ValueError(
            f"linear_cross_entropy: {name} buffer {tuple(buf.shape)} {buf.dtype} must be empty or a "
            f"contiguous {tuple(like.shape)} {like.dtype} tensor"
        )


# ------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("relscale::linear_cross_entropy_fwd_", mutates_args=("grad_hidden", "grad_weight"))
def linear_cross_entropy_fwd_(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_hidden: torch.Tensor,
    grad_weight: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss_weight: float,
    softcap: float | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, lse): fp32 losses reduced as asked and the per-token logsumexp (2, N) (value and
    rounding residual, see ``cross_entropy_fwd_``). Non-empty
    ``grad_hidden`` / ``grad_weight`` buffers are filled with the gradients for grad_output 1; for
    reduction "none" leave them empty and use ``linear_cross_entropy_bwd`` instead."""
    _check(hidden, weight, targets, reduction, softcap, chunk_size)
    _check_grad_buffer("grad_hidden", grad_hidden, hidden)
    _check_grad_buffer("grad_weight", grad_weight, weight)
    wants_grad = grad_hidden.numel() > 0 or grad_weight.numel() > 0
    if reduction == "none" and wants_grad:
        raise ValueError("linear_cross_entropy: reduction 'none' computes gradients in the backward only")
    check_targets(targets, weight.shape[0], ignore_index, "linear_cross_entropy")
    lse = torch.empty(2, hidden.shape[0], dtype=torch.float32, device=hidden.device)
    scale = (
        mean_scale(targets, ignore_index)
        if reduction == "mean"
        else torch.ones((), dtype=torch.float32, device=hidden.device)
    )
    grad_weight_acc = _weight_grad_accumulator(grad_weight)
    losses, z_losses = _chunked_pass(
        hidden, weight, targets, ignore_index=ignore_index, z_loss_weight=z_loss_weight, softcap=softcap,
        chunk_size=chunk_size, scale=scale if wants_grad else None, lse=lse, lse_given=False,
        grad_hidden=grad_hidden if grad_hidden.numel() else None, grad_weight_acc=grad_weight_acc,
    )
    if grad_weight_acc is not None and grad_weight_acc is not grad_weight:
        grad_weight.copy_(grad_weight_acc)
    loss, z_loss = reduce_losses(losses, z_losses, reduction, scale)
    return loss, z_loss, lse


@linear_cross_entropy_fwd_.register_fake
def _(hidden, weight, targets, grad_hidden, grad_weight, ignore_index, reduction, z_loss_weight, softcap,
      chunk_size):
    _check(hidden, weight, targets, reduction, softcap, chunk_size)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss = hidden.new_empty(shape, dtype=torch.float32)
    z_loss = hidden.new_empty(shape, dtype=torch.float32)
    return loss, z_loss, hidden.new_empty((2, hidden.shape[0]), dtype=torch.float32)


@torch.library.custom_op("relscale::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    z_loss_weight: float,
    softcap: float | None,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight) for reduction "none" with per-token ``grad_loss``: recomputes each
    chunk's logits and reads the forward's logsumexp. A gradient not asked for is an empty tensor."""
    if grad_loss.shape != (hidden.shape[0],):
        raise ValueError(
            f"linear_cross_entropy_bwd: grad_loss {tuple(grad_loss.shape)} must be ({hidden.shape[0]},)"
        )
    grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else None
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else (0,))
    grad_weight_acc = _weight_grad_accumulator(grad_weight)
    _chunked_pass(
        hidden, weight, targets, ignore_index=ignore_index, z_loss_weight=z_loss_weight, softcap=softcap,
        chunk_size=chunk_size, scale=grad_loss, lse=lse, lse_given=True,
        grad_hidden=grad_hidden, grad_weight_acc=grad_weight_acc,
    )
    if grad_weight_acc is not None and grad_weight_acc is not grad_weight:
        grad_weight.copy_(grad_weight_acc)
    return grad_hidden if grad_hidden is not None else hidden.new_empty(0), grad_weight


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, targets, lse, ignore_index, z_loss_weight, softcap, chunk_size,
      need_grad_hidden, need_grad_weight):
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden else (0,))
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else (0,))
    return grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    """mean / sum: fills private gradient buffers in the forward, scales them in place by
    grad_output in the backward (skipped on the device when it is 1). none: saves inputs and
    logsumexp, recomputes in the backward. The z-loss output is for logging; its gradient is
    already part of the loss's. (An autograd.Function because torch refuses autograd formulas on
    mutating custom ops.)"""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss_weight, softcap, chunk_size):
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads_now = reduction != "none"
        grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden and grads_now else (0,))
        grad_weight = weight.new_empty(weight.shape if need_grad_weight and grads_now else (0,))
        loss, z_loss, lse = torch.ops.relscale.linear_cross_entropy_fwd_(
            hidden, weight, targets, grad_hidden, grad_weight, ignore_index, reduction, z_loss_weight,
            softcap, chunk_size,
        )
        ctx.reduction = reduction
        ctx.need_grads = (need_grad_hidden, need_grad_weight)
        ctx.options = (ignore_index, z_loss_weight, softcap, chunk_size)
        if grads_now:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        need_grad_hidden, need_grad_weight = ctx.need_grads
        if ctx.reduction == "none":
            hidden, weight, targets, lse = ctx.saved_tensors
            grad_hidden, grad_weight = torch.ops.relscale.linear_cross_entropy_bwd(
                grad_loss, hidden, weight, targets, lse, *ctx.options, need_grad_hidden, need_grad_weight
            )
        else:
            grad_hidden, grad_weight = ctx.saved_tensors
            if need_grad_hidden:
                torch.ops.relscale.scale_rows_(grad_hidden, grad_loss)
            if need_grad_weight:
                torch.ops.relscale.scale_rows_(grad_weight, grad_loss)
        return (
            grad_hidden if need_grad_hidden else None,
            grad_weight if need_grad_weight else None,
            None, None, None, None, None, None,
        )


# ---------------------------------------------------------------------------- public API
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy(hidden @ weight.T, targets) for hidden (N, H), weight (V, H), without the
    N x V logits; same arguments and results as ``relscale.kernels.cross_entropy.cross_entropy``.
    ``chunk_size``: token rows per chunk (None: from the memory budget, ``default_chunk_rows``).
    Under autocast, hidden and weight are cast to the autocast dtype first (GEMMs in bf16/fp16)."""
    hidden, weight = autocast_inputs(hidden, weight)
    args = (
        int(ignore_index), reduction, float(z_loss), None if softcap is None else float(softcap),
        int(chunk_size or 0),
    )
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, z_term = LinearCrossEntropyFunction.apply(hidden, weight, targets, *args)
    else:  # evaluation: losses only, no gradient buffers
        empty_h, empty_w = hidden.new_empty(0), weight.new_empty(0)
        loss, z_term, _ = torch.ops.relscale.linear_cross_entropy_fwd_(
            hidden, weight, targets, empty_h, empty_w, *args
        )
    return (loss, z_term) if return_z_loss else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Loss module: ``forward(hidden, weight, targets)`` with the projection weight passed in, so
    the weight stays owned by the output layer (and can be tied or FSDP-sharded there)."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        return_z_loss: bool = False,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        check_softcap(softcap)
        self.ignore_index, self.reduction, self.z_loss = ignore_index, reduction, z_loss
        self.softcap, self.chunk_size, self.return_z_loss = softcap, chunk_size, return_z_loss

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        return linear_cross_entropy(
            hidden, weight, targets, self.ignore_index, self.reduction, self.z_loss, self.softcap,
            self.chunk_size, self.return_z_loss,
        )
