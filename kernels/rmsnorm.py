"""RMSNorm (optionally fused with the residual add) as Triton kernels, forward and backward.

    y = x / sqrt(mean(x^2) + eps) * weight            (all math in fp32, y stored in x's dtype)
    with a residual:  h = x + residual (stored in x's dtype),  y = rms_norm(h),  returns (y, h)

Forward: one program normalises a tile of BLOCK_ROWS rows (one row for wide rows, several for narrow
ones so every program moves a useful amount of memory) and saves rstd, one fp32 per row.
Backward: a persistent grid; each program walks row tiles, reads h (or x), dy and rstd once, writes
dx, and keeps its share of dweight in fp32 registers; the (programs, H) partials are summed by torch
afterwards, a small second reduction instead of per-element atomics (and deterministic).

Registered as torch.library custom ops ``relscale::rms_norm_fwd`` / ``relscale::rms_norm_bwd`` with
fake implementations, and the forward's autograd formula (``RMSNormFunction``) via register_autograd,
so torch.compile(fullgraph=True) and CUDA graphs treat them as opaque ops; nothing here syncs the host.

Strided arguments: x, residual, dy and dh are read through their row stride (copied only when the
last dim is not unit-stride); the weight is made contiguous at the op boundary (H elements), so a
``buf[::2]`` or an expanded one-element weight is read correctly, never past its buffer.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536  # one row must fit in one program's registers


@triton.jit
def _rms_norm_fwd_kernel(
    X, RES, W, Y, H_OUT, RSTD,
    n_rows, n_cols, stride_x, stride_res, stride_y, stride_h, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]  # 64-bit offsets: rows * stride can exceed 2^31
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows64 * stride_res + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the storage dtype first: the backward only sees the stored h.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(H_OUT + rows64 * stride_h + cols[None, :], h, mask=mask)
        x = h
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = xf * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, stride_dy, stride_dh, stride_x, stride_dx,
    HAS_DH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        dw += tl.sum(dy * x_hat, axis=0)
        dx_hat = dy * w[None, :]
        # d/dx of x * rstd(x): project out the component along x_hat.
        dot = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        dx = (dx_hat - x_hat * dot[:, None]) * rstd[:, None]
        if HAS_DH:  # gradient arriving at the residual-sum output h flows straight into h
            dx += tl.load(DH + rows64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): ~4K elements per tile, 8-16 bf16 values per thread."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, 4096 // block_cols)
    tile = block_rows * block_cols
    num_warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16
    return block_rows, block_cols, num_warps


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, H) view with unit stride along H, copying only when the layout forces it."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} last dim must equal weight {tuple(weight.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} > {MAX_HIDDEN} is not supported")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )


# ------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("relscale::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd): h = x + residual (an empty tensor without residual), rstd fp32 per row."""
    _check(x, weight, residual)
    weight = weight.contiguous()  # read as W + col: a strided or expanded weight is copied, not misread
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        res2 = _as_rows(residual)
        h = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    else:
        res2, h = x2, x2.new_empty(0)
    if n_rows > 0:
        block_rows, block_cols, num_warps = _launch_config(n_cols)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2, res2, weight, y, h if residual is not None else y, rstd,
            n_rows, n_cols, x2.stride(0), res2.stride(0), y.stride(0),
            h.stride(0) if residual is not None else 0, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=num_warps,
        )
    h = h.view(x.shape) if residual is not None else h
    return y.view(x.shape), h, rstd.view(x.shape[:-1])


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    _check(x, weight, residual)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("relscale::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) given dy, the gradient dh of the residual-sum output (or None), the
    normalised input x (the sum h when a residual was fused) and the saved rstd."""
    dy2, x2 = _as_rows(dy), _as_rows(x)
    weight = weight.contiguous()
    dh2 = _as_rows(dh) if dh is not None else None
    n_rows, n_cols = x2.shape
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block_rows, block_cols, num_warps = _launch_config(n_cols)
    n_tiles = triton.cdiv(n_rows, block_rows)
    if x.is_cuda:  # persistent grid: a few programs per SM, each with its own dweight partial
        n_programs = min(n_tiles, 2 * _sm_count(x.device.index or 0))
    else:
        n_programs = min(n_tiles, 4)
    n_programs = max(n_programs, 1)
    dw_partial = torch.zeros(n_programs, n_cols, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, dh2 if dh2 is not None else dy2, x2, weight, rstd.reshape(-1), dx, dw_partial,
            n_rows, n_cols, dy2.stride(0), dh2.stride(0) if dh2 is not None else 0, x2.stride(0),
            dx.stride(0),
            HAS_DH=dh is not None, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps,
        )
    dweight = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dweight


@rms_norm_bwd.register_fake
def _(dy, dh, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    """Autograd of ``relscale::rms_norm_fwd``; also usable directly as ``RMSNormFunction.apply``.

    Saves the normalised input (x, or the sum h) and rstd; the backward reads each once.
    """

    @staticmethod
    def forward(x, weight, residual, eps):
        return torch.ops.relscale.rms_norm_fwd(x, weight, residual, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, residual, _ = inputs
        _, h, rstd = output
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    @staticmethod
    def backward(ctx, dy, dh, _drstd):
        normalised_input, weight, rstd = ctx.saved_tensors
        dh = dh if ctx.has_residual else None
        dx, dweight = torch.ops.relscale.rms_norm_bwd(dy, dh, normalised_input, weight, rstd)
        # x and residual enter only through their sum, so they share one gradient.
        return dx, dweight, (dx if ctx.has_residual else None), None


torch.library.register_autograd(
    "relscale::rms_norm_fwd", RMSNormFunction.backward, setup_context=RMSNormFunction.setup_context
)


# ---------------------------------------------------------------------------- public API
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim. With ``residual``: returns (rms_norm(x + residual), x + residual)."""
    y, h, _ = torch.ops.relscale.rms_norm_fwd(x, weight, residual, float(eps))
    return y if residual is None else (y, h)


class RMSNorm(torch.nn.Module):
    """Drop-in RMSNorm module (weight initialised to ones); ``forward(x, residual=None)``."""

    def __init__(self, hidden: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
