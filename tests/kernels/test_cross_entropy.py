"""Cross-entropy kernel (loss, z-loss, soft-capping, every reduction) against float64 torch."""

import pytest
import torch
import torch.nn.functional as F
from relscale.kernels.cross_entropy import CrossEntropyLoss, cross_entropy

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
# Relative to the largest reference value. bf16 gradients: Triton's interpreter rounds fp32 -> bf16
# toward zero (a GPU rounds to nearest), so up to one bf16 ulp (2^-7 relative).
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
VARIANTS = {"plain": (0.0, None), "zloss_softcap": (1e-2, 4.0)}


def torch_loss(logits, targets, reduction="mean", z_loss=0.0, softcap=None):
    """The same loss with torch ops in logits' dtype (float64 in: the reference)."""
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    valid = targets != IGNORE
    losses = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none")
    losses = losses + z_loss * torch.logsumexp(z, dim=-1).pow(2) * valid
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp(min=1)


def _inputs(n, v, dtype, scale=3.0, seed=0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * scale).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::ignore_every] = IGNORE
    return logits, targets.to(DEVICE), gen


def _rand(*shape, gen):
    return torch.rand(*shape, generator=gen).to(DEVICE)


def _loss_and_grad(fn, logits, targets, grad_out, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kwargs)
    loss.backward(grad_out)
    return loss.detach(), x.grad


def _ours(x, t, **kw):
    return cross_entropy(x, t, **kw)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_rel(ours, ref, rel, floor=1e-12):
    assert torch.isfinite(ours).all()
    scale = ref.double().abs().max().item()
    assert _max_err(ours, ref) <= rel * scale + floor, (_max_err(ours, ref), scale)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_reference(dtype, reduction, variant):
    z_loss, softcap = VARIANTS[variant]
    logits, targets, gen = _inputs(37, 1031, dtype)
    # Non-uniform upstream gradient: a random weight per token for "none", a scalar != 1 otherwise.
    grad_out = _rand(37, gen=gen) + 0.5 if reduction == "none" else torch.tensor(1.7, device=DEVICE)
    kw = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
    loss, grad = _loss_and_grad(_ours, logits, targets, grad_out, **kw)
    ref_loss, ref_grad = _loss_and_grad(torch_loss, logits.double(), targets, grad_out.double(), **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    _assert_rel(loss, ref_loss, 2e-6)  # fp32 math whatever the input dtype
    _assert_rel(grad, ref_grad, GRAD_TOL[dtype])
    assert (grad[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(reduction):
    logits, _, _ = _inputs(6, 50, torch.float32)
    targets = torch.full((6,), IGNORE, device=DEVICE)
    loss, grad = _loss_and_grad(
        _ours,
        logits,
        targets,
        None if reduction != "none" else torch.ones(6, device=DEVICE),
        reduction=reduction,
        z_loss=1e-2,
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_large_logits_and_shift_invariance():
    logits, targets, gen = _inputs(24, 333, torch.float32, scale=30.0)  # x10 the usual scale
    one = torch.tensor(1.0, device=DEVICE)
    loss, grad = _loss_and_grad(_ours, logits, targets, one)
    ref_loss, ref_grad = _loss_and_grad(torch_loss, logits.double(), targets, one.double())
    _assert_rel(loss, ref_loss, 1e-6)
    _assert_rel(grad, ref_grad, 1e-5)
    shift = torch.randint(-200, 200, (24, 1), generator=gen).float().to(DEVICE)  # a constant per row
    shifted_loss, shifted_grad = _loss_and_grad(_ours, logits + shift, targets, one)
    assert abs(shifted_loss.item() - loss.item()) <= 1e-5 * loss.abs().item()
    assert _max_err(shifted_grad, grad) <= 1e-5 * grad.abs().max().item()


def test_moderate_vocabulary():
    logits, targets, gen = _inputs(5, 50257, torch.float32, ignore_every=3)
    grad_out = _rand(5, gen=gen)
    loss, grad = _loss_and_grad(_ours, logits, targets, grad_out, reduction="none", z_loss=1e-4)
    ref_loss, ref_grad = _loss_and_grad(
        torch_loss, logits.double(), targets, grad_out.double(), reduction="none", z_loss=1e-4
    )
    _assert_rel(loss, ref_loss, 1e-6)
    _assert_rel(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_error_within_twice_torch_own(dtype, variant):
    # FlashAttention's criterion: our error vs float64 <= 2x torch's error doing the same in dtype.
    z_loss, softcap = VARIANTS[variant]
    logits, targets, gen = _inputs(32, 517, dtype)
    grad_out = _rand(32, gen=gen) + 0.5
    kw = dict(reduction="none", z_loss=z_loss, softcap=softcap)
    loss, grad = _loss_and_grad(_ours, logits, targets, grad_out, **kw)
    low_loss, low_grad = _loss_and_grad(torch_loss, logits, targets, grad_out.to(dtype), **kw)
    ref_loss, ref_grad = _loss_and_grad(torch_loss, logits.double(), targets, grad_out.double(), **kw)
    assert _max_err(loss, ref_loss) <= 2 * _max_err(low_loss, ref_loss) + 1e-5
    assert _max_err(grad, ref_grad) <= 2 * _max_err(low_grad, ref_grad) + 1e-4 * ref_grad.abs().max().item()


def test_z_loss_value_and_module():
    logits, targets, _ = _inputs(20, 77, torch.float32)
    module = CrossEntropyLoss(z_loss=0.01, return_z_loss=True)
    loss, z_loss = module(logits, targets)
    valid = targets != IGNORE
    lse = torch.logsumexp(logits.double(), -1)
    expected_z = 0.01 * (lse.pow(2) * valid).sum() / valid.sum()
    torch.testing.assert_close(z_loss.double(), expected_z, rtol=1e-6, atol=0)
    expected = torch_loss(logits.double(), targets, z_loss=0.01)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    assert not z_loss.requires_grad


def test_eval_mode_matches_and_int32_targets():
    logits, targets, _ = _inputs(9, 40, torch.float32)
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        eval_loss = cross_entropy(x, targets.int())
    torch.testing.assert_close(eval_loss.double(), torch_loss(logits.double(), targets), rtol=1e-6, atol=0)


def test_out_of_range_target_is_an_error_naming_the_row():
    logits, targets, _ = _inputs(4, 10, torch.float32)
    for bad in (10, -1):
        t = targets.clone()
        t[1] = bad
        with pytest.raises(ValueError, match=rf"cross_entropy: target {bad} at row 1 is outside \[0, 10\)"):
            cross_entropy(logits, t, reduction="none")


def test_second_backward_through_consumed_buffer_raises():
    # mean/sum: the gradient buffer is scaled in place by the backward, so a second backward must
    # fail loudly; "none" recomputes from the saved logits, so it may run twice.
    logits, targets, gen = _inputs(4, 10, torch.float32)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x.grad = None
    losses = cross_entropy(x, targets, reduction="none")
    weights = _rand(4, gen=gen)
    first = torch.autograd.grad(losses, x, weights, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(losses, x, weights)[0], first, rtol=0, atol=0)


def test_bad_arguments_name_the_problem():
    logits, targets, _ = _inputs(4, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        cross_entropy(logits, targets[:3])
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, targets, softcap=0.0)


def test_opcheck():
    logits, targets, gen = _inputs(6, 33, torch.float32, ignore_every=3)
    op = torch.ops.relscale.cross_entropy_fwd_.default
    torch.library.opcheck(
        op, (logits, targets, torch.empty(6, 33, device=DEVICE), IGNORE, "mean", 1e-3, None)
    )
    torch.library.opcheck(op, (logits, targets, torch.empty(0, device=DEVICE), IGNORE, "none", 0.0, 3.0))
    lse = torch.stack((torch.logsumexp(logits, -1), torch.zeros(logits.shape[0], device=DEVICE)))
    bwd = torch.ops.relscale.cross_entropy_bwd.default
    torch.library.opcheck(bwd, (logits, targets, lse, _rand(6, gen=gen), IGNORE, 1e-3, 3.0))
    scale_rows = torch.ops.relscale.scale_rows_.default
    torch.library.opcheck(scale_rows, (_rand(5, 9, gen=gen), torch.tensor(2.0, device=DEVICE)))
    torch.library.opcheck(scale_rows, (_rand(5, 9, gen=gen), _rand(5, gen=gen)))


def test_torch_compile_fullgraph():
    # aot_eager traces forward and backward through the custom ops as inductor would (inductor
    # itself is skipped only because compiling C++ on this CPU takes ~20 s).
    def loss_fn(logits, targets, weights):
        return (cross_entropy(logits * 2, targets, reduction="none", z_loss=1e-3) * weights).sum()

    logits, targets, gen = _inputs(8, 45, torch.float32)
    weights = _rand(8, gen=gen)
    x = logits.clone().requires_grad_()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, targets, weights)
    (grad,) = torch.autograd.grad(out, x)
    out_eager = loss_fn(x, targets, weights)
    (grad_eager,) = torch.autograd.grad(out_eager, x)
    torch.testing.assert_close(out, out_eager)
    torch.testing.assert_close(grad, grad_eager)
