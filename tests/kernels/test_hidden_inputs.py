"""Inputs that look harmless but used to give silent wrong numbers (issue 14, section 1): strided
views of every tensor argument, out-of-range labels, fp32 cross-entropy at logits near +-1e4, and
the all-ignored ``mean``. Each kernel result is checked against float64 torch."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from relscale.kernels import flash_attention as fa
from relscale.kernels.cross_entropy import cross_entropy
from relscale.kernels.fused_linear_ce import linear_cross_entropy
from relscale.kernels.rmsnorm import rms_norm

from relscale import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
IGNORE = -100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- RMSNorm
def _rms64(x, w, eps=1e-6):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("weight_kind", ["strided", "expanded"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_weight_views_are_read_correctly(weight_kind, with_residual):
    gen = _gen(0)
    x = torch.randn(5, 24, generator=gen).to(DEVICE)
    residual = torch.randn(5, 24, generator=gen).to(DEVICE)
    if weight_kind == "strided":  # buf[::2]: every other element belongs to something else
        buf = torch.randn(48, generator=gen).to(DEVICE)
        weight = buf[::2].requires_grad_(False)
    else:  # one element expanded to H (stride 0): a kernel reading W + col would run past it
        weight = torch.full((1,), 1.7, device=DEVICE).expand(24)
    x_in = x.clone().requires_grad_()
    out = rms_norm(x_in, weight, 1e-6, residual if with_residual else None)
    h = x + residual if with_residual else x
    y = out[0] if with_residual else out
    torch.testing.assert_close(y.double(), _rms64(h, weight), rtol=1e-5, atol=1e-6)
    # backward reads the weight too
    y.backward(torch.ones_like(y))
    h64 = h.double().requires_grad_()
    _rms64(h64, weight).sum().backward()
    torch.testing.assert_close(x_in.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)


def test_rms_norm_strided_weight_gets_its_gradient():
    gen = _gen(1)
    x = torch.randn(6, 16, generator=gen).to(DEVICE)
    leaf = torch.randn(32, generator=gen).to(DEVICE).requires_grad_()
    rms_norm(x, leaf[::2], 1e-6).pow(2).sum().backward()
    leaf64 = leaf.detach().double().requires_grad_()
    _rms64(x, leaf64[::2]).pow(2).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-6)
    assert (leaf.grad[1::2] == 0).all()


def test_rms_norm_strided_x_residual_and_grad():
    gen = _gen(2)
    base = torch.randn(16, 6, generator=gen).to(DEVICE)
    x = base.t()  # (6, 16) with column stride 6: copied at the boundary
    residual = torch.randn(12, 16, generator=gen).to(DEVICE)[::2]  # row stride 32
    weight = torch.randn(16, generator=gen).to(DEVICE)
    x_in = x.clone().requires_grad_()
    y, h = rms_norm(x_in, weight, 1e-6, residual)
    grad = torch.randn(6, 32, generator=gen).to(DEVICE)[:, ::2]  # non-contiguous upstream gradient
    y.backward(grad)
    h64 = (x.double() + residual.double()).requires_grad_()
    y64 = _rms64(h64, weight)
    y64.backward(grad.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), h64.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_in.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- cross-entropy, FLCE
def _ce64(logits, targets, reduction="mean"):
    return F.cross_entropy(logits.double(), targets, ignore_index=IGNORE, reduction=reduction)


def test_cross_entropy_strided_targets_and_logits():
    gen = _gen(3)
    logits = torch.randn(7, 40, generator=gen).to(DEVICE)[:, ::2]  # column stride 2
    t_buf = torch.randint(0, 20, (14,), generator=gen).to(DEVICE)
    t_buf[1::2] = 999  # what a contiguous read of t[::2] would pick up for rows >= 4: out of range
    targets = t_buf[::2]
    targets[3] = IGNORE
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward()
    x64 = logits.double().requires_grad_()
    ref = _ce64(x64, targets)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    none = cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(none.double(), _ce64(logits, targets, "none"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_strided_targets_hidden_and_weight(reduction):
    gen = _gen(4)
    hidden = torch.randn(9, 2 * 8, generator=gen).to(DEVICE)[:, ::2]  # (9, 8), column stride 2
    weight = torch.randn(8, 30, generator=gen).to(DEVICE).t()  # (30, 8), transposed view
    t_buf = torch.randint(0, 30, (18,), generator=gen).to(DEVICE)
    t_buf[1::2] = 12345
    targets = t_buf[::2]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, reduction=reduction, chunk_size=4)
    grad_out = torch.rand(loss.shape, generator=gen).to(DEVICE) + 0.5
    loss.backward(grad_out)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = _ce64(h64 @ w64.t(), targets, reduction)
    ref.backward(grad_out.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [30, 31000, -1, -7])
def test_out_of_range_labels_are_errors_on_the_cpu_path(bad):
    if DEVICE != "cpu":
        pytest.skip("the CUDA path checks asynchronously; see test_out_of_range_label_device_assert")
    gen = _gen(5)
    hidden, weight = torch.randn(6, 8, generator=gen), torch.randn(30, 8, generator=gen)
    targets = torch.randint(0, 30, (6,), generator=gen)
    targets[0] = IGNORE  # ignored rows are fine
    targets[4] = bad
    message = rf"target {bad} at row 4 is outside \[0, 30\) and is not ignore_index=-100"
    with pytest.raises(ValueError, match="cross_entropy: " + message):
        cross_entropy(hidden @ weight.t(), targets)
    with pytest.raises(ValueError, match="linear_cross_entropy: " + message):
        linear_cross_entropy(hidden.requires_grad_(), weight, targets)
    with pytest.raises(ValueError, match=message):  # through ops, as the model calls it
        ops.linear_cross_entropy(hidden, weight, targets, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_range_label_device_assert():
    # a device-side assert poisons the CUDA context, so it runs in a child process; the launch
    # itself must not sync (the error appears at the explicit synchronize)
    code = (
        "import torch\n"
        "from relscale.kernels.cross_entropy import cross_entropy\n"
        "x = torch.randn(4, 10, device='cuda'); t = torch.tensor([1, 2, 10, 3], device='cuda')\n"
        "loss = cross_entropy(x, t)\n"
        "print('launched', flush=True)\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
    assert "launched" in proc.stdout and proc.returncode != 0
    assert "outside [0, 10)" in proc.stderr or "device-side assert" in proc.stderr


@pytest.mark.parametrize("center", [1e4, -1e4])
def test_fp32_cross_entropy_accurate_for_logits_near_1e4(center):
    gen = _gen(6)
    logits = (center + 3 * torch.randn(5, 50, generator=gen)).float()
    targets = torch.randint(0, 50, (5,), generator=gen)
    x = logits.clone().to(DEVICE).requires_grad_()
    losses = cross_entropy(x, targets.to(DEVICE), reduction="none")
    losses.sum().backward()
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, targets, reduction="none")
    ref.sum().backward()
    # fp32 ulp at 1e4 is ~1e-3: rounding the logsumexp before subtracting would be off by that much
    torch.testing.assert_close(losses.double().cpu(), ref.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, rtol=1e-5, atol=2e-6)
    # the fused path: identity hidden states make hidden @ weight.T exactly these logits
    fused = linear_cross_entropy(
        torch.eye(5, device=DEVICE), logits.t().contiguous().to(DEVICE), targets.to(DEVICE), reduction="none"
    )
    torch.testing.assert_close(fused.double().cpu(), ref.detach(), rtol=2e-6, atol=2e-6)


def test_all_ignored_mean_is_zero_with_zero_gradient_in_every_backend():
    logits = torch.randn(4, 9).to(DEVICE)
    targets = torch.full((4,), IGNORE, device=DEVICE)
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        loss = ops.cross_entropy(x, targets, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all(), backend
        h = torch.randn(4, 5, device=DEVICE, requires_grad=True)
        w = torch.randn(9, 5, device=DEVICE)
        loss = ops.linear_cross_entropy(h, w, targets, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and (h.grad == 0).all(), backend


# ---------------------------------------------------------------------------------- attention
def test_flash_attention_varlen_strided_cu_seqlens_qkv_and_grad():
    gen = _gen(7)
    buf = torch.tensor([0, 7, 13, 5, 29, 1, 40, 3], dtype=torch.int32, device=DEVICE)
    cu = buf[::2]  # [0, 13, 29, 40]
    qkv = torch.randn(40, 4, 16, generator=gen).to(DEVICE)  # a fused projection: q, k, v are views
    grad = torch.randn(2, 40, 16, generator=gen).to(DEVICE).transpose(0, 1)  # (40, 2, 16), strided
    leaf = qkv.clone().requires_grad_()
    ins = [leaf[:, :2], leaf[:, 2:3], leaf[:, 3:]]
    q, k, v = qkv[:, :2], qkv[:, 2:3], qkv[:, 3:]
    out = fa.flash_attention_varlen(*ins, cu, 16)
    out.backward(grad)
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = ops.attention_reference(*(t[None] for t in ref_ins), cu_seqlens=cu.contiguous())[0]
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    expected_grad = torch.cat([t.grad for t in ref_ins], dim=1)
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(leaf.grad.double(), expected_grad, rtol=1e-4, atol=1e-5)
