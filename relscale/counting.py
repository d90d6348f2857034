"""Parameter and FLOP counts, both FLOP conventions, documented once.

Parameters
----------
* ``total``: every parameter (an untied output head counts separately from the input embedding).
* ``embedding``: the input embedding plus the output head (``2*V*d`` untied, ``V*d`` tied).
* ``non_embedding``: ``total - embedding`` (attention, MLP and norm weights).

FLOP conventions (per token; a run's FLOPs are per-token FLOPs times training tokens)
---------------------------------------------------------------------------------------
``flops_train`` -- training FLOPs, the "6N" convention with a causal-attention term:
    ``6 * N_matmul + 6 * L * s * h * d_head``
    where ``N_matmul = non_embedding + V*d`` counts the weights of the matrix products (the input
    embedding is a lookup; the output head is a product; the norm gains inside ``non_embedding``
    are counted too, a difference of ~1e-4 relative), the factor 6 is forward (2)
    plus backward (4), and the attention term counts ``Q K^T`` and ``A V`` (``2 * 2*s*d_head`` per
    head and token in the forward), halved because the mask is causal, times 3 for the backward.

``flops_marin`` -- the forward-only accounting of Marin's IsoFLOP sweeps (the budgets 1e18..1e20 of
    "Relative Scaling Laws for LLMs" are in this convention):
    per layer ``2*3*d*d_ff + 2*d*(h + 2*h_kv)*d_head + 2*(h*d_head)*d + (4*s*d + 3*s*h)``,
    plus ``2*d*V`` for the head. Without GQA and with ``h*d_head = d`` the attention projections
    are Marin's ``2*d*3d + 2*d^2``. It counts no backward pass and no causal halving, so
    ``flops_train / flops_marin`` is about 3 (a bit less for long sequences): scaling-law
    prefactors fitted against FLOPs depend on the convention, exponents do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from relscale.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, hd, h, kv = cfg.hidden, cfg.d_head, cfg.heads, cfg.n_kv_heads
    attention = d * h * hd + 2 * d * kv * hd + h * hd * d
    qk_norm = 2 * hd if cfg.qk_norm else 0
    mlp = 3 * d * cfg.d_ff
    norms = 2 * d
    per_layer = attention + qk_norm + mlp + norms
    non_embedding = cfg.layers * per_layer + d  # + the final norm
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return ParamCounts(total=non_embedding + embedding, embedding=embedding, non_embedding=non_embedding)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product: non-embedding plus the output head."""
    return param_counts(cfg).non_embedding + cfg.vocab_size * cfg.hidden


def flops_per_token_train(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6*N_matmul + causal attention (see the module docstring)."""
    return 6 * matmul_params(cfg) + 6 * cfg.layers * seq_len * cfg.heads * cfg.d_head


def flops_per_token_marin(cfg: ModelConfig, seq_len: int) -> int:
    """Marin's forward-only FLOPs per token (see the module docstring)."""
    d, hd, h, kv, s = cfg.hidden, cfg.d_head, cfg.heads, cfg.n_kv_heads, seq_len
    per_layer = 2 * 3 * d * cfg.d_ff + 2 * d * (h + 2 * kv) * hd + 2 * (h * hd) * d + (4 * s * d + 3 * s * h)
    return cfg.layers * per_layer + 2 * d * cfg.vocab_size


@dataclass(frozen=True)
class RunFlops:
    tokens: int
    flops_train: float
    flops_marin: float


def run_flops(cfg: ModelConfig, seq_len: int, tokens: int) -> RunFlops:
    """FLOPs of a run that trains on ``tokens`` tokens in sequences of ``seq_len``."""
    return RunFlops(
        tokens=tokens,
        flops_train=float(flops_per_token_train(cfg, seq_len)) * tokens,
        flops_marin=float(flops_per_token_marin(cfg, seq_len)) * tokens,
    )
