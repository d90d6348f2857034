"""Cross-entropy over a large vocabulary as one Triton kernel that also writes the gradient.

Per row (one program per row at real vocabularies, several rows per program for short rows), with
z the logits after optional soft-capping z = c * tanh(x / c):
    pass 1, online softmax over the vocabulary in BLOCK_V chunks: lse = logsumexp(z)
    loss   = (max - z[target]) + log(sum exp(z - max)) + w_z * lse^2      (w_z: z-loss weight)
             (the same as lse - z[target], formed so fp32 keeps its digits for logits near +-1e4)
    pass 2, when a gradient is wanted, right after pass 1 so the row is still in L2:
    dL/dx  = (softmax(z) * (1 + 2 w_z lse) - onehot(target)) * dz/dx * scale,
             dz/dx = 1 - (z / c)^2 with soft-capping, else 1
Rows whose target is ``ignore_index`` get loss 0 and gradient 0. A target outside [0, V) that is not
``ignore_index`` is an error: a ValueError naming the row on CPU tensors, an asynchronous device-side
assert on CUDA (``torch._assert_async``: no host sync; the error surfaces at the next sync). The
kernel itself never reads out of bounds (such a row would give a NaN loss).

Arguments may be strided: logits with a non-unit column stride and non-contiguous targets are
copied contiguous at the op boundary, per-row scales are read through their stride.

Memory and autograd (``CrossEntropyFunction``; custom ops ``relscale::cross_entropy_fwd_``,
``relscale::cross_entropy_bwd`` and ``relscale::scale_rows_``, all with fake implementations):
- mean / sum: the gradient is written in the forward into one logits-sized buffer that becomes the
  gradient; the logits are not saved, so autograd frees them after the forward unless the caller
  keeps them. The backward scales that buffer in place by grad_output; the scaling kernel reads
  grad_output on the device and skips rows whose factor is exactly 1, so the usual
  ``loss.backward()`` costs no extra pass and no host sync. Because the buffer is consumed in
  place, a second backward through the same graph (retain_graph=True) raises autograd's "modified
  by an inplace operation" error instead of returning a wrong gradient.
- none: the per-row grad_output is not known in the forward, so the forward only computes losses
  and logsumexp (one pass) and saves the logits; the backward writes grad_output-scaled gradients
  in one pass (same bytes moved as the fused path, one rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _softcap(x, softcap):
    # softcap * tanh(x / softcap), tanh written with exp so it also runs in Triton's interpreter.
    return softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)


@triton.jit
def _cross_entropy_kernel(
    LOGITS, stride_logits, GRAD, stride_grad, TARGETS, LOSS, Z_LOSS, LSE, LSE_LO, SCALE, stride_scale,
    n_rows, n_cols, ignore_index, z_loss_weight, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, LSE_GIVEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # BLOCK_N rows per program: 1 at real vocabularies, several when a row is shorter than a tile.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)  # 64-bit offsets: N * V exceeds 2^31 at real vocabularies
    logits_rows = LOGITS + rows64[:, None] * stride_logits
    cols = tl.arange(0, BLOCK_V)
    targets = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    # Ignored rows are masked out of every load, so their logits are never read.
    valid = row_ok & (targets != ignore_index)

    if LSE_GIVEN:  # backward of a recomputing caller: the forward already found lse
        lse = tl.load(LSE + rows, mask=valid, other=0.0)
        lse_lo = tl.load(LSE_LO + rows, mask=valid, other=0.0)
        # loss not needed here (only the gradient); max + log-sum-exp below is the forward's form
        shift_loss = lse
        log_sum = tl.zeros((BLOCK_N,), tl.float32)
    else:  # online softmax: one pass, running max and running sum of exp per row
        running_max = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = valid[:, None] & (offs[None, :] < n_cols)
            z = tl.load(logits_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            z = tl.where(mask, z, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # ignored rows stay at 0 / 0
            block_sum = tl.sum(tl.exp(z - shift[:, None]), axis=1)
            running_sum = running_sum * tl.exp(running_max - shift) + block_sum
            running_max = new_max
        log_sum = tl.where(valid, tl.log(tl.where(valid, running_sum, 1.0)), 0.0)
        shift_loss = tl.where(valid, running_max, 0.0)
        lse = shift_loss + log_sum
        # what rounding lse to fp32 dropped (exact: |log_sum| <= log V is small next to a large max),
        # so exp(z - lse) below stays accurate for logits near +-1e4
        lse_lo = (shift_loss - lse) + log_sum
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(LSE_LO + rows, lse_lo, mask=row_ok)

    in_range = (targets >= 0) & (targets < n_cols)
    z_target = tl.load(LOGITS + rows64 * stride_logits + targets, mask=valid & in_range, other=float("nan"))
    z_target = z_target.to(tl.float32)
    if HAS_SOFTCAP:
        z_target = _softcap(z_target, softcap)
    z_loss = z_loss_weight * lse * lse
    # (max - z_target) + log(sum): both terms are formed without rounding a large logsumexp first,
    # so the fp32 loss stays accurate when every logit is near +-1e4
    loss = (shift_loss - z_target) + log_sum
    tl.store(LOSS + rows, tl.where(valid, loss + z_loss, 0.0), mask=row_ok)
    tl.store(Z_LOSS + rows, z_loss, mask=row_ok)

    if COMPUTE_GRAD:  # right after pass 1, so on a GPU the row is still in L2
        scale = tl.load(SCALE + rows * stride_scale, mask=row_ok, other=0.0).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        softmax_factor = 1.0 + 2.0 * z_loss_weight * lse  # d(w_z lse^2)/dz = 2 w_z lse softmax
        grad_rows = GRAD + rows64[:, None] * stride_grad
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            col_ok = offs[None, :] < n_cols
            # -inf in masked lanes keeps exp() finite there (their values are never stored).
            z = tl.load(logits_rows + offs[None, :], mask=valid[:, None] & col_ok, other=-float("inf"))
            z = z.to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            grad = tl.exp((z - lse[:, None]) - lse_lo[:, None]) * softmax_factor[:, None]
            grad -= tl.where(offs[None, :] == targets[:, None], 1.0, 0.0)
            if HAS_SOFTCAP:
                capped = z / softcap
                grad = grad * (1.0 - capped * capped)
            grad = tl.where(valid[:, None], grad * scale[:, None], 0.0)
            tl.store(grad_rows + offs[None, :], grad.to(GRAD.dtype.element_ty), mask=row_ok[:, None] & col_ok)


@triton.jit
def _scale_rows_kernel(X, stride_x, SCALE, stride_scale, n_rows, n_cols, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    scale = tl.load(SCALE + rows * stride_scale, mask=row_ok, other=1.0).to(tl.float32)
    # Decided on the device: with grad_output 1 (loss.backward()) nothing is read or written.
    if tl.sum(tl.where(scale != 1.0, 1, 0), axis=0) > 0:
        x_rows = X + rows.to(tl.int64)[:, None] * stride_x
        for start in range(0, n_cols, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            mask = (row_ok & (scale != 1.0))[:, None] & (offs[None, :] < n_cols)
            x = tl.load(x_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(x_rows + offs[None, :], (x * scale[:, None]).to(X.dtype.element_ty), mask=mask)


def _tile(n_cols: int, max_block: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps) for ~4K-element tiles: 4096-wide column chunks (16 values
    per thread at 8 warps) for long rows, several rows per program for short ones."""
    block_cols = min(max_block, triton.next_power_of_2(n_cols))
    block_rows = max(1, max_block // block_cols)
    return block_rows, block_cols, 8 if block_rows * block_cols >= 2048 else 4


def launch_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    z_loss: torch.Tensor,
    lse: torch.Tensor,
    *,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    ignore_index: int,
    z_loss_weight: float,
    softcap: float | None,
    lse_given: bool = False,
) -> None:
    """Run the row kernel on (N, V) ``logits`` (unit column stride); fills ``loss``, ``z_loss`` (N,)
    and ``lse`` (2, N) fp32 (row 0 the logsumexp, row 1 what rounding it to fp32 dropped) and, when
    ``grad`` is given (it may be ``logits`` itself: each chunk is read before it is overwritten), the
    gradient times ``scale`` (a scalar tensor or one factor per row). With ``lse_given`` the saved
    ``lse`` is read instead of recomputed (one pass over the row)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    targets = targets.contiguous()  # read as one value per row: a strided view is copied, not misread
    block_n, block_v, num_warps = _tile(n_cols)
    compute_grad = grad is not None
    if compute_grad:
        scale_stride = scale.stride(0) if scale.dim() == 1 else 0
    _cross_entropy_kernel[(triton.cdiv(n_rows, block_n),)](
        logits, logits.stride(0), grad if compute_grad else logits, grad.stride(0) if compute_grad else 0,
        targets, loss, z_loss, lse[0], lse[1], scale if compute_grad else loss,
        scale_stride if compute_grad else 0,
        n_rows, n_cols, ignore_index, z_loss_weight, softcap if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, LSE_GIVEN=lse_given,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps,
    )


def check_targets(targets: torch.Tensor, n_classes: int, ignore_index: int, where: str) -> None:
    """Refuse labels outside [0, n_classes) other than ``ignore_index``: a ValueError naming the first
    bad row on the CPU (where reading values is free), an asynchronous device assert elsewhere (no
    host sync in the training step; a bad label then fails the next synchronising call)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_classes))
    if targets.device.type == "cpu":
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{where}: target {int(targets[row])} at row {row} is outside [0, {n_classes}) and is not "
                f"ignore_index={ignore_index}"
            )
    else:
        message = f"{where}: a target is outside [0, {n_classes}) and is not ignore_index={ignore_index}"
        torch._assert_async(~bad.any(), message)


def mean_scale(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 / (number of non-ignored targets), as a device tensor (no host sync); 1 when all ignored."""
    n_valid = (targets != ignore_index).sum()
    return 1.0 / n_valid.clamp(min=1).to(torch.float32)


def check_reduction(reduction: str) -> None:
    """ValueError unless ``reduction`` is "mean", "sum" or "none" (as torch's cross_entropy)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_softcap(softcap: float | None) -> None:
    """ValueError unless ``softcap`` is None or > 0 (logits -> softcap * tanh(logits / softcap), Gemma 2)."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")


def _check(logits: torch.Tensor, targets: torch.Tensor, reduction: str, softcap: float | None) -> None:
    check_reduction(reduction)
    check_softcap(softcap)
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy: logits must be (N, V) and targets (N,), got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: targets must be int64 (or int32), got {targets.dtype}")


def reduce_losses(
    losses: torch.Tensor, z_losses: torch.Tensor, reduction: str, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp32 ``losses`` and ``z_losses`` (N,) reduced as asked: "none" keeps them, "sum" adds,
    "mean" multiplies the sums by ``scale`` (a 0-d tensor: 1 / non-ignored tokens, 0 when all are ignored)."""
    if reduction == "none":
        return losses, z_losses
    if reduction == "sum":
        return losses.sum(), z_losses.sum()
    return losses.sum() * scale, z_losses.sum() * scale


# ------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("relscale::scale_rows_", mutates_args=("x",))
def scale_rows_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """x[i, :] *= scale[i] (or *= scale for a 0-d scale) in place; rows with factor 1 are skipped."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"scale_rows_: x must be 2-d with unit column stride, got {tuple(x.shape)}")
    if scale.dim() not in (0, 1) or (scale.dim() == 1 and scale.shape[0] != x.shape[0]):
        raise ValueError(f"scale_rows_: scale {tuple(scale.shape)} must be 0-d or ({x.shape[0]},)")
    if x.numel() == 0:
        return
    block_r, block_c, num_warps = _tile(x.shape[1])
    _scale_rows_kernel[(triton.cdiv(x.shape[0], block_r),)](
        x, x.stride(0), scale, scale.stride(0) if scale.dim() == 1 else 0, x.shape[0], x.shape[1],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )


@scale_rows_.register_fake
def _(x, scale):
    return None


@torch.library.custom_op("relscale::cross_entropy_fwd_", mutates_args=("grad",))
def cross_entropy_fwd_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    reduction: str,
    z_loss_weight: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, lse): fp32 losses reduced as asked and the per-row logsumexp as (2, N): the fp32
    value and its rounding residual, so a backward's exp(z - lse) is exact even at |z| ~ 1e4. A non-empty
    ``grad`` is filled with d loss / d logits for grad_output 1 (mean/sum only: for "none" the
    gradient comes from ``cross_entropy_bwd`` once the per-row grad_output is known)."""
    _check(logits, targets, reduction, softcap)
    compute_grad = grad.numel() > 0
    if compute_grad and (grad.shape != logits.shape or grad.dtype != logits.dtype or grad.stride(-1) != 1):
        raise ValueError(f"cross_entropy: grad buffer {tuple(grad.shape)} {grad.dtype} must match logits")
    if compute_grad and reduction == "none":
        raise ValueError("cross_entropy: reduction 'none' computes its gradient in the backward only")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    check_targets(targets, logits.shape[1], ignore_index, "cross_entropy")
    n_rows = logits.shape[0]
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    z_losses = torch.empty_like(losses)
    lse = torch.empty(2, n_rows, dtype=torch.float32, device=logits.device)
    scale = (
        mean_scale(targets, ignore_index)
        if reduction == "mean"
        else torch.ones((), dtype=torch.float32, device=logits.device)
    )
    launch_cross_entropy(
        logits, targets, losses, z_losses, lse, grad=grad if compute_grad else None, scale=scale,
        ignore_index=ignore_index, z_loss_weight=z_loss_weight, softcap=softcap,
    )
    return *reduce_losses(losses, z_losses, reduction, scale), lse


@cross_entropy_fwd_.register_fake
def _(logits, targets, grad, ignore_index, reduction, z_loss_weight, softcap):
    _check(logits, targets, reduction, softcap)
    shape = (logits.shape[0],) if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=torch.float32)
    z_loss = logits.new_empty(shape, dtype=torch.float32)
    return loss, z_loss, logits.new_empty((2, logits.shape[0]), dtype=torch.float32)


@torch.library.custom_op("relscale::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    z_loss_weight: float,
    softcap: float | None,
) -> torch.Tensor:
    """d loss / d logits for reduction "none" with per-row ``grad_loss``, in one pass over the
    logits using the forward's logsumexp (the scaling is folded in: one rounding, no extra pass)."""
    if grad_loss.shape != (logits.shape[0],):
        raise ValueError(
            f"cross_entropy_bwd: grad_loss {tuple(grad_loss.shape)} must be ({logits.shape[0]},)"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    scratch = torch.empty(2, logits.shape[0], dtype=torch.float32, device=logits.device)
    launch_cross_entropy(
        logits, targets, scratch[0], scratch[1], lse, grad=grad, scale=grad_loss, ignore_index=ignore_index,
        z_loss_weight=z_loss_weight, softcap=softcap, lse_given=True,
    )
    return grad


@cross_entropy_bwd.register_fake
def _(logits, targets, lse, grad_loss, ignore_index, z_loss_weight, softcap):
    return logits.new_empty(logits.shape)


class CrossEntropyFunction(torch.autograd.Function):
    """mean / sum: fills a private gradient buffer in the forward (right after the loss pass, while
    the rows are in L2) and hands it to autograd in the backward, scaled in place by grad_output.
    none: saves the logits and logsumexp; the backward writes grad_output-scaled gradients in one
    pass. (An autograd.Function rather than register_autograd: torch refuses autograd formulas on
    mutating custom ops.) The z-loss output is for logging only: its gradient is part of the loss's."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, z_loss_weight, softcap):
        grads_now = ctx.needs_input_grad[0] and reduction != "none"
        grad = logits.new_empty(logits.shape if grads_now else (0,))
        loss, z_loss, lse = torch.ops.relscale.cross_entropy_fwd_(
            logits, targets, grad, ignore_index, reduction, z_loss_weight, softcap
        )
        ctx.reduction = reduction
        ctx.options = (ignore_index, z_loss_weight, softcap)
        if reduction == "none":
            ctx.save_for_backward(logits, targets, lse)
        else:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_z_loss):
        if ctx.reduction == "none":
            logits, targets, lse = ctx.saved_tensors
            grad = torch.ops.relscale.cross_entropy_bwd(logits, targets, lse, grad_loss, *ctx.options)
        else:
            (grad,) = ctx.saved_tensors
            torch.ops.relscale.scale_rows_(grad, grad_loss)
        return grad, None, None, None, None, None


# ---------------------------------------------------------------------------- public API
def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of (N, V) logits against (N,) targets; fp32 result.

    reduction "mean" averages over non-ignored targets (0 when all are ignored), "sum" adds, "none"
    gives per-token losses (0 at ignored ones). z_loss adds z_loss * logsumexp^2 per token (PaLM's
    auxiliary loss); softcap applies softcap * tanh(logits / softcap) first. With ``return_z_loss``
    also returns the z-loss term, reduced the same way, detached (for logging).
    """
    args = (int(ignore_index), reduction, float(z_loss), None if softcap is None else float(softcap))
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, z_term = CrossEntropyFunction.apply(logits, targets, *args)
    else:  # evaluation: loss only, one pass, no gradient buffer
        loss, z_term, _ = torch.ops.relscale.cross_entropy_fwd_(logits, targets, logits.new_empty(0), *args)
    return (loss, z_term) if return_z_loss else loss


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for nn.CrossEntropyLoss on (N, V) logits, plus z-loss and soft-capping."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_z_loss: bool = False,
    ) -> None:
        super().__init__()
        check_reduction(reduction)
        check_softcap(softcap)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.z_loss, self.softcap, self.return_z_loss = z_loss, softcap, return_z_loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor):
        return cross_entropy(
            logits, targets, self.ignore_index, self.reduction, self.z_loss, self.softcap,
            self.return_z_loss,
        )
