"""relscale.ext.swiglu (torch.ops.relscale.swiglu / swiglu_backward) against float64 torch."""

import math

import pytest
import torch
import torch.nn.functional as F

from relscale import ext
from tests.csrc import DEVICES, DTYPES, assert_close_to_reference, require_extension


@pytest.fixture(autouse=True)
def _needs_extension():
    require_extension()


def randn(shape, dtype, device, gen, scale=3.0):
    # scale 3: gates well into both tails of the sigmoid
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1,)], ids=str)
def test_forward_and_backward_match_float64(device, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    gate = randn(shape, dtype, device, gen).requires_grad_()
    up = randn(shape, dtype, device, gen).requires_grad_()
    grad_out = randn(shape, dtype, device, gen, scale=1.0)

    out = ext.swiglu(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    gate64 = gate.detach().double().requires_grad_()
    up64 = up.detach().double().requires_grad_()
    expected = F.silu(gate64) * up64
    assert_close_to_reference(out, expected)

    out.backward(grad_out)
    expected.backward(grad_out.double())
    assert_close_to_reference(gate.grad, gate64.grad)
    assert_close_to_reference(up.grad, up64.grad)
    grad_gate, grad_up = ext.swiglu_backward(grad_out, gate.detach(), up.detach())
    torch.testing.assert_close(grad_gate, gate.grad, rtol=0, atol=0)
    torch.testing.assert_close(grad_up, up.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_derived_values(device):
    # silu(0) = 0 and silu'(0) = 1/2; silu(2) = 2 * sigmoid(2); sigmoid(2) = 1 / (1 + e^-2)
    sig2 = 1.0 / (1.0 + math.exp(-2.0))
    gate = torch.tensor([0.0, 2.0, -30.0], device=device)
    up = torch.tensor([5.0, 3.0, 7.0], device=device)
    grad_gate, grad_up = ext.swiglu_backward(torch.ones(3, device=device), gate, up)
    expected = {
        "out": [0.0, 6.0 * sig2, 0.0],
        "grad_gate": [5.0 * 0.5, 3.0 * sig2 * (1 + 2.0 * (1 - sig2)), 0.0],
        "grad_up": [0.0, 2.0 * sig2, 0.0],
    }
    actual = {"out": ext.swiglu(gate, up), "grad_gate": grad_gate, "grad_up": grad_up}
    for name, values in expected.items():
        torch.testing.assert_close(
            actual[name].cpu().double(), torch.tensor(values, dtype=torch.float64), rtol=1e-6, atol=1e-6,
            msg=name,
        )


@pytest.mark.parametrize("device", DEVICES)
def test_views_of_a_fused_projection_and_unaligned_storage(device):
    # gate/up as halves of one (N, 2H) projection (strided views) and as views starting one
    # element into their storage (not 16-byte aligned on the GPU: the scalar path)
    gen = torch.Generator().manual_seed(1)
    fused = randn((7, 2 * 123), torch.bfloat16, device, gen)
    gate, up = fused.chunk(2, dim=-1)
    assert_close_to_reference(ext.swiglu(gate, up), F.silu(gate.double()) * up.double())
    flat = randn((2 * 1001 + 1,), torch.float32, device, gen)
    gate, up = flat[1:1002], flat[1002:]
    assert gate.data_ptr() % 16 != 0
    assert_close_to_reference(ext.swiglu(gate, up), F.silu(gate.double()) * up.double())


@pytest.mark.parametrize(
    "device",
    [pytest.param("cuda", marks=DEVICES[1].marks)],
)
def test_grid_stride_loop_on_large_inputs(device):
    # more elements than one wave of the persistent grid (SMs x 8 blocks x 256 threads x 8)
    gen = torch.Generator().manual_seed(2)
    gate = randn((4096, 1031), torch.bfloat16, device, gen)
    up = randn((4096, 1031), torch.bfloat16, device, gen)
    assert_close_to_reference(ext.swiglu(gate, up), F.silu(gate.double()) * up.double())
    grad_out = randn((4096, 1031), torch.bfloat16, device, gen, scale=1.0)
    grad_gate, grad_up = ext.swiglu_backward(grad_out, gate, up)
    g, u, d = gate.double(), up.double(), grad_out.double()
    s = torch.sigmoid(g)
    assert_close_to_reference(grad_gate, d * u * s * (1 + g * (1 - s)))
    assert_close_to_reference(grad_up, d * g * s)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(RuntimeError, match=r"up has shape \[3\] but gate has shape \[4\]"):
        ext.swiglu(torch.randn(4), torch.randn(3))
    with pytest.raises(RuntimeError, match="up is Half but gate is Float"):
        ext.swiglu(torch.randn(4), torch.randn(4).half())
    with pytest.raises(RuntimeError, match="dtype Double"):
        ext.swiglu(torch.randn(4).double(), torch.randn(4).double())
    with pytest.raises(RuntimeError, match=r"grad_out has shape \[5\]"):
        ext.swiglu_backward(torch.randn(5), torch.randn(4), torch.randn(4))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(3)
    gate = randn((3, 37), torch.float32, device, gen)
    up = randn((3, 37), torch.float32, device, gen)
    torch.library.opcheck(torch.ops.relscale.swiglu.default, (gate.clone().requires_grad_(), up.clone()))
    torch.library.opcheck(torch.ops.relscale.swiglu.default, (gate.bfloat16(), up.bfloat16()))
    torch.library.opcheck(torch.ops.relscale.swiglu_backward.default, (torch.ones_like(gate), gate, up))


@pytest.mark.parametrize("device", DEVICES)
def test_every_argument_may_be_a_strided_or_expanded_view(device):
    # gate = buf[::2], up expanded from one row (stride 0 along rows), grad_out transposed
    gen = torch.Generator().manual_seed(4)
    gate = randn((6, 2 * 10), torch.float32, device, gen)[:, ::2]
    up = randn((1, 10), torch.float32, device, gen).expand(6, 10)
    grad_out = randn((10, 6), torch.float32, device, gen, scale=1.0).t()
    g, u, d = gate.double(), up.double(), grad_out.double()
    assert_close_to_reference(ext.swiglu(gate, up), F.silu(g) * u)
    grad_gate, grad_up = ext.swiglu_backward(grad_out, gate, up)
    s = torch.sigmoid(g)
    assert_close_to_reference(grad_gate, d * u * s * (1 + g * (1 - s)))
    assert_close_to_reference(grad_up, d * g * s)


def test_autocast_passes_the_extension_ops_through_in_their_input_dtype():
    # the extension's ops have no autocast kernel: they run in the dtype they are given (the
    # model feeds them the outputs of autocast Linears, already bf16); fp32 math inside either way
    from relscale import ops

    gen = torch.Generator().manual_seed(5)
    gate, up = randn((4, 8), torch.float32, "cpu", gen), randn((4, 8), torch.float32, "cpu", gen)
    q, k = randn((4, 2, 8), torch.float32, "cpu", gen), randn((4, 1, 8), torch.float32, "cpu", gen)
    table = ops.rope_inv_freq(8, 10000.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ext.swiglu(gate, up)
        q_out, _ = ext.rope(q, k, torch.arange(4), table)
    assert out.dtype == torch.float32 and q_out.dtype == torch.float32
    assert_close_to_reference(out, F.silu(gate.double()) * up.double())
