"""RMSNorm kernels (plain and fused with the residual add) against a float64 torch reference."""

import pytest
import torch
from relscale.kernels.rmsnorm import RMSNorm, RMSNormFunction, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter

EPS = 1e-6
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative to the output scale


def reference(x, weight, eps=EPS, residual=None):
    """float64 RMSNorm; with a residual the sum is rounded to x's dtype first, as it is stored."""
    h = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    hd = h.double()
    y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y, h


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _run(x, weight, residual, dy, dh):
    """Outputs and gradients of our op, with non-uniform upstream gradients dy (and dh)."""
    x, weight = _leaves(x, weight)
    residual = _leaves(residual)[0] if residual is not None else None
    out = rms_norm(x, weight, EPS, residual)
    if residual is None:
        y, h = out, None
        y.backward(dy)
    else:
        y, h = out
        torch.autograd.backward((y, h), (dy, dh))
    return y, h, x.grad, weight.grad, residual.grad if residual is not None else None


def _reference_grads(x, weight, residual, dy, dh):
    xd, wd = _leaves(x.double(), weight.double())
    rd = _leaves(residual.double())[0] if residual is not None else None
    hd = xd if rd is None else xd + rd
    y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS) * wd
    loss = (y * dy.double()).sum() + ((hd * dh.double()).sum() if rd is not None else 0)
    loss.backward()
    return xd.grad, wd.grad, rd.grad if rd is not None else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(3, 7, 123), (5, 1)], ids=["odd_3d", "hidden_1"])
def test_matches_float64_reference(dtype, with_residual, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    residual = torch.randn(shape, generator=gen).to(DEVICE, dtype) if with_residual else None
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    dh = torch.randn(shape, generator=gen).to(DEVICE, dtype) if with_residual else None

    y, h, dx, dw, dres = _run(x, weight, residual, dy, dh)
    y_ref, h_ref = reference(x, weight, residual=residual)
    assert y.dtype == dtype and y.shape == x.shape
    tol = TOLERANCE[dtype]
    assert _max_err(y, y_ref) <= tol * y_ref.abs().max().item()
    if with_residual:  # the stored sum is x + residual rounded once to dtype
        if dtype == torch.bfloat16:
            # Triton's interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest): 1 ulp.
            assert _max_err(h, h_ref) <= (h_ref.double().abs() * 2.0**-7).max().item()
        else:
            assert torch.equal(h, h_ref)

    # Gradients: the float64 reference differentiates through the stored (rounded) sum.
    dx_ref, dw_ref, dres_ref = _reference_grads(h_ref if with_residual else x, weight, None, dy, None)
    if with_residual:
        dx_ref = dx_ref + dh.double()
        dres_ref = dx_ref
    assert dx.dtype == dtype and dw.dtype == dtype
    assert _max_err(dx, dx_ref) <= tol * dx_ref.abs().max().item() + 1e-6
    assert _max_err(dw, dw_ref) <= tol * dw_ref.abs().max().item() + 1e-6
    if with_residual:
        torch.testing.assert_close(dres, dx, rtol=0, atol=0)
        assert _max_err(dres, dres_ref) <= tol * dres_ref.abs().max().item() + 1e-6


def test_moderate_fp32_case_many_rows_per_program_and_partials():
    # 423 rows of 123: several row tiles per backward program, so the dweight partials are summed.
    gen = torch.Generator().manual_seed(7)
    x, dy = torch.randn(423, 123, generator=gen).to(DEVICE), torch.randn(423, 123, generator=gen).to(DEVICE)
    weight = torch.randn(123, generator=gen).to(DEVICE)
    y, _, dx, dw, _ = _run(x, weight, None, dy, None)
    dx_ref, dw_ref, _ = _reference_grads(x, weight, None, dy, None)
    torch.testing.assert_close(y.double(), reference(x, weight)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_error_within_twice_torch_own(dtype):
    # FlashAttention's criterion: our error vs float64 <= 2x the error of torch doing the same in dtype.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 200, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(200, generator=gen)).to(DEVICE, dtype)
    dy = torch.randn(64, 200, generator=gen).to(DEVICE, dtype)
    y, _, dx, dw, _ = _run(x, weight, None, dy, None)

    xl, wl = _leaves(x, weight)  # torch, all in the low precision dtype
    yl = xl * torch.rsqrt(xl.pow(2).mean(-1, keepdim=True) + EPS) * wl
    yl.backward(dy)
    y_ref = reference(x, weight)[0]
    dx_ref, dw_ref, _ = _reference_grads(x, weight, None, dy, None)
    for ours, torchs, exact in ((y, yl, y_ref), (dx, xl.grad, dx_ref), (dw, wl.grad, dw_ref)):
        assert _max_err(ours, exact) <= 2 * _max_err(torchs, exact) + 1e-3 * exact.abs().max().item()


def test_non_contiguous_input_and_module():
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(6, 40, generator=gen).to(DEVICE)
    x = wide[:, 3:35]  # row stride 40, unit column stride
    module = RMSNorm(32, eps=EPS, device=DEVICE)
    with torch.no_grad():
        module.weight.mul_(torch.linspace(0.5, 1.5, 32, device=DEVICE))
    y = module(x)
    torch.testing.assert_close(y.double(), reference(x, module.weight)[0], rtol=1e-5, atol=1e-5)
    x_t = torch.randn(32, 6, generator=gen).to(DEVICE).t()  # column stride 6: copied, same result
    torch.testing.assert_close(module(x_t).double(), reference(x_t, module.weight)[0], rtol=1e-5, atol=1e-5)


def test_autograd_function_apply_matches_functional():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(9, 17, generator=gen).to(DEVICE), torch.randn(17, generator=gen).to(DEVICE)
    y, h, rstd = RMSNormFunction.apply(x, w, None, EPS)
    assert h.numel() == 0 and rstd.shape == (9,)
    torch.testing.assert_close(rstd.double(), x.double().pow(2).mean(-1).add(EPS).rsqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(y, rms_norm(x, w, EPS), rtol=0, atol=0)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="last dim"):
        rms_norm(torch.randn(4, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.randn(4, 8), torch.ones(8), residual=torch.randn(4, 9))


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    x, r, w = (torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in ((5, 11), (5, 11), (11,)))
    torch.library.opcheck(torch.ops.relscale.rms_norm_fwd.default, (x, w, None, EPS))
    torch.library.opcheck(torch.ops.relscale.rms_norm_fwd.default, (x, w, r, EPS))
    rstd = (torch.rand(5, generator=gen) + 0.5).to(DEVICE)
    dy, dh = torch.randn(5, 11, generator=gen).to(DEVICE), torch.randn(5, 11, generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.relscale.rms_norm_bwd.default, (dy, dh, x.detach(), w.detach(), rstd))


def test_torch_compile_fullgraph():
    # aot_eager traces forward and backward through the custom ops exactly as inductor would; the
    # inductor backend itself is left out only because compiling C++ on this CPU takes ~20 s.
    def block(x, residual, weight):
        y, h = rms_norm(x * 2, weight, EPS, residual)
        return (y * h).sum()

    gen = torch.Generator().manual_seed(8)
    shapes = [(4, 6, 24), (4, 6, 24), (24,)]
    args = [torch.randn(shape, generator=gen).to(DEVICE).requires_grad_() for shape in shapes]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    out_eager = block(*args)
    grads_eager = torch.autograd.grad(out_eager, args)
    torch.testing.assert_close(out, out_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)
