"""Torch reference ops of relscale.ops against independent float64 computations, and dispatch."""

import math

import pytest
import torch

from relscale import ops
from relscale.errors import ConfigError


def test_rope_reference_is_a_complex_rotation():
    # Independent derivation: pairs (x_i, x_{i+D/2}) rotate as complex numbers by pos * theta^(-2i/D).
    torch.manual_seed(0)
    b, s, h, d, theta = 2, 9, 3, 10, 500.0
    q, k = torch.randn(b, s, h, d, dtype=torch.float64), torch.randn(b, s, 1, d, dtype=torch.float64)
    pos = torch.randint(0, 50, (b, s))
    q_out, k_out = ops.rope_reference(q.float(), k.float(), pos, ops.rope_inv_freq(d, theta))
    for x, out in ((q, q_out), (k, k_out)):
        half = d // 2
        z = torch.complex(x[..., :half], x[..., half:])
        freq = torch.tensor([theta ** (-2 * i / d) for i in range(half)], dtype=torch.float64)
        angle = pos[..., None, None].double() * freq
        rotated = z * torch.polar(torch.ones_like(angle), angle)
        expected = torch.cat((rotated.real, rotated.imag), dim=-1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_reference_matches_explicit_softmax_with_documents_and_gqa():
    torch.manual_seed(1)
    b, s, h, kv, d = 2, 11, 4, 2, 8
    q = torch.randn(b, s, h, d, dtype=torch.float64)
    k, v = torch.randn(b, s, kv, d, dtype=torch.float64), torch.randn(b, s, kv, d, dtype=torch.float64)
    cu = torch.tensor([0, 4, 11, 13, 22], dtype=torch.int32)  # docs [0,4) [4,11) | [11,13) [13,22)
    out = ops.attention_reference(q, k, v, cu)
    doc = torch.tensor([0] * 4 + [1] * 7 + [2] * 2 + [3] * 9).view(b, s)
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, :, hi] @ k[bi, :, hi // 2].T / math.sqrt(d)
            allowed = (doc[bi][:, None] == doc[bi][None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
            weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            torch.testing.assert_close(out[bi, :, hi], weights @ v[bi, :, hi // 2])


def test_cross_entropy_reference_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0], [1.0, 0.0]])
    targets = torch.tensor([1, 0, -100])
    losses = ops.cross_entropy_reference(logits, targets, reduction="none")
    torch.testing.assert_close(losses, torch.tensor([math.log(4 / 3), math.log(2.0), 0.0]))
    mean = ops.cross_entropy_reference(logits, targets)
    torch.testing.assert_close(mean, (math.log(4 / 3) + math.log(2.0)) / 2 * torch.ones(()))
    all_ignored = ops.cross_entropy_reference(logits, torch.full((3,), -100))
    assert all_ignored.item() == 0.0
    z = ops.cross_entropy_reference(logits[:1], targets[:1], reduction="sum", z_loss=0.1)
    torch.testing.assert_close(z, torch.tensor(math.log(4 / 3) + 0.1 * math.log(4.0) ** 2))


def test_linear_cross_entropy_reference_equals_unfused():
    torch.manual_seed(2)
    h, w, t = torch.randn(5, 7), torch.randn(13, 7), torch.randint(0, 13, (5,))
    fused = ops.linear_cross_entropy(h, w, t, backend="torch", reduction="none")
    torch.testing.assert_close(fused, torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none"))


def test_rms_norm_and_swiglu_references():
    x, w = torch.randn(3, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, backend="torch"), expected)
    g, u = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.swiglu(g, u, backend="torch"), g / (1 + torch.exp(-g)) * u)


def test_dispatch_rejects_unsupported_backends_naming_the_key():
    with pytest.raises(ConfigError, match="model.kernels.rms_norm: backend 'cuda'"):
        ops.resolve("rms_norm", "cuda", "cpu")
    with pytest.raises(ConfigError, match="model.kernels.rope: backend 'triton'"):
        ops.resolve("rope", "triton", "cpu")
    assert ops.resolve("attention", "auto", "cpu") == "torch"
    assert ops.resolve("attention", "auto", "cuda") == "triton"
