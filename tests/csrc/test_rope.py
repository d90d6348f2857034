"""relscale.ext.rope (torch.ops.relscale.rope / rope_) against a float64 rotate-half reference."""

import pytest
import torch

from relscale import ext, ops
from tests.csrc import DEVICES, DTYPES, assert_close_to_reference, require_extension

THETA = 10000.0


@pytest.fixture(autouse=True)
def _needs_extension():
    require_extension()


def rope_reference64(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False):
    """Hugging Face rotate-half RoPE of x (T, H, D), all in float64 (COMMON.md convention)."""
    x = x.double()
    head_dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=x.device) / head_dim)
    angles = positions.double()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # (T, 1, D), broadcast over heads
    sin = -angles.sin() if inverse else angles.sin()
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * angles.cos() + rotated * sin


def freqs(x: torch.Tensor, theta: float = THETA) -> torch.Tensor:
    """The op's frequency table for x's head_dim, from the one Python definition (ops.rope_inv_freq);
    rope_reference64 forms its own, so the comparison is independent of it."""
    return ops.rope_inv_freq(x.shape[-1], theta, device=x.device)


def packed_positions(tokens: int, device: str) -> torch.Tensor:
    """Two packed documents: positions restart at 0 inside the sequence."""
    first = tokens // 2 + 3
    return torch.cat((torch.arange(first), torch.arange(tokens - first))).to(device)


def make_qk(tokens, q_heads, k_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(tokens, k_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [6, 126, 256])
def test_forward_and_backward_match_float64(device, dtype, head_dim):
    q, k = make_qk(37, 3, 1, head_dim, dtype, device)
    positions = packed_positions(37, device)
    q.requires_grad_()
    k.requires_grad_()
    q_out, k_out = ext.rope(q, k, positions, freqs(q))
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert_close_to_reference(q_out, rope_reference64(q.detach(), positions, THETA))
    assert_close_to_reference(k_out, rope_reference64(k.detach(), positions, THETA))

    gen = torch.Generator().manual_seed(1)
    grad_q = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    grad_k = torch.randn(k.shape, generator=gen).to(device=device, dtype=dtype)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    # d/dx of (rotation R x) is R^T = rotation by the negative angle
    assert_close_to_reference(q.grad, rope_reference64(grad_q, positions, THETA, inverse=True))
    assert_close_to_reference(k.grad, rope_reference64(grad_k, positions, THETA, inverse=True))
    explicit_q, explicit_k = ext.rope_backward(grad_q, grad_k, positions, freqs(q))
    torch.testing.assert_close(explicit_q, q.grad, rtol=0, atol=0)
    torch.testing.assert_close(explicit_k, k.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_layout_large_positions_and_other_theta(device):
    # (B, S, H, D) input, per-token positions of any shape, positions far beyond 2^12 where a
    # plain fp32 angle would be off by ~1e-3 rad
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 19, 4, 128, generator=gen).to(device)
    k = torch.randn(2, 19, 2, 128, generator=gen).to(device)
    positions = torch.randint(0, 200_000, (2, 19), generator=gen).to(device)
    q_out, k_out = ext.rope(q, k, positions, freqs(q, 500000.0))
    flat = positions.reshape(-1)
    expected_q = rope_reference64(q.reshape(38, 4, 128), flat, 500000.0).view(q.shape)
    expected_k = rope_reference64(k.reshape(38, 2, 128), flat, 500000.0).view(k.shape)
    torch.testing.assert_close(q_out.double(), expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.double(), expected_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_ops_reference_used_by_the_model(device):
    from relscale import ops

    q, k = make_qk(2 * 11, 4, 2, 64, torch.bfloat16, device, seed=3)
    positions = packed_positions(22, device).view(2, 11)
    table = freqs(q)
    expected_q, expected_k = ops.rope_reference(q.view(2, 11, 4, 64), k.view(2, 11, 2, 64), positions, table)
    q_out, k_out = ext.rope(q, k, positions.reshape(-1), freqs(q))
    # both round an fp32 result to bf16 once: at most one bf16 ulp apart
    torch.testing.assert_close(q_out.view(2, 11, 4, 64), expected_q, rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(k_out.view(2, 11, 2, 64), expected_k, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place(device, dtype):
    q, k = make_qk(37, 5, 3, 126, dtype, device, seed=4)
    positions = packed_positions(37, device)
    expected_q, expected_k = ext.rope(q, k, positions, freqs(q))
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    q_out, k_out = ext.rope(q, k, positions, freqs(q), inplace=True)
    assert q_out is q and k_out is k and q.data_ptr() == q_ptr and k.data_ptr() == k_ptr
    torch.testing.assert_close(q, expected_q, rtol=0, atol=0)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_undoes_forward_and_non_contiguous_inputs(device):
    base_q, base_k = make_qk(4 * 128, 9, 4, 32, torch.float32, device, seed=5)
    q = base_q.view(4, 128, 9, 32).transpose(0, 1)  # non-contiguous (S, B, H, D) view
    k = base_k.view(4, 128, 4, 32).transpose(0, 1)
    positions = torch.arange(128, device=device)[:, None].expand(128, 4)
    q_out, k_out = ext.rope(q, k, positions, freqs(q))
    expected_q = rope_reference64(q.reshape(-1, 9, 32), positions.reshape(-1), THETA).view(q.shape)
    assert_close_to_reference(q_out, expected_q)
    q_back, k_back = torch.ops.relscale.rope(q_out, k_out, positions, freqs(q), True)
    torch.testing.assert_close(q_back, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_back, k, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q, k = make_qk(5, 2, 1, 8, torch.float32, "cpu")
    pos = torch.arange(5)
    f8 = freqs(q)
    with pytest.raises(RuntimeError, match="positions has 4 entries but q and k have 5 tokens"):
        ext.rope(q, k, pos[:4], f8)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        ext.rope(q, k, pos.int(), f8)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        ext.rope(q[..., :7].contiguous(), k[..., :7].contiguous(), pos, f8)
    with pytest.raises(RuntimeError, match="at most 256"):
        ext.rope(torch.randn(5, 1, 258), torch.randn(5, 1, 258), pos, f8)
    with pytest.raises(RuntimeError, match="q is Float but k is Half"):
        ext.rope(q, k.half(), pos, f8)
    with pytest.raises(RuntimeError, match="dtype Double"):
        ext.rope(q.double(), k.double(), pos, f8)
    with pytest.raises(RuntimeError, match="share their leading"):
        ext.rope(q, torch.randn(6, 1, 8), pos, f8)
    with pytest.raises(RuntimeError, match="needs contiguous"):
        ext.rope(torch.randn(5, 8, 2).transpose(1, 2), k, pos, f8, inplace=True)
    with pytest.raises(RuntimeError, match="no autograd"):
        ext.rope(q.requires_grad_(), k, pos, f8, inplace=True)
    # the frequency table: one entry per rotated pair, float64 at the op (the wrapper converts)
    with pytest.raises(RuntimeError, match=r"inv_freq must have shape \[4\] \(head_dim / 2\), got \[3\]"):
        ext.rope(q.detach(), k, pos, f8[:3])
    with pytest.raises(RuntimeError, match="inv_freq must be float64"):
        torch.ops.relscale.rope(q.detach(), k, pos, f8.float())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k = make_qk(7, 3, 1, 16, torch.float32, device, seed=6)
    positions = packed_positions(7, device)
    torch.library.opcheck(
        torch.ops.relscale.rope.default,
        (q.clone().requires_grad_(), k.clone().requires_grad_(), positions, freqs(q), False),
    )
    rope = torch.ops.relscale.rope.default
    torch.library.opcheck(rope, (q.bfloat16(), k.bfloat16(), positions, freqs(q), True))
    rope_inplace = torch.ops.relscale.rope_.default
    torch.library.opcheck(rope_inplace, (q.clone(), k.clone(), positions, freqs(q), False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_with_rope_and_swiglu(device):
    # Inductor compiles this on the CPU too, but a cold compile took ~29 s on the 2-core box and
    # would eat most of this room's test budget; aot_eager runs the same Dynamo trace (fake
    # kernels) and AOTAutograd (registered backward) and only skips Inductor's code generation,
    # which treats the custom ops as opaque calls. On CUDA, where it matters, Inductor is used.
    backend = "inductor" if device == "cuda" else "aot_eager"

    def block(q, k, positions, gate, up):
        q_out, k_out = ext.rope(q, k, positions, freqs(q))
        return (q_out * 2).sum() + k_out.pow(2).sum() + ext.swiglu(gate, up).sum()

    def rotate_inplace(q, k, positions):
        return ext.rope(q, k, positions, freqs(q), inplace=True)

    gen = torch.Generator().manual_seed(7)
    q, k = make_qk(9, 3, 1, 8, torch.float32, device, seed=7)
    gate = torch.randn(9, 21, generator=gen).to(device).requires_grad_()
    up = torch.randn(9, 21, generator=gen).to(device).requires_grad_()
    positions = packed_positions(9, device)
    q.requires_grad_()
    k.requires_grad_()
    inputs = (q, k, gate, up)

    compiled = torch.compile(block, backend=backend, fullgraph=True)
    loss = compiled(q, k, positions, gate, up)
    grads = torch.autograd.grad(loss, inputs)
    eager_loss = block(q, k, positions, gate, up)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        q_c, k_c = q.detach().clone(), k.detach().clone()
        torch.compile(rotate_inplace, backend=backend, fullgraph=True)(q_c, k_c, positions)
        expected_q, expected_k = ext.rope(q.detach(), k.detach(), positions, freqs(q))
    torch.testing.assert_close(q_c, expected_q, rtol=0, atol=0)
    torch.testing.assert_close(k_c, expected_k, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_expanded_positions_and_frequency_tables_are_not_misread(device):
    # every tensor argument as a non-contiguous view: positions = buf[::2], inv_freq = buf[::2]
    # with other values in between, and a stride-0 table expanded from one element
    q, k = make_qk(11, 2, 1, 16, torch.float32, device, seed=8)
    positions_buf = torch.arange(22, device=device) * 37
    positions = positions_buf[::2]
    table_buf = torch.full((16,), 1e3, dtype=torch.float64, device=device)
    table_buf[::2] = freqs(q)
    expected_q = rope_reference64(q, positions.contiguous(), THETA)
    q_out, _ = ext.rope(q, k, positions, table_buf[::2])
    assert_close_to_reference(q_out, expected_q)
    one = torch.tensor([0.25], dtype=torch.float64, device=device).expand(8)
    q_out, k_out = ext.rope(q, k, positions, one)
    angle = positions.double()[:, None, None] * 0.25
    rotated = torch.cat((-q.double()[..., 8:], q.double()[..., :8]), dim=-1)
    assert_close_to_reference(q_out, q.double() * angle.cos() + rotated * angle.sin())
