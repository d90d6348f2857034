"""Causal flash attention (FlashAttention-2 style) in Triton: forward, backward, document masking, GQA.

Layout: packed tokens ``(total_tokens, heads, head_dim)``; documents are described by ``cu_seqlens``
(int32 cumulative offsets) and never attend to each other. The dense ``(batch, seq, heads, dim)``
entry is the same kernels with every document of length ``seq`` (no ``cu_seqlens`` lookups).

How the work is split:
- Query blocks are blocks of the GLOBAL token axis, so a block may straddle a document boundary.
  Each program looks up the document start/end of each of its rows (a binary search over
  ``cu_seqlens``; arithmetic in the dense case) and loops only over the key tiles some row needs:
  from the document start of its first row to its causal end. Fully masked tiles are skipped, not
  computed. Tiles that are fully visible to every row run without any mask; only tiles on the
  diagonal or on a document boundary apply the element mask.
- The grid size depends only on tensor shapes (no ``.item()``, no host sync), so the ops are
  torch.compile friendly; ``max_seqlen`` is only needed for the dense case.
- Backward: ``delta = rowsum(dO * O) - dLSE`` (preprocess), then one program per (KV block,
  KV head) loops over the query heads of its GQA group and their query tiles, accumulating dK/dV
  in registers (no atomics, so dK/dV are always deterministic). dQ is either atomically added
  from that kernel into an fp32 buffer (default, 5 matmuls per tile) or, with
  ``deterministic=True``, computed by a separate kernel that loops over key tiles per query block
  (7 matmuls per tile pair in total, same bits every run).

Strided arguments: q, k, v, out and dO are read through their token and head strides (copied only
when the last dim is not unit-stride); cu_seqlens and dLSE are made contiguous at the op boundary.

Scores are kept in base-2 units inside the kernels (``exp2``); the saved log-sum-exp is in
natural-log units, shape ``(heads, total_tokens)``, fp32.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from relscale.kernels._autocast import autocast_inputs

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------ block sizes
class BlockConfig(NamedTuple):
    """Tile shapes and launch settings of the three main kernels."""

    fwd_m: int  # query rows per forward program
    fwd_n: int  # key columns per forward tile
    fwd_warps: int
    fwd_stages: int
    dkdv_n: int  # key rows per dK/dV program
    dkdv_m: int  # query rows per dK/dV tile
    dkdv_warps: int
    dkdv_stages: int
    dq_m: int  # query rows per deterministic-dQ program
    dq_n: int  # key columns per deterministic-dQ tile
    dq_warps: int
    dq_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_config(
    head_dim_padded: int, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> BlockConfig:
    """Block sizes for a head dimension (padded to a power of two) on a device.

    The interpreter runs the programs one after another on the CPU: small tiles keep tests fast while
    still giving several tiles (and tile-straddling document boundaries) at short lengths.

    The Hopper settings are NOT timed yet (no GPU in the task that wrote them). They were chosen from
    sm_90 compiles of these kernels (ptxas register/spill report, HGMMA count in the SASS): forward
    128x64 tiles (4 warps at d<=64, 8 at d=128) compile to wgmma with no spills; the dK/dV kernel keeps
    K, V, dK, dV of a 128-key block in registers, which only fits without spills with 32-row query
    tiles and 8 warps (at d=128 the atomic-dQ variant still spills ~150 bytes). bench_attention.py
    --profile tune times the alternatives on a GPU.
    """
    if _interpreting() or device.type != "cuda":
        return BlockConfig(32, 16, 1, 1, 32, 16, 1, 1, 32, 16, 1, 1)
    if dtype == torch.float32:  # exact fp32 products run on CUDA cores: a test path, small tiles
        return BlockConfig(64, 32, 4, 2, 64, 16, 4, 1, 64, 16, 4, 2)
    if head_dim_padded > 128:  # d=256 K/V/dK/dV blocks do not fit registers at 128 rows (untuned)
        return BlockConfig(64, 32, 8, 2, 32, 16, 8, 1, 64, 32, 8, 1)
    if head_dim_padded <= 64:
        return BlockConfig(128, 64, 4, 3, 128, 32, 8, 3, 128, 32, 4, 3)
    return BlockConfig(128, 64, 8, 3, 128, 32, 8, 2, 128, 32, 8, 2)


# ------------------------------------------------------------------------------- shared helpers
@triton.jit
def _doc_bounds(tok, CU, n_docs, n_search, dense_seqlen, IS_DENSE: tl.constexpr):
    """[start, end) of the document holding each token index in ``tok`` (valid indices only)."""
    if IS_DENSE:
        start = (tok // dense_seqlen) * dense_seqlen
        end = start + dense_seqlen
    else:
        # invariant: CU[lo] <= tok < CU[hi]; n_search = ceil(log2(n_docs)) halvings reach hi = lo + 1
        lo = tl.zeros_like(tok)
        hi = tl.zeros_like(tok) + n_docs
        for _ in range(n_search):
            mid = (lo + hi) // 2
            go_right = tl.load(CU + mid) <= tok
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        start = tl.load(CU + lo)
        end = tl.load(CU + lo + 1)
    return start, end


@triton.jit
def _tile_ranges(lo, hi, clean_start, clean_end, BLOCK: tl.constexpr):
    """Tiles [lo + t*BLOCK, lo + (t+1)*BLOCK) for t < n cover [lo, hi). Tiles t in [t_a, t_b) lie
    inside [clean_start, clean_end), where no element needs a mask; the others are masked."""
    n = tl.cdiv(hi - lo, BLOCK)
    t_a = tl.minimum(tl.cdiv(tl.maximum(clean_start - lo, 0), BLOCK), n)
    t_b = tl.minimum(tl.maximum(t_a, (clean_end - lo) // BLOCK), n)
    return n, t_a, t_b


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc) with fp32 accumulation. The Triton 3.9 interpreter multiplies bf16 tiles as their
    raw uint16 bits, so "interpret_bf16" upcasts first: exact products summed in fp32, as on GPUs."""
    if PRECISION == "interpret_bf16":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype) rounding to nearest even, as GPUs do. The 3.9 interpreter truncates fp32->bf16, so
    "interpret_bf16" rounds the fp32 bits first (the cast then drops only zero bits)."""
    if PRECISION == "interpret_bf16":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    if MASK_ROWS:
        if MASK_D:
            tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_D:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


# ---------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows, row_start, lo, t_start, t_end, total,
    qk_scale, offs_d, d_ok, BLOCK_N: tl.constexpr, MASK_D: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, row_end, PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for t in tl.range(t_start, t_end):
        cols = lo + t * BLOCK_N + offs_n
        col_ok = cols < total
        cols64 = cols.to(tl.int64)
        k = _load_tile(K_head + cols64[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok, MASKED, MASK_D)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale
        if MASKED:
            keep = cols[None, :] >= row_start[:, None]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            else:
                keep = keep & (cols[None, :] < row_end[:, None])
            s = tl.where(keep, s, float("-inf"))
        # m_i starts finite, so a row whose tile is fully masked keeps alpha = 1 and p = 0 (no NaN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_head + cols64[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok, MASKED, MASK_D)
        acc = acc * alpha[:, None]
        acc = _dot(_cast(p, v.dtype, PRECISION), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["total", "n_docs", "n_search", "dense_seqlen"])
def _fwd_kernel(
    Q, K, V, O, LSE, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
    stride_oh, total, n_docs, n_search, dense_seqlen, group, qk_scale, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    IS_DENSE: tl.constexpr, PRECISION: tl.constexpr,
):
    # last query blocks have the longest causal loops: launch them first for a shorter tail
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    m0 = block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < total
    row_start, row_end = _doc_bounds(
        tl.minimum(rows, total - 1), CU, n_docs, n_search, dense_seqlen, IS_DENSE
    )
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != HEAD_DIM_P

    rows64 = rows.to(tl.int64)
    q = _load_tile(
        Q + head * stride_qh + rows64[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, True, MASK_D
    )

    lo = tl.min(row_start, 0)
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, total)
        clean_end = m0 + 1
    else:
        hi = tl.max(row_end, 0)
        clean_end = tl.min(row_end, 0)
    n_tiles, t_a, t_b = _tile_ranges(lo, hi, tl.max(row_start, 0), clean_end, BLOCK_N)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    K_head = K + kv_head * stride_kh
    V_head = V + kv_head * stride_vh
    # document-boundary tiles, then tiles every row sees in full, then the causal diagonal
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows, row_start, lo, 0, t_a, total, qk_scale,
        offs_d, d_ok, BLOCK_N, MASK_D, CAUSAL, True, row_end, PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows, row_start, lo, t_a, t_b, total,
        qk_scale, offs_d, d_ok, BLOCK_N, MASK_D, CAUSAL, False, row_end, PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_vt, rows, row_start, lo, t_b, n_tiles, total,
        qk_scale, offs_d, d_ok, BLOCK_N, MASK_D, CAUSAL, True, row_end, PRECISION,
    )

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows past `total` can have l = 0
    out = acc / l_safe[:, None]
    o_ptrs = O + head * stride_oh + rows64[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty, PRECISION), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + head.to(tl.int64) * total + rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["total"])
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < total
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + head * stride_oh + rows64[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + head * stride_doh + rows64[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, which folds into dS = P * (dP - delta) as delta - dlse
        delta -= tl.load(DLSE + head.to(tl.int64) * total + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + head.to(tl.int64) * total + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, stride_qt, stride_dot, stride_dqt, cols,
    col_ok, col_start, col_end, lo, t_start, t_end, total, qk_scale, sm_scale, offs_d, d_ok,
    BLOCK_M: tl.constexpr, MASK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    for t in tl.range(t_start, t_end):
        rows = lo + t * BLOCK_M + offs_m
        row_ok = rows < total
        rows64 = rows.to(tl.int64)
        q = _load_tile(Q_head + rows64[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, MASKED, MASK_D)
        do = _load_tile(
            DO_head + rows64[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok, MASKED, MASK_D
        )
        if MASKED:
            lse2 = tl.load(LSE_head + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA_head + rows, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(LSE_head + rows) * 1.4426950408889634
            delta = tl.load(DELTA_head + rows)
        # transposed scores (keys x queries) so P^T and dS^T feed dV and dK directly
        s_t = _dot(k, tl.trans(q), None, PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            # rows before a column's document end are in its document once rows >= column (causal)
            keep = (rows[None, :] < col_end[:, None]) & col_ok[:, None]
            if CAUSAL:
                keep = keep & (rows[None, :] >= cols[:, None])
            else:
                keep = keep & (rows[None, :] >= col_start[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = _dot(_cast(p_t, do.dtype, PRECISION), do, dv, PRECISION)
        dp_t = _dot(v, tl.trans(do), None, PRECISION)
        ds_t = _cast(p_t * (dp_t - delta[None, :]), q.dtype, PRECISION)
        dk = _dot(ds_t, q, dk, PRECISION)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(ds_t), k, None, PRECISION) * sm_scale
            dq_ptrs = DQ_head + rows64[:, None] * stride_dqt + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["total", "n_docs", "n_search", "dense_seqlen"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, total,
    n_docs, n_search, dense_seqlen, group, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    IS_DENSE: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    # early key blocks see the most causal query rows and are launched first
    n0 = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < total
    col_start, col_end = _doc_bounds(
        tl.minimum(cols, total - 1), CU, n_docs, n_search, dense_seqlen, IS_DENSE
    )
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != HEAD_DIM_P

    cols64 = cols.to(tl.int64)
    k = _load_tile(
        K + kv_head * stride_kh + cols64[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok, True, MASK_D
    )
    v = _load_tile(
        V + kv_head * stride_vh + cols64[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok, True, MASK_D
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM_P], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_P], tl.float32)

    if CAUSAL:
        lo = n0
        clean_start = tl.minimum(n0 + BLOCK_N, total) - 1
    else:
        lo = tl.min(col_start, 0)
        clean_start = tl.max(col_start, 0)
    n_tiles, t_a, t_b = _tile_ranges(lo, tl.max(col_end, 0), clean_start, tl.min(col_end, 0), BLOCK_M)

    # the whole GQA group is reduced here, in registers: dK/dV need no atomics
    for g in range(group):
        head = kv_head * group + g
        Q_head = Q + head * stride_qh
        DO_head = DO + head * stride_doh
        LSE_head = LSE + head.to(tl.int64) * total
        DELTA_head = DELTA + head.to(tl.int64) * total
        DQ_head = DQ + head * stride_dqh
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, stride_qt, stride_dot, stride_dqt,
            cols, col_ok, col_start, col_end, lo, 0, t_a, total, qk_scale, sm_scale, offs_d, d_ok, BLOCK_M,
            MASK_D, CAUSAL, True, ATOMIC_DQ, PRECISION,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, stride_qt, stride_dot, stride_dqt,
            cols, col_ok, col_start, col_end, lo, t_a, t_b, total, qk_scale, sm_scale, offs_d, d_ok, BLOCK_M,
            MASK_D, CAUSAL, False, ATOMIC_DQ, PRECISION,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, stride_qt, stride_dot, stride_dqt,
            cols, col_ok, col_start, col_end, lo, t_b, n_tiles, total, qk_scale, sm_scale, offs_d, d_ok,
            BLOCK_M, MASK_D, CAUSAL, True, ATOMIC_DQ, PRECISION,
        )

    store_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(
        DK + kv_head * stride_dkh + cols64[:, None] * stride_dkt + offs_d[None, :],
        _cast(dk * sm_scale, DK.dtype.element_ty, PRECISION),
        mask=store_mask,
    )
    tl.store(
        DV + kv_head * stride_dvh + cols64[:, None] * stride_dvt + offs_d[None, :],
        _cast(dv, DV.dtype.element_ty, PRECISION),
        mask=store_mask,
    )


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows, row_start, row_end, lo, t_start,
    t_end, total, qk_scale, offs_d, d_ok, BLOCK_N: tl.constexpr, MASK_D: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for t in tl.range(t_start, t_end):
        cols = lo + t * BLOCK_N + offs_n
        col_ok = cols < total
        cols64 = cols.to(tl.int64)
        k = _load_tile(K_head + cols64[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok, MASKED, MASK_D)
        v = _load_tile(V_head + cols64[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok, MASKED, MASK_D)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = (cols[None, :] >= row_start[:, None]) & col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            else:
                keep = keep & (cols[None, :] < row_end[:, None])
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION)
        ds = _cast(p * (dp - delta[:, None]), k.dtype, PRECISION)
        dq = _dot(ds, k, dq, PRECISION)
    return dq


@triton.jit(do_not_specialize=["total", "n_docs", "n_search", "dense_seqlen"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, total, n_docs, n_search, dense_seqlen, group, qk_scale,
    sm_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_DENSE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    m0 = block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < total
    row_start, row_end = _doc_bounds(
        tl.minimum(rows, total - 1), CU, n_docs, n_search, dense_seqlen, IS_DENSE
    )
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != HEAD_DIM_P

    rows64 = rows.to(tl.int64)
    q = _load_tile(
        Q + head * stride_qh + rows64[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, True, MASK_D
    )
    do = _load_tile(
        DO + head * stride_doh + rows64[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok, True, MASK_D
    )
    # padding rows get lse = inf, hence p = 0, instead of overflowing exp2
    lse2 = tl.load(LSE + head.to(tl.int64) * total + rows, mask=row_ok, other=float("inf"))
    lse2 = lse2 * 1.4426950408889634
    delta = tl.load(DELTA + head.to(tl.int64) * total + rows, mask=row_ok, other=0.0)

    lo = tl.min(row_start, 0)
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, total)
        clean_end = m0 + 1
    else:
        hi = tl.max(row_end, 0)
        clean_end = tl.min(row_end, 0)
    n_tiles, t_a, t_b = _tile_ranges(lo, hi, tl.max(row_start, 0), clean_end, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    K_head = K + kv_head * stride_kh
    V_head = V + kv_head * stride_vh
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows, row_start, row_end, lo, 0, t_a,
        total, qk_scale, offs_d, d_ok, BLOCK_N, MASK_D, CAUSAL, True, PRECISION,
    )
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows, row_start, row_end, lo, t_a, t_b,
        total, qk_scale, offs_d, d_ok, BLOCK_N, MASK_D, CAUSAL, False, PRECISION,
    )
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K_head, V_head, stride_kt, stride_vt, rows, row_start, row_end, lo, t_b,
        n_tiles, total, qk_scale, offs_d, d_ok, BLOCK_N, MASK_D, CAUSAL, True, PRECISION,
    )
    tl.store(
        DQ + head * stride_dqh + rows64[:, None] * stride_dqt + offs_d[None, :],
        _cast(dq * sm_scale, DQ.dtype.element_ty, PRECISION),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# ------------------------------------------------------------------------------------ launchers
def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"flash attention expects q, k, v of shape (tokens, heads, head_dim); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in tokens and head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of {SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not 1 <= q.shape[2] <= 256:
        raise ValueError(f"head_dim {q.shape[2]} not supported (1..256)")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive Python int, got {max_seqlen!r}")
    if cu_seqlens is None:
        if q.shape[0] % max_seqlen != 0:
            raise ValueError(f"dense layout: tokens ({q.shape[0]}) must be a multiple of seq ({max_seqlen})")
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D int32 with n_docs+1 >= 2 entries; got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        # reading values is free on the CPU (on a GPU it would be a host sync, so it is skipped there)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((lengths < 0).any()):
            raise ValueError(
                f"cu_seqlens must rise from 0 to the token count {q.shape[0]}; got {cu_seqlens.tolist()}"
            )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _doc_args(cu_seqlens: torch.Tensor | None, max_seqlen: int, total: int, dummy: torch.Tensor) -> tuple:
    """(CU pointer, n_docs, binary-search steps, dense seq length, IS_DENSE) for the kernels."""
    if cu_seqlens is None:
        return dummy, 1, 0, max_seqlen, True
    n_docs = cu_seqlens.shape[0] - 1
    # the kernels index CU + i: a strided view (cu_seqlens = buf[::2]) is copied, never misread
    return cu_seqlens.contiguous(), n_docs, (n_docs - 1).bit_length(), 1, False


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and _interpreting():
        return "interpret_bf16"
    # fp32 inputs are the accuracy reference: keep full fp32 products instead of tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def _head_dim_padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int,
    causal: bool, softmax_scale: float, config: BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total, heads, head_dim = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((heads, total), dtype=torch.float32)
    if total == 0:
        return out, lse
    head_dim_p = _head_dim_padded(head_dim)
    cfg = config or block_config(head_dim_p, q.device, q.dtype)
    cu, n_docs, n_search, dense_seqlen, is_dense = _doc_args(cu_seqlens, max_seqlen, total, lse)
    grid = (triton.cdiv(total, cfg.fwd_m), heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1),
        total, n_docs, n_search, dense_seqlen, heads // k.shape[1], softmax_scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, CAUSAL=causal,
        IS_DENSE=is_dense, PRECISION=_precision(q.dtype), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse


def _backward(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int, causal: bool,
    softmax_scale: float, deterministic: bool, config: BlockConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    total, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if total == 0:
        return q.new_empty(q.shape), dk, dv
    head_dim_p = _head_dim_padded(head_dim)
    cfg = config or block_config(head_dim_p, q.device, q.dtype)
    cu, n_docs, n_search, dense_seqlen, is_dense = _doc_args(cu_seqlens, max_seqlen, total, lse)
    precision = _precision(q.dtype)
    group = heads // kv_heads

    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.contiguous().float()
    pre_block = 64 if not _interpreting() else 32
    _bwd_preprocess_kernel[(triton.cdiv(total, pre_block), heads)](
        out, dout, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        total, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK=pre_block, HAS_DLSE=dlse is not None,
    )

    # fp32 accumulator for atomic dQ; the deterministic kernel writes dQ directly
    dq = q.new_empty(q.shape) if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    _bwd_dkdv_kernel[(triton.cdiv(total, cfg.dkdv_n), kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, dq, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
        dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq.stride(0), dq.stride(1),
        total, n_docs, n_search, dense_seqlen, group, softmax_scale * LOG2E, softmax_scale, HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.dkdv_n, CAUSAL=causal, IS_DENSE=is_dense,
        ATOMIC_DQ=not deterministic, PRECISION=precision, num_warps=cfg.dkdv_warps,
        num_stages=cfg.dkdv_stages,
    )
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    _bwd_dq_kernel[(triton.cdiv(total, cfg.dq_m), heads)](
        q, k, v, dout, lse, delta, dq, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
        dout.stride(1), dq.stride(0), dq.stride(1),
        total, n_docs, n_search, dense_seqlen, group, softmax_scale * LOG2E, softmax_scale, HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p, BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, CAUSAL=causal, IS_DENSE=is_dense,
        PRECISION=precision, num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------ torch.library ops
@torch.library.custom_op("relscale::flash_attn_varlen_fwd", mutates_args=())
def flash_attn_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int,
    causal: bool, softmax_scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (tokens, heads, dim), lse (heads, tokens) fp32). ``cu_seqlens=None`` means equal documents
    of length ``max_seqlen``. ``deterministic`` only selects the backward's dQ path."""
    return _forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


@flash_attn_varlen_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("relscale::flash_attn_varlen_bwd", mutates_args=())
def flash_attn_varlen_bwd(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int, causal: bool,
    softmax_scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the forward above; ``dlse`` (heads, tokens) may be None."""
    return _backward(
        dout, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic
    )


@flash_attn_varlen_bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.set_materialize_grads(False)  # an unused lse then arrives as None: no zero tensor to read
    ctx.max_seqlen, ctx.causal, ctx.softmax_scale, ctx.deterministic = (
        max_seqlen, causal, softmax_scale, deterministic,
    )


def _grads(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    return torch.ops.relscale.flash_attn_varlen_bwd(
        dout, dlse, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.softmax_scale,
        ctx.deterministic,
    )


def _op_backward(ctx, dout, dlse):
    dq, dk, dv = _grads(ctx, dout, dlse)
    return dq, dk, dv, None, None, None, None, None


flash_attn_varlen_fwd.register_autograd(_op_backward, setup_context=_setup_context)


class FlashAttentionFunction(torch.autograd.Function):
    """autograd.Function over the custom ops; inputs as in ``relscale::flash_attn_varlen_fwd``."""

    @staticmethod
    def forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic):
        return torch.ops.relscale.flash_attn_varlen_fwd(
            q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _grads(ctx, dout, dlse)
        return dq, dk, dv, None, None, None, None, None


# ------------------------------------------------------------------------------ public functions
def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def flash_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
    causal: bool = True, softmax_scale: float | None = None, deterministic: bool = False,
) -> torch.Tensor:
    """Attention over packed documents.

    q: (total_tokens, heads, head_dim); k, v: (total_tokens, kv_heads, head_dim) with heads a multiple
    of kv_heads (GQA); cu_seqlens: int32 (n_docs + 1,) document offsets from 0 to total_tokens;
    max_seqlen: a Python int bound on document length (kept for interface compatibility; the grid
    does not depend on it). Returns (total_tokens, heads, head_dim), contiguous. Under autocast q, k, v
    are cast to the autocast dtype first (as autocast does for scaled_dot_product_attention).
    """
    if cu_seqlens is None:
        raise ValueError("flash_attention_varlen needs cu_seqlens; use flash_attention for (B, S, H, D)")
    q, k, v = autocast_inputs(q, k, v)
    out, _ = FlashAttentionFunction.apply(
        q, k, v, cu_seqlens, max_seqlen, causal, _scale(softmax_scale, q.shape[-1]), deterministic
    )
    return out


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
    softmax_scale: float | None = None, deterministic: bool = False,
) -> torch.Tensor:
    """Attention on (batch, seq, heads, head_dim) q and (batch, seq, kv_heads, head_dim) k, v."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attention expects (batch, seq, heads, head_dim) tensors; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, seq = q.shape[:2]
    if k.shape[:2] != (batch, seq) or v.shape[:2] != (batch, seq):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ in batch/seq")
    if batch * seq == 0:
        return q.new_empty(q.shape)
    flat = [t.reshape(batch * seq, t.shape[2], t.shape[3]) for t in autocast_inputs(q, k, v)]
    out, _ = FlashAttentionFunction.apply(
        *flat, None, seq, causal, _scale(softmax_scale, q.shape[-1]), deterministic
    )
    return out.view(q.shape)


class FlashAttention(torch.nn.Module):
    """Drop-in attention module: ``forward(q, k, v)`` on (B, S, H, D), or
    ``forward(q, k, v, cu_seqlens, max_seqlen)`` on packed (tokens, H, D)."""

    def __init__(self, causal: bool = True, softmax_scale: float | None = None, deterministic: bool = False):
        super().__init__()
        self.causal, self.softmax_scale, self.deterministic = causal, softmax_scale, deterministic

    def forward(self, q, k, v, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None):
        if cu_seqlens is None:
            return flash_attention(
                q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                deterministic=self.deterministic,
            )
        if max_seqlen is None:
            raise ValueError("FlashAttention: max_seqlen is required with cu_seqlens")
        return flash_attention_varlen(
            q, k, v, cu_seqlens, max_seqlen, causal=self.causal, softmax_scale=self.softmax_scale,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}, deterministic={self.deterministic}"
