"""A Qwen3/Llama-style pre-norm decoder: RMSNorm, RoPE, SwiGLU, optional QK-norm and GQA,
untied embeddings by default, no biases.

The model knows ops, not kernels: every non-matmul op goes through :mod:`relscale.ops`, which
routes it to the backend chosen in ``ModelConfig.kernels``.

Layout of the computation (what differs from a textbook pre-norm block, and why):

* **Fused projections.** The parameters are the usual separate matrices (``attn.wq/wk/wv/wo``,
  ``mlp.w_gate/w_up/w_down``), so state-dict keys, DCP checkpoints, FSDP2 sharding (one DTensor
  per matrix) and HF import/export see exactly those names. At compute time ``wq|wk|wv`` and
  ``w_gate|w_up`` are concatenated along the output dim and applied as ONE matmul each, so the
  input activation is read (and, under autocast, cast) once instead of three or two times.
* **Fused residual add + RMSNorm.** Blocks pass ``(branch_output, residual)`` to each other; the
  next norm adds the branch output to the residual stream and normalises in one op
  (:func:`relscale.ops.add_rms_norm`), as the pre-norm ``Block`` of the flash-attn library passes
  ``(hidden_states, residual)`` to its fused add + norm. The arithmetic is the textbook one,
  ``x_{i+1} = (x_i + attn) + mlp``, in the same order.
* **bf16 end to end under autocast.** With fp32 weights under ``torch.autocast`` the embedding
  output is cast to the autocast dtype, so the residual stream, every norm and the fused
  linear cross-entropy's input are in that dtype and every matmul runs in it (autocast alone would
  keep the residual stream and the norms in fp32 and cast the activation before every matmul).
* **Activation checkpointing** (``activation_checkpointing=True``): each block is recomputed in
  the backward (``torch.utils.checkpoint``, non-reentrant), so only the block inputs are saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from relscale import ops
from relscale.config import KernelConfig, ModelConfig
from relscale.counting import ParamCounts, param_counts


def _compute_weight(weights: tuple[torch.Tensor, ...], device_type: str) -> torch.Tensor:
    """The weights concatenated along dim 0 (output features), each first cast to the autocast
    dtype when autocast is on for ``device_type`` (so the copy is made in the narrow dtype and
    ``F.linear`` finds nothing left to cast). Gradients flow back to each weight in its own dtype.
    """
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weights = tuple(w.to(dtype) if w.dtype == torch.float32 else w for w in weights)
    return torch.cat(weights, dim=0)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain (initialised to 1), no bias.

    ``forward(x)`` returns ``rms_norm(x)`` (same shape and dtype as x); ``forward(x, residual)``
    returns ``(rms_norm(x + residual), x + residual)`` through the fused op
    :func:`relscale.ops.add_rms_norm` (one pass over x and residual with the Triton backend).
    ``backend`` is the ``model.kernels.rms_norm`` choice.
    """

    def __init__(self, dim: int, eps: float, backend: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``rms_norm(x) * weight``, or with ``residual`` (same shape (..., dim)) the pair
        ``(rms_norm(x + residual) * weight, x + residual)`` from one fused op (ops.add_rms_norm)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)


class Attention(nn.Module):
    """Causal multi-head attention with GQA, optional QK-norm (Qwen3) and RoPE.

    Parameters ``wq`` (h*d_head, d), ``wk`` and ``wv`` (h_kv*d_head, d), ``wo`` (d, h*d_head), applied
    as one fused QKV matmul plus the output projection. Input and output (B, S, d).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.d_head
        self.kernels: KernelConfig = cfg.kernels
        self.wq = nn.Linear(cfg.hidden, self.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg.hidden, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.kernels.rms_norm)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.kernels.rms_norm)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        inv_freq: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d). ``positions`` (B, S), ``cu_seqlens`` (documents + 1,) int32 or
        None (plain causal), ``inv_freq`` (d_head // 2,) from :meth:`Transformer.rope_inv_freq`."""
        batch, seq, _ = x.shape
        weight = _compute_weight((self.wq.weight, self.wk.weight, self.wv.weight), x.device.type)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = F.linear(x, weight).split((q_size, kv_size, kv_size), dim=-1)
        # Views into the one (B, S, q_size + 2*kv_size) product: no copy here.
        q = q.view(batch, seq, self.heads, self.head_dim)
        k = k.view(batch, seq, self.kv_heads, self.head_dim)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.apply_rope(q, k, positions, inv_freq, backend=self.kernels.rope)
        out = ops.attention(
            q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.kernels.attention
        )
        return self.wo(out.reshape(batch, seq, q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020):
    ``w_down(silu(w_gate x) * (w_up x))`` with ``w_gate``/``w_up`` (d_ff, d) applied as one fused
    matmul and ``w_down`` (d, d_ff). Input and output (..., d)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backend = cfg.kernels.swiglu
        self.d_ff = cfg.d_ff
        self.w_gate = nn.Linear(cfg.hidden, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.hidden, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``w_down(silu(x w_gate^T) * (x w_up^T))`` for x (B, S, hidden) -> (B, S, hidden); the gate
        and up projections run as one GEMM against their concatenated weights."""
        weight = _compute_weight((self.w_gate.weight, self.w_up.weight), x.device.type)
        gate, up = F.linear(x, weight).split(self.d_ff, dim=-1)
        return self.w_down(ops.swiglu(gate, up, backend=self.backend))


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``.

    To fuse each residual add with the following norm, a block takes and returns the pair
    ``(branch, residual)`` whose sum is the residual stream: ``forward(x, residual)`` normalises
    ``x + residual`` (or ``x`` alone when ``residual`` is None, the first block), and returns the
    MLP output and the stream before it is added. All tensors (B, S, d).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.kernels.rms_norm)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.kernels.rms_norm)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        inv_freq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch, residual) after this layer, both (B, S, d); see the class docstring.
        positions (B, S) or (S,); cu_seqlens (docs + 1,) int32 and max_seqlen for document
        masking (None: causal over the whole row); inv_freq (d_head / 2,) RoPE frequencies."""
        if residual is None:
            normed, residual = self.attn_norm(x), x
        else:
            normed, residual = self.attn_norm(x, residual)
        x = self.attn(normed, positions, cu_seqlens, max_seqlen, inv_freq)
        normed, residual = self.mlp_norm(x, residual)
        return self.mlp(normed), residual


class Transformer(nn.Module):
    """The decoder: token embedding, ``cfg.layers`` blocks, final RMSNorm, output head (V, d).

    ``activation_checkpointing=True`` recomputes every block in the backward pass
    (``torch.utils.checkpoint``, non-reentrant): saved activations drop from everything a block
    keeps for its backward to the block's two inputs (2 x B x S x d), for one extra forward of the
    blocks (~1/3 more compute). Outputs and gradients are unchanged. Raises ConfigError for an
    invalid ``cfg``.
    """

    def __init__(self, cfg: ModelConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.kernels.rms_norm)
        self.output = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight
        # The RoPE frequency table per device: derived from the config, so it is neither a parameter
        # nor a buffer (a buffer would be cast by model.to(bf16) and left empty by to_empty()).
        self._rope_tables: dict[torch.device, torch.Tensor] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; the two residual-branch outputs scaled by 1/sqrt(2L)
        (GPT-2) so the residual stream's variance does not grow with depth; norms at 1."""
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight")):
                param.normal_(0.0, std / math.sqrt(2 * self.cfg.layers))
            else:
                param.normal_(0.0, std)

    def rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        """The (d_head // 2,) float64 RoPE frequency table on ``device`` (see ops.rope_inv_freq)."""
        table = self._rope_tables.get(device)
        if table is None:
            cfg = self.cfg
            table = ops.rope_inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling, device=device)
            self._rope_tables[device] = table
        return table

    def param_counts(self) -> ParamCounts:
        """Parameter counts of this model's config (see :func:`relscale.counting.param_counts`)."""
        return param_counts(self.cfg)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, S, d) of ``tokens`` (B, S) int64.

        ``positions`` (B, S): RoPE positions (default ``0..S-1`` per row); ``cu_seqlens``
        (documents + 1,) int32 offsets into the flattened B*S tokens: attention stays inside each
        document; ``max_seqlen``: the longest document (a bound, for the kernels). The dtype is the
        autocast dtype under autocast, else the parameters' dtype.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed(tokens)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(device_type))  # the residual stream in the compute dtype
        inv_freq = self.rope_inv_freq(tokens.device)
        residual: torch.Tensor | None = None
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x, residual = checkpoint(
                    block, x, residual, positions, cu_seqlens, max_seqlen, inv_freq, use_reentrant=False
                )
            else:
                x, residual = block(x, residual, positions, cu_seqlens, max_seqlen, inv_freq)
        if residual is None:  # no blocks
            return self.norm(x)
        return self.norm(x, residual)[0]

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Logits (B, S, V) without ``targets``; with ``targets`` (B, S) (``ignore_index`` marks
        tokens without a target), the cross-entropy loss in fp32: a scalar for ``reduction``
        ``"mean"`` (over non-ignored tokens; 0 when all are ignored) or ``"sum"``, per-token losses
        (B, S) for ``"none"``. With ``cfg.fused_loss`` the head and the loss run as one op
        (:func:`relscale.ops.linear_cross_entropy`), without materialising the logits on the
        Triton backend. Other arguments as in :meth:`hidden_states`."""
        h = self.hidden_states(tokens, positions, cu_seqlens, max_seqlen)
        if targets is None:
            return self.output(h)
        flat_h, flat_targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        kwargs = dict(
            ignore_index=ignore_index, reduction=reduction, z_loss=self.cfg.z_loss,
            backend=self.cfg.kernels.cross_entropy,
        )
        if self.cfg.fused_loss:
            loss = ops.linear_cross_entropy(flat_h, self.output.weight, flat_targets, **kwargs)
        else:
            loss = ops.cross_entropy(self.output(flat_h), flat_targets, **kwargs)
        return loss.view(targets.shape) if reduction == "none" else loss
