"""The one dispatch point for every non-matmul op of the model.

Each op has a torch reference implementation here and may be routed to a Triton kernel
(``relscale.kernels``) or to the compiled extension (``relscale._C``, built from ``csrc/``; its
``cuda`` backend has a real C++ CPU path too). The backend is chosen per op by
``ModelConfig.kernels``:

=============  ===============  ==========================================================
op             backends         ``auto`` picks
=============  ===============  ==========================================================
rms_norm       torch, triton    triton on CUDA tensors, torch otherwise
rope           torch, cuda      the extension when it is built (CPU and CUDA), else torch
swiglu         torch, cuda      the extension on CUDA tensors when built with CUDA, else torch
attention      torch, triton    triton on CUDA tensors, torch otherwise
cross_entropy  torch, triton    triton on CUDA tensors, torch otherwise (also the fused
                                linear + cross-entropy)
=============  ===============  ==========================================================

Triton kernels run on the CPU only through Triton's interpreter (``TRITON_INTERPRET=1``), which
is for tests, so ``auto`` never picks them for CPU tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from relscale.config import RopeScalingConfig
from relscale.errors import ConfigError

SUPPORTED: dict[str, tuple[str, ...]] = {
    "rms_norm": ("torch", "triton"),
    "rope": ("torch", "cuda"),
    "swiglu": ("torch", "cuda"),
    "attention": ("torch", "triton"),
    "cross_entropy": ("torch", "triton"),
}


_RESOLVED: dict[tuple[str, str, str], str] = {}


def resolve(op: str, requested: str, device_type: str) -> str:
    """The backend that runs ``op`` for tensors on ``device_type`` given the configured choice.

    Memoised in a plain dict (not functools.lru_cache, which torch.compile cannot trace into)."""
    key = (op, requested, device_type)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(op, requested, device_type)
    return _RESOLVED[key]


def _resolve(op: str, requested: str, device_type: str) -> str:
    if op not in SUPPORTED:
        raise ConfigError(f"unknown op {op!r} (known: {', '.join(SUPPORTED)})")
    if requested == "auto":
        if op in ("rope", "swiglu"):
            return "cuda" if _extension_serves(op, device_type) else "torch"
        return "triton" if device_type == "cuda" else "torch"
    if requested not in SUPPORTED[op]:
        raise ConfigError(
            f"model.kernels.{op}: backend {requested!r} does not implement {op} "
            f"(choose from auto, {', '.join(SUPPORTED[op])})"
        )
    return requested


def _extension_serves(op: str, device_type: str) -> bool:
    """Whether ``auto`` should route ``op`` to the compiled extension on ``device_type``.

    On the CPU only RoPE: the C++ RoPE measured ~3x faster than the torch reference, while torch's
    vectorised SiLU beat the scalar C++ SwiGLU loop. On CUDA only when the build has CUDA kernels.
    """
    from relscale import ext

    if not ext.available():
        return False
    if device_type == "cpu":
        return op == "rope"
    return device_type == "cuda" and ext.has_cuda_kernels()


# ----------------------------------------------------------------------------------------- norms
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, stored in x's dtype: ``x / sqrt(mean(x^2) + eps) * weight``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x (..., H) with weight (H,) (see :func:`rms_norm_reference`), on the chosen backend."""
    if resolve("rms_norm", backend, x.device.type) == "triton":
        from relscale.kernels.rmsnorm import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm of a pre-norm block: ``new_residual = x + residual`` and
    ``normed = rms_norm(new_residual, weight, eps)``; returns ``(normed, new_residual)``.

    x, residual: (..., H) of the same shape; weight: (H,). Both outputs are in the promoted dtype of
    x and residual (what ``x + residual`` gives, e.g. fp32 for a bf16 branch output under autocast
    added to an fp32 residual stream); the sum is rounded to it once and normalised in fp32 (Zhang &
    Sennrich 2019, RMSNorm). Backend key ``model.kernels.rms_norm``: the Triton kernel of
    ``relscale.kernels.rmsnorm`` does both in one pass. Differentiable in x, residual and weight.
    Raises ValueError for mismatched shapes.
    """
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    dtype = torch.promote_types(x.dtype, residual.dtype)
    x, residual = x.to(dtype), residual.to(dtype)
    if resolve("rms_norm", backend, x.device.type) == "triton":
        from relscale.kernels.rmsnorm import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    new_residual = (x.float() + residual.float()).to(dtype)
    return rms_norm_reference(new_residual, weight, eps), new_residual


# ------------------------------------------------------------------------------------------ rope
def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScalingConfig | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The rotary inverse frequencies, (head_dim // 2,) float64: ``theta ** (-2i / head_dim)``.

    The one place the frequencies are computed; every RoPE backend (torch, the C++/CUDA
    extension) takes this table. Plain RoPE follows Su et al., "RoFormer" (2021). With
    ``scaling.type == "llama3"`` (Llama 3.1, as exported by Hugging Face ``rope_type: llama3``):
    a frequency of wavelength ``w = 2*pi / f`` is kept when ``w < L / high_freq_factor``, divided by
    ``factor`` when ``w > L / low_freq_factor`` (``L = original_max_position_embeddings``), and in
    between interpolated as ``(1 - s) * f / factor + s * f`` with
    ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

    Raises ValueError for an odd ``head_dim`` or an unknown scaling type.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_inv_freq: head_dim must be even and positive, got {head_dim}")
    even = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
    inv_freq = float(theta) ** (-even / head_dim)
    kind = "none" if scaling is None else scaling.type
    if kind == "none":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_inv_freq: rope_scaling.type {kind!r} is not implemented")
    old_len = float(scaling.original_max_position_embeddings)
    low, high = float(scaling.low_freq_factor), float(scaling.high_freq_factor)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / scaling.factor, interpolated)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape ``positions.shape + (2 * len(inv_freq),)`` in fp32 (HF rotate-half
    layout); angles are formed in float64 so long positions lose no precision."""
    freqs = positions.to(torch.float64)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_positions(positions: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``positions`` of shape (S,), (1, S) or (B, S) as a (B, S) view (broadcast over the batch).

    Every RoPE backend goes through this, so they accept the same shapes and refuse others with the
    same message. Raises ValueError naming the accepted shapes.
    """
    if tuple(positions.shape) in ((seq,), (1, seq), (batch, seq)):
        return positions.expand(batch, seq)
    raise ValueError(
        f"rope: positions must have shape ({seq},), (1, {seq}) or ({batch}, {seq}) for q of batch {batch} "
        f"and sequence {seq}, got {tuple(positions.shape)}"
    )


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, S, H, D) and k (B, S, H_kv, D) at integer ``positions`` ((S,), (1, S)
    or (B, S)) with the frequency table ``inv_freq`` (D // 2,) from :func:`rope_inv_freq`.

    fp32 math with float64 angles, rotate-half layout (Su et al., "RoFormer", 2021)."""
    positions = rope_positions(positions, q.shape[0], q.shape[1])
    cos, sin = rope_angles(positions, inv_freq)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    q_out = q.float() * cos + _rotate_half(q.float()) * sin
    k_out = k.float() * cos + _rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, S, H, D) and k (B, S, H_kv, D) at integer ``positions`` ((S,), (1, S)
    or (B, S), any integer dtype) with the frequency table ``inv_freq`` (D // 2,) from
    :func:`rope_inv_freq`. Every backend gives the fp32-math result rounded once to q's dtype.

    Raises ValueError for a positions shape other than those three."""
    if resolve("rope", backend, q.device.type) == "cuda":
        from relscale import ext

        batch, seq = q.shape[:2]
        flat_positions = rope_positions(positions, batch, seq).reshape(-1).long()
        q_out, k_out = ext.rope(
            q.reshape(batch * seq, *q.shape[2:]),
            k.reshape(batch * seq, *k.shape[2:]),
            flat_positions,
            inv_freq,
        )
        return q_out.view(q.shape), k_out.view(k.shape)
    return rope_reference(q, k, positions, inv_freq)


# ---------------------------------------------------------------------------------------- swiglu
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020, GLU variants), any shape, in the inputs' dtype."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up of two same-shape tensors (..., d_ff), routed to the extension or torch by
    ``backend`` (see the table at the top of this module); differentiable."""
    if resolve("swiglu", backend, gate.device.type) == "cuda":
        from relscale import ext

        return ext.swiglu(gate.contiguous(), up.contiguous())
    return swiglu_reference(gate, up)


# ------------------------------------------------------------------------------------- attention
def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index of each of ``total`` flattened tokens, from cumulative offsets."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)


def _attention_mask(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(B, S, S) boolean: causal, and within one document when ``cu_seqlens`` is given."""
    batch, seq = q.shape[:2]
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril().expand(batch, seq, seq)
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, batch * seq).view(batch, seq)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention on (B, S, H, D) tensors; with ``cu_seqlens`` no token attends across a
    document boundary. Grouped-query attention when k/v have fewer heads than q. With
    ``return_lse`` also the log-sum-exp of the scaled scores, (B, H, S) fp32 (natural log)."""
    batch, seq, heads, _ = q.shape
    groups = heads // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if groups > 1:
        kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale)
    else:
        mask = _attention_mask(q, cu_seqlens)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=softmax_scale)
    out = out.transpose(1, 2)
    if not return_lse:
        return out
    softmax_scale = default_softmax_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = torch.einsum("bhsd,bhtd->bhst", qt.float(), kt.float()) * softmax_scale
    scores = scores.masked_fill(~_attention_mask(q, cu_seqlens)[:, None], float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``cu_seqlens`` (n_docs + 1,) of a (B, S) batch, checked and as contiguous int32.

    The document offsets must rise from 0 to B*S and include every row start (multiples of S):
    a document never crosses a row, which is what the loader produces and what both attention
    backends then agree on. Int32 and int64 are accepted. On the CPU a violation raises ValueError
    (reading values is free there); on a GPU the same check is an asynchronous device assert, so the
    training step has no host sync."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor of n_docs + 1 >= 2 offsets; got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(torch.int32).contiguous()
    total = batch * seq
    starts = torch.arange(0, total, seq, device=cu.device, dtype=torch.int32)
    ok_ends = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
    ok_rows = torch.isin(starts, cu).all()
    message = (
        f"cu_seqlens must rise from 0 to the token count {total} and contain every row start "
        f"(multiples of S={seq}: documents never cross rows)"
    )
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok_ends & ok_rows):
            raise ValueError(f"{message}; got {cu.tolist()}")
    else:
        torch._assert_async(ok_ends & ok_rows, message)
    return cu


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal (document-masked when ``cu_seqlens`` is given) attention, (B, S, H, D) layout, GQA when
    k/v have fewer heads. ``softmax_scale`` defaults to 1/sqrt(D).

    ``deterministic=True`` makes the Triton backward compute dQ without atomics (same bits every
    run, ~1.4x the backward's matmuls); the torch reference is as deterministic as torch's own
    kernels. ``return_lse=True`` returns ``(out, lse)`` with lse the natural-log log-sum-exp of the
    scaled scores, (B, H, S) fp32, differentiable (FlashAttention-2, Dao 2023).
    """
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, *q.shape[:2])
    if resolve("attention", backend, q.device.type) == "triton":
        from relscale.kernels import flash_attention as fa

        batch, seq = q.shape[:2]
        q, k, v = fa.autocast_inputs(q, k, v)
        flat = [t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v)]
        if cu_seqlens is None:
            doc_len = seq
        else:
            doc_len = max_seqlen if max_seqlen is not None else seq
        softmax_scale = softmax_scale if softmax_scale is not None else default_softmax_scale(q.shape[-1])
        out, lse = fa.FlashAttentionFunction.apply(
            *flat, cu_seqlens, doc_len, True, float(softmax_scale), deterministic
        )
        out = out.view(q.shape)
        if not return_lse:
            return out
        return out, lse.view(q.shape[2], batch, seq).transpose(0, 1)
    return attention_reference(q, k, v, cu_seqlens, softmax_scale, return_lse)


# --------------------------------------------------------------------------------- cross-entropy
def cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy in fp32 plus ``z_loss * logsumexp^2``, after the optional logit soft-cap
    ``softcap * tanh(logits / softcap)`` (Gemma 2); ``mean`` is over non-ignored tokens and is 0
    (not NaN) when every token is ignored."""
    from relscale.kernels.cross_entropy import check_targets

    targets = targets.long()  # int32 labels too, as the Triton kernels take them
    check_targets(targets, logits.shape[-1], ignore_index, "cross_entropy")
    logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    valid = targets != ignore_index
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of (N, V) logits against (N,) targets, an fp32 result.

    ``reduction``: "mean" over the non-ignored targets, "sum", or "none" (per token, 0 at ignored
    ones). Policy for a batch whose targets are ALL ``ignore_index``: "mean" returns 0 with a zero
    gradient, in every backend (torch's own F.cross_entropy returns NaN there), so an empty
    micro-batch adds nothing to an accumulated loss instead of poisoning it. ``z_loss`` adds
    ``z_loss * logsumexp^2`` per token (PaLM); ``softcap`` applies ``softcap * tanh(x / softcap)`` to
    the logits first. A target outside [0, V) that is not ``ignore_index`` is an error (a
    ValueError/RuntimeError on the CPU, a device-side assert on CUDA).
    """
    if resolve("cross_entropy", backend, logits.device.type) == "triton":
        from relscale.kernels.cross_entropy import cross_entropy as cross_entropy_triton

        return cross_entropy_triton(
            logits, targets, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss,
            softcap=softcap,
        )
    return cross_entropy_reference(logits, targets, ignore_index, reduction, z_loss, softcap)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` (N, H) x (V, H) without holding the N x V logits
    when the Triton backend is used; the torch reference materialises them. Arguments and the
    all-ignored policy as in :func:`cross_entropy`. Under autocast the projection runs in the
    autocast dtype in both backends (bf16 GEMMs with fp32 accumulation)."""
    if resolve("cross_entropy", backend, hidden.device.type) == "triton":
        from relscale.kernels.fused_linear_ce import linear_cross_entropy as flce

        return flce(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss,
            softcap=softcap,
        )
    logits = hidden @ weight.t()
    return cross_entropy_reference(logits, targets, ignore_index, reduction, z_loss, softcap)


def default_softmax_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim), the scaled dot-product attention default (Vaswani et al. 2017)."""
    return 1.0 / math.sqrt(head_dim)
