"""A Qwen3/Llama-style pre-norm decoder: RMSNorm, RoPE, SwiGLU, optional QK-norm and GQA,
untied embeddings by default, no biases.

The model knows ops, not kernels: every non-matmul op goes through :mod:`relscale.ops`, which
routes it to the backend chosen in ``ModelConfig.kernels``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from relscale import ops
from relscale.config import KernelConfig, ModelConfig
from relscale.counting import ParamCounts, param_counts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)


class Attention(nn.Module):
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
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.apply_rope(q, k, positions, inv_freq, backend=self.kernels.rope)
        out = ops.attention(
            q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=self.kernels.attention
        )
        return self.wo(out.reshape(batch, seq, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backend = cfg.kernels.swiglu
        self.w_gate = nn.Linear(cfg.hidden, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.hidden, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(ops.swiglu(self.w_gate(x), self.w_up(x), backend=self.backend))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.kernels.rms_norm)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, cfg.kernels.rms_norm)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        inv_freq: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cu_seqlens, max_seqlen, inv_freq)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
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
        return param_counts(self.cfg)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, S, d) of ``tokens`` (B, S)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed(tokens)
        inv_freq = self.rope_inv_freq(tokens.device)
        for block in self.blocks:
            x = block(x, positions, cu_seqlens, max_seqlen, inv_freq)
        return self.norm(x)

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
        """Logits (B, S, V) without ``targets``; with them, the cross-entropy loss (a scalar, or
        per-token losses (B, S) for ``reduction="none"``)."""
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
