"""Parameter, FLOP and activation-memory counts; every convention documented once, here.

Symbols: ``d`` hidden size, ``L`` layers, ``h`` query heads, ``h_kv`` key/value heads, ``d_head``
head size (``h * d_head`` need not equal ``d``: Qwen3-4B has d=2560, h*d_head=4096), ``d_ff`` the
SwiGLU inner size, ``V`` vocabulary, ``s`` sequence length, ``D`` training tokens.

Parameters
----------
* ``total``: every parameter (an untied output head counts separately from the input embedding).
* ``embedding``: the input embedding plus the output head (``2*V*d`` untied, ``V*d`` tied).
* ``non_embedding``: ``total - embedding`` (attention, MLP and norm weights) -- Kaplan et al.'s N.

FLOP conventions (per token; a run's FLOPs are per-token FLOPs times training tokens D)
----------------------------------------------------------------------------------------
``flops_train`` -- training FLOPs, "6ND" with the output head and a causal-attention term:
    ``6 * N_matmul + 6 * L * s * h * d_head``
    where ``N_matmul = non_embedding + V*d`` counts the weights of the matrix products (the input
    embedding is a lookup; the output head is a product; the norm gains inside ``non_embedding``
    are counted too, a difference of ~1e-4 relative), the factor 6 is forward (2) plus backward
    (4), and the attention term counts ``Q K^T`` and ``A V`` (``2 * 2*s*d_head`` per head and token
    in the forward), halved because the mask is causal, times 3 for the backward.
    Relative to 6ND: with N = ``non_embedding`` (Kaplan et al. 2020) it adds the head's ``6*V*d``
    and the attention term; with N = ``total`` (untied) it drops the input embedding's ``6*V*d``
    and adds the attention term.

``flops_marin`` -- the forward-only accounting of Marin's IsoFLOP sweeps (Levanter's
    ``lm_flops_per_token``; the budgets 1e18..1e20 of "Relative Scaling Laws for LLMs" are in this
    convention), on the model's actual shapes. Per layer::

        2*3*d*d_ff                      SwiGLU: gate, up, down
      + 2*d*(h + 2*h_kv)*d_head         Q, K, V projections
      + 2*(h*d_head)*d                  output projection
      + 4*s*h*d_head + 3*s*h            Q K^T and A V over the FULL s x s map, plus the mask/softmax

    plus ``2*d*V`` for the head. No backward, no causal halving, no norms.
    Relative to flops_train: ``3 * flops_marin = 6*(N_matmul - norm gains) + 12*L*s*h*d_head +
    9*L*s*h``, so ``flops_train / flops_marin`` is 3 at short sequences and a bit less for long ones.
    Relative to Marin's logged ``throughput/total_gflops``: that is 3 x the forward count times the
    tokens (measured: exactly 3 x the forward-only budget), i.e. ``3 * flops_marin * D`` -- for
    every shape with ``h * d_head = d`` (all of the paper's grid: heads = d / 128). For other shapes
    see ``flops_levanter``.

``flops_levanter`` -- what Levanter literally computes for a Llama/Qwen3 config: its
    ``flops_per_token`` does not pass the head size, so ``lm_flops_per_token`` takes
    ``d_head = d / h`` and an output projection of ``2*d*d``. It equals ``flops_marin`` when
    ``h * d_head = d`` and differs otherwise (Qwen3-4B shapes at s=4096: 0.846x); use it only to
    compare with numbers Marin logged (``total_gflops = 3 * flops_levanter * D``), never to size
    a run. Before this module was fixed, ``flops_marin``'s attention term used ``4*s*d`` instead of
    ``4*s*h*d_head`` (0.9135x at Qwen3-4B shapes, s=4096).

Scaling-law prefactors fitted against FLOPs depend on the convention; exponents do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from relscale.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (see the module docstring): ``total = embedding + non_embedding``."""

    total: int
    embedding: int
    non_embedding: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of :class:`relscale.model.Transformer` built from ``cfg``
    (tied embeddings counted once), equal to ``sum(p.numel() for p in model.parameters())``."""
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
    """Training FLOPs per token (forward + backward) at sequence length ``seq_len``:
    ``6*N_matmul + 6*L*s*h*d_head`` (see the module docstring)."""
    return 6 * matmul_params(cfg) + 6 * cfg.layers * seq_len * cfg.heads * cfg.d_head


def flops_per_token_marin(cfg: ModelConfig, seq_len: int) -> int:
    """Marin's forward-only FLOPs per token at sequence length ``seq_len``, on the model's actual
    head shapes (see the module docstring; the IsoFLOP budgets are in this convention)."""
    d, hd, h, kv, s = cfg.hidden, cfg.d_head, cfg.heads, cfg.n_kv_heads, seq_len
    mlp = 2 * 3 * d * cfg.d_ff
    projections = 2 * d * (h + 2 * kv) * hd + 2 * (h * hd) * d
    attention = 4 * s * h * hd + 3 * s * h  # QK^T and AV on the full s x s map, plus the mask
    return cfg.layers * (mlp + projections + attention) + 2 * d * cfg.vocab_size


def flops_per_token_levanter(cfg: ModelConfig, seq_len: int) -> float:
    """Levanter's ``lm_flops_per_token`` as its Llama/Qwen3 configs call it (head size taken as
    ``d / h``, output projection ``2*d*d``): what Marin's logged ``throughput/total_gflops`` is 3x
    of, per token. Equals :func:`flops_per_token_marin` when ``h * d_head == d``. For comparing
    with logged numbers only (see the module docstring). Source: stanford-crfm/levanter,
    ``levanter.utils.flop_utils.lm_flops_per_token`` and ``LlamaConfig.flops_per_token``."""
    d, h, kv, s = cfg.hidden, cfg.heads, cfg.n_kv_heads, seq_len
    hd = d / h
    mlp = 2 * 3 * d * cfg.d_ff
    projections = 2 * d * (h * hd + 2 * kv * hd) + 2 * d * d
    attention = 4 * s * h * hd + 3 * s * h
    return float(cfg.layers * (mlp + projections + attention) + 2 * d * cfg.vocab_size)


@dataclass(frozen=True)
class RunFlops:
    """A run's total FLOPs in both conventions (see the module docstring)."""

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


def activation_bytes_per_token(
    cfg: ModelConfig, dtype_bytes: int = 2, activation_checkpointing: bool = False
) -> int:
    """An estimate of the activation memory the backward pass keeps, per token of a micro-batch
    (multiply by micro_batch * seq_len for a micro-step), with the fused kernels (Triton RMSNorm and
    attention, the extension's RoPE and SwiGLU) and activations of ``dtype_bytes`` (2: bf16).

    Per block, in elements: the residual sum and normalised input of each of the two norms
    (``4*d``); the QKV product, kept alive by its q/k/v views (``(h + 2*h_kv)*d_head``); q and k
    after QK-norm and RoPE (``(h + h_kv)*d_head``); the attention output (``h*d_head``, shared with
    the output projection); the gate-up product and the SwiGLU output (``3*d_ff``); plus fp32
    statistics (an rstd per norm row, the attention log-sum-exp per head). Not counted: the loss
    (the fused linear cross-entropy keeps no logits), the embedding, parameters, gradients,
    optimizer state and transient workspace. With ``activation_checkpointing`` the blocks keep only
    their two inputs (``2*d`` each) and one block at a time is recomputed with everything above.
    The torch reference backends keep more (fp32 intermediates): this is a lower bound for them.
    """
    d, hd, h, kv, f = cfg.hidden, cfg.d_head, cfg.heads, cfg.n_kv_heads, cfg.d_ff
    elements = 4 * d + (h + 2 * kv) * hd + (h + kv) * hd + h * hd + 3 * f
    rstd_rows = 2 + (h + kv if cfg.qk_norm else 0)  # fp32 rstd: two block norms and the per-head QK-norms
    per_block = elements * dtype_bytes + 4 * (rstd_rows + h)  # + the attention LSE, fp32 per head
    if not activation_checkpointing:
        return cfg.layers * per_block
    return cfg.layers * 2 * d * dtype_bytes + per_block
