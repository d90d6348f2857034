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


# ------------------------------------------------------------------- RoPE: llama3 scaling, backends
LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def llama31_inv_freq64(head_dim: int, theta: float) -> list[float]:
    """Llama 3.1's frequency rule written out from its definition, one scalar at a time:
    wavelength 2*pi/f below 8192/4 keeps f, above 8192/1 gives f/8, in between
    (1 - s) f/8 + s f with s = (8192 / wavelength - 1) / (4 - 1)."""
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-(2.0 * i) / head_dim)
        wavelength = 2.0 * math.pi / f
        if wavelength < 8192 / 4:
            out.append(f)
        elif wavelength > 8192 / 1:
            out.append(f / 8)
        else:
            s = (8192 / wavelength - 1) / (4 - 1)
            out.append((1 - s) * f / 8 + s * f)
    return out


def rope64(x: torch.Tensor, positions: torch.Tensor, freq: list[float]) -> torch.Tensor:
    """Rotate-half RoPE of x (B, S, H, D) in float64 as a complex rotation (differentiable)."""
    half = x.shape[-1] // 2
    angle = positions.double()[..., None, None] * torch.tensor(freq, dtype=torch.float64, device=x.device)
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def _rope_backends() -> list:
    from tests.csrc import DEVICES

    return [
        pytest.param("torch", "cpu", id="torch-cpu"),
        pytest.param("cuda", "cpu", id="extension-cpu"),  # the C++ CPU path of relscale._C
        pytest.param("cuda", "cuda", id="extension-cuda", marks=DEVICES[1].marks),
        pytest.param("torch", "cuda", id="torch-cuda", marks=DEVICES[1].marks),
    ]


def test_llama31_rule_has_all_three_regimes_and_rope_inv_freq_matches_it():
    from relscale.config import RopeScalingConfig

    d, theta = 128, 500000.0
    expected = llama31_inv_freq64(d, theta)
    plain = [theta ** (-(2.0 * i) / d) for i in range(d // 2)]
    ratios = [p / e for p, e in zip(plain, expected)]
    # the test shapes exercise kept (ratio 1), divided (ratio 8) and interpolated frequencies
    assert ratios[0] == 1 and ratios[-1] == pytest.approx(8) and any(1.01 < r < 7.99 for r in ratios)
    table = ops.rope_inv_freq(d, theta, RopeScalingConfig(type="llama3", **LLAMA31))
    assert table.dtype == torch.float64 and table.shape == (d // 2,)
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend,device", _rope_backends())
def test_every_rope_backend_matches_float64_llama31_forward_and_backward(backend, device):
    from relscale.config import RopeScalingConfig
    from tests.csrc import require_extension

    if backend == "cuda":
        require_extension()
    d, theta = 128, 500000.0
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 24, 4, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 24, 2, d, generator=gen, dtype=torch.float64)
    # long positions (up to 4x the original 8192 context) where the scaled frequencies matter
    positions = torch.randint(0, 32768, (2, 24), generator=gen)
    freq = llama31_inv_freq64(d, theta)
    q64, k64 = q.clone().requires_grad_(), k.clone().requires_grad_()
    expected_q, expected_k = rope64(q64, positions, freq), rope64(k64, positions, freq)
    grad_q, grad_k = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    torch.autograd.backward((expected_q, expected_k), (grad_q.double(), grad_k.double()))
    unscaled = rope64(q, positions, [theta ** (-(2.0 * i) / d) for i in range(d // 2)])
    assert (unscaled - expected_q).abs().max() > 0.5  # scaling changes the result visibly

    table = ops.rope_inv_freq(d, theta, RopeScalingConfig(type="llama3", **LLAMA31), device=device)
    qf = q.float().to(device).requires_grad_()
    kf = k.float().to(device).requires_grad_()
    q_out, k_out = ops.apply_rope(qf, kf, positions.to(device), table, backend=backend)
    torch.autograd.backward((q_out, k_out), (grad_q.to(device), grad_k.to(device)))
    # fp32 inputs exact; fp32 cos/sin of accurately formed angles: ~1e-6 relative
    pairs = ((q_out, expected_q), (k_out, expected_k), (qf.grad, q64.grad), (kf.grad, k64.grad))
    for actual, expected in pairs:
        torch.testing.assert_close(actual.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", _rope_backends())
def test_rope_backends_accept_the_same_position_shapes(backend, device):
    from tests.csrc import require_extension

    if backend == "cuda":
        require_extension()
    gen = torch.Generator().manual_seed(4)
    b, s, d = 3, 7, 16
    q = torch.randn(b, s, 2, d, generator=gen).to(device)
    k = torch.randn(b, s, 1, d, generator=gen).to(device)
    table = ops.rope_inv_freq(d, 10000.0, device=device)
    row = (torch.arange(s) + 5).to(device)
    expected_q = rope64(q.double(), row.expand(b, s), [10000.0 ** (-(2.0 * i) / d) for i in range(d // 2)])
    for positions in (row, row[None], row.expand(b, s).clone(), row.expand(b, s)):
        q_out, _ = ops.apply_rope(q, k, positions, table, backend=backend)
        torch.testing.assert_close(q_out.double(), expected_q, rtol=1e-5, atol=1e-5)
    message = r"rope: positions must have shape \(7,\), \(1, 7\) or \(3, 7\) .* got \(2, 7\)"
    with pytest.raises(ValueError, match=message):
        ops.apply_rope(q, k, row.expand(2, s), table, backend=backend)


def test_auto_rope_uses_the_extension_on_cpu_when_built():
    from relscale import ext

    assert ops.resolve("rope", "auto", "cpu") == ("cuda" if ext.available() else "torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cu_seqlens_must_keep_documents_inside_rows_in_both_backends(backend):
    # A document crossing a row boundary used to be masked per row by the torch reference and
    # attended across rows by the Triton kernel: both now refuse it with the same message.
    torch.manual_seed(7)
    b, s, h, d = 2, 6, 2, 8
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    with pytest.raises(ValueError, match="contain every row start"):
        ops.attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9, 12], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="rise from 0 to the token count 12"):
        ops.attention(q, k, v, cu_seqlens=torch.tensor([0, 6, 9], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="1-D int32/int64"):
        ops.attention(q, k, v, cu_seqlens=torch.tensor([0.0, 6.0, 12.0]), backend=backend)


def test_cu_seqlens_int64_and_int32_give_the_same_attention_in_both_backends():
    torch.manual_seed(8)
    b, s, h, d = 2, 6, 2, 8
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    cu = [0, 4, 6, 9, 12]
    outs = [
        ops.attention(q, k, v, cu_seqlens=torch.tensor(cu, dtype=dtype), backend=backend)
        for backend in ("torch", "triton") for dtype in (torch.int32, torch.int64)
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_torch_cross_entropy_takes_int32_labels_and_names_a_bad_one():
    torch.manual_seed(9)
    logits, targets = torch.randn(5, 7, dtype=torch.float64), torch.tensor([1, 6, 0, -100, 3])
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    got = ops.cross_entropy(logits, targets.int(), backend="torch")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="target 7 at row 1 is outside"):
        ops.cross_entropy(logits, torch.tensor([1, 7, 0, -100, 3]), backend="torch")
