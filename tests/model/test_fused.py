"""The model's fused layout (one QKV matmul, one gate-up matmul, residual add fused into the next
norm) equals a plain unfused decoder written here from the equations, in fp32 with the same
weights; activation checkpointing changes neither the loss nor any gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from relscale.config import KernelConfig, ModelConfig
from relscale.model import Transformer

V, S = 61, 16
TORCH = KernelConfig(*(["torch"] * 5))


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden=32, layers=3, heads=4, kv_heads=2, max_seq_len=64, init_std=0.1,
               kernels=TORCH)
    return Transformer(ModelConfig(**{**cfg, **overrides}))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE (Su et al. 2021) on (B, S, H, D), plain frequencies theta^(-2i/D)."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv_freq  # (B, S, D/2)
    cos, sin = angles.cos().float()[:, :, None], angles.sin().float()[:, :, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _reference_loss(params: dict[str, torch.Tensor], cfg: ModelConfig, tokens, targets, positions, segments):
    """Cross-entropy of an unfused pre-norm decoder: separate q/k/v and gate/up products, explicit
    softmax attention with a causal and same-document mask, plain residual adds."""
    batch, seq = tokens.shape
    h, kv, hd = cfg.heads, cfg.n_kv_heads, cfg.d_head
    x = params["embed.weight"][tokens]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & (segments[:, :, None] == segments[:, None, :])
    for layer in range(cfg.layers):
        def p(name: str, layer: int = layer) -> torch.Tensor:
            return params[f"blocks.{layer}.{name}"]

        a = _rms(x, p("attn_norm.weight"), cfg.norm_eps)
        q = (a @ p("attn.wq.weight").T).view(batch, seq, h, hd)
        k = (a @ p("attn.wk.weight").T).view(batch, seq, kv, hd)
        v = (a @ p("attn.wv.weight").T).view(batch, seq, kv, hd)
        q, k = _rms(q, p("attn.q_norm.weight"), cfg.norm_eps), _rms(k, p("attn.k_norm.weight"), cfg.norm_eps)
        q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        k, v = k.repeat_interleave(h // kv, dim=2), v.repeat_interleave(h // kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seq, h * hd)
        x = x + attn @ p("attn.wo.weight").T
        m = _rms(x, p("mlp_norm.weight"), cfg.norm_eps)
        gate, up = m @ p("mlp.w_gate.weight").T, m @ p("mlp.w_up.weight").T
        x = x + (F.silu(gate) * up) @ p("mlp.w_down.weight").T
    logits = _rms(x, params["norm.weight"], cfg.norm_eps) @ params["output.weight"].T
    return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))


def _packed_batch():
    gen = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, V, (2, S), generator=gen), torch.randint(0, V, (2, S), generator=gen)
    # Documents of 5 and 11 tokens in row 0, 4 and 12 in row 1.
    lengths = [5, 11, 4, 12]
    cu_seqlens = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(2, S)
    segments = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths)).view(2, S)
    return tokens, targets, positions, cu_seqlens, segments


def test_fused_model_equals_an_unfused_fp32_reference_loss_and_gradients():
    model = _model()
    tokens, targets, positions, cu_seqlens, segments = _packed_batch()
    loss = model(tokens, targets, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=12)
    loss.backward()

    params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    reference = _reference_loss(params, model.cfg, tokens, targets, positions, segments)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    # The reference can tell a wrong model: one swapped weight changes the loss visibly.
    params["blocks.1.attn.wk.weight"] = params["blocks.1.attn.wk.weight"].flip(0)
    swapped = _reference_loss(params, model.cfg, tokens, targets, positions, segments)
    assert (swapped - loss).abs() > 1e-4


def test_state_dict_keys_are_the_separate_projection_matrices():
    # DCP, FSDP2, model_io and HF import/export rely on these names (the fusion is compute-only).
    model = _model(layers=1)
    keys = set(model.state_dict())
    for name in ("wq", "wk", "wv", "wo"):
        assert f"blocks.0.attn.{name}.weight" in keys
    for name in ("w_gate", "w_up", "w_down"):
        assert f"blocks.0.mlp.{name}.weight" in keys
    assert keys == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("doc_masking", [False, True])
def test_activation_checkpointing_gives_identical_loss_and_gradients(doc_masking):
    tokens, targets, positions, cu_seqlens, _ = _packed_batch()
    kwargs = dict(positions=positions, cu_seqlens=cu_seqlens, max_seqlen=12) if doc_masking else {}
    results = []
    for checkpointing in (False, True):
        model = _model()
        model.activation_checkpointing = checkpointing
        loss = model(tokens, targets, **kwargs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_plain, loss_ckpt)
    for name, grad in grads_plain.items():
        assert torch.equal(grad, grads_ckpt[name]), name


def test_activation_checkpointing_recomputes_the_blocks_in_the_backward():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.mm.default
            return func(*args, **(kwargs or {}))

    tokens, targets, *_ = _packed_batch()
    counts = []
    for checkpointing in (False, True):
        model = _model(layers=2)
        model.activation_checkpointing = checkpointing
        loss = model(tokens, targets)
        with CountMatmuls() as counter:
            loss.backward()
        counts.append(counter.count)
    # Backward: 2 products per forward product (4 per block + the head) = 18. Recomputing a block
    # re-runs its products up to the last one whose inputs the backward needs: QKV, wo, gate-up (the
    # non-reentrant checkpoint stops early, before w_down, whose output nothing saved depends on).
    assert counts == [18, 18 + 2 * 3]


def test_constructor_argument_sets_checkpointing():
    cfg = ModelConfig(vocab_size=V, hidden=32, layers=1, heads=4)
    assert Transformer(cfg, activation_checkpointing=True).activation_checkpointing
    assert not Transformer(cfg).activation_checkpointing
