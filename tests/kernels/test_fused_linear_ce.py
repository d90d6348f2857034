"""Fused linear + cross-entropy against float64 torch on hidden @ weight.T and against the unfused
kernel path: losses and both gradients, every reduction, chunk boundaries, awkward weights."""

import pytest
import torch
import torch.nn.functional as F
from relscale.kernels import fused_linear_ce as flce
from relscale.kernels.cross_entropy import cross_entropy
from relscale.kernels.fused_linear_ce import LinearCrossEntropyLoss, default_chunk_rows, linear_cross_entropy

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
# Relative to the largest reference value. Low precision: logits are rounded to dtype before the
# loss (as in the unfused model), and Triton's interpreter rounds fp32 -> bf16 toward zero.
TOL = {torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 8e-3}
VARIANTS = {"plain": (0.0, None), "zloss_softcap": (1e-2, 4.0)}


def torch_loss(hidden, weight, targets, reduction="mean", z_loss=0.0, softcap=None):
    """Unfused torch computation in the inputs' dtype (float64 in: the reference)."""
    logits = hidden @ weight.t()
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    valid = targets != IGNORE
    losses = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none")
    losses = losses + z_loss * torch.logsumexp(z, dim=-1).pow(2) * valid
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp(min=1)


def _inputs(n, h, v, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = IGNORE
    return hidden, weight, targets.to(DEVICE), gen


def _rand(*shape, gen):
    return torch.rand(*shape, generator=gen).to(DEVICE)


def _run(fn, hidden, weight, targets, grad_out, **kwargs):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kwargs)
    loss.backward(grad_out)
    return loss.detach(), h.grad, w.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_rel(ours, ref, rel):
    assert torch.isfinite(ours).all()
    assert _max_err(ours, ref) <= rel * ref.double().abs().max().item() + 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_reference(dtype, reduction, variant):
    z_loss, softcap = VARIANTS[variant]
    hidden, weight, targets, gen = _inputs(37, 19, 257, dtype)
    grad_out = _rand(37, gen=gen) + 0.5 if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    kw = dict(reduction=reduction, z_loss=z_loss, softcap=softcap)
    # 16-row chunks: three chunks, the last one partial.
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, targets, grad_out, chunk_size=16, **kw)
    ref_loss, ref_dh, ref_dw = _run(
        torch_loss, hidden.double(), weight.double(), targets, grad_out.double(), **kw
    )
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    _assert_rel(loss, ref_loss, TOL[dtype] / 10)
    _assert_rel(dh, ref_dh, TOL[dtype])
    _assert_rel(dw, ref_dw, TOL[dtype])
    assert (dh[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_same_as_unfused_kernel_path_for_any_chunking(reduction):
    hidden, weight, targets, gen = _inputs(29, 24, 131, torch.float32, seed=1)
    grad_out = _rand(29, gen=gen) if reduction == "none" else torch.tensor(1.0, device=DEVICE)
    kw = dict(reduction=reduction, z_loss=1e-3)
    unfused = _run(
        lambda h, w, t, **k: cross_entropy(h @ w.t(), t, **k), hidden, weight, targets, grad_out, **kw
    )
    for chunk in (None, 1, 7, 29, 64):
        fused = _run(linear_cross_entropy, hidden, weight, targets, grad_out, chunk_size=chunk, **kw)
        for ours, ref in zip(fused, unfused):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_low_precision_error_within_twice_torch_own():
    # FlashAttention's criterion: our error vs float64 <= 2x torch's error doing the same in bf16.
    hidden, weight, targets, _ = _inputs(48, 32, 301, torch.bfloat16, seed=2)
    ours = _run(linear_cross_entropy, hidden, weight, targets, None, chunk_size=16)
    low = _run(torch_loss, hidden, weight, targets, None)
    exact = _run(torch_loss, hidden.double(), weight.double(), targets, None)
    for o, lo, ex in zip(ours, low, exact):
        assert _max_err(o, ex) <= 2 * _max_err(lo, ex) + 1e-3 * ex.abs().max().item()


def test_weight_as_non_contiguous_view_of_a_leaf():
    # The weight is whatever tensor is passed in (e.g. an FSDP2 parameter after its all-gather):
    # here a transposed view and a column slice of bigger leaves; gradients must reach the leaves.
    hidden, weight, targets, _ = _inputs(12, 10, 53, torch.float32, seed=3)
    ref_loss, ref_dh, ref_dw = _run(torch_loss, hidden.double(), weight.double(), targets, None)

    leaf_t = weight.t().contiguous().requires_grad_()  # (H, V) storage, weight = leaf_t.t()
    wide = torch.cat(
        (weight, torch.randn(53, 5, device=DEVICE)), dim=1
    ).requires_grad_()  # weight = wide[:, :10]
    for leaf, view in ((leaf_t, lambda: leaf_t.t()), (wide, lambda: wide[:, :10])):
        h = hidden.clone().requires_grad_()
        w = view()
        assert not w.is_contiguous() and w.requires_grad and not w.is_leaf
        loss = linear_cross_entropy(h, w, targets, chunk_size=5)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(h.grad.double(), ref_dh, rtol=1e-5, atol=1e-7)
        leaf_grad = leaf.grad.t() if leaf is leaf_t else leaf.grad[:, :10]
        torch.testing.assert_close(leaf_grad.double(), ref_dw, rtol=1e-5, atol=1e-7)
        if leaf is wide:
            assert torch.equal(wide.grad[:, 10:], torch.zeros(53, 5, device=DEVICE))


def test_only_one_input_needs_grad_and_eval_mode():
    hidden, weight, targets, _ = _inputs(10, 8, 37, torch.float32, seed=4)
    ref_loss, ref_dh, ref_dw = _run(torch_loss, hidden.double(), weight.double(), targets, None)
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets).backward()  # frozen hidden: only dW
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=1e-5, atol=1e-7)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, reduction="none").sum().backward()  # frozen weight
    ref_sum = _run(torch_loss, hidden.double(), weight.double(), targets, None, reduction="sum")
    torch.testing.assert_close(h.grad.double(), ref_sum[1], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        eval_loss = linear_cross_entropy(h, weight, targets)
    torch.testing.assert_close(eval_loss.double(), ref_loss, rtol=1e-6, atol=0)


def test_all_ignored_and_module_z_loss():
    hidden, weight, _, _ = _inputs(6, 8, 20, torch.float32, seed=5)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, torch.full((6,), IGNORE, device=DEVICE), None)
    assert (
        loss.item() == 0.0 and torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    )
    targets = torch.tensor([1, IGNORE, 3, 4, 19, 0], device=DEVICE)
    module = LinearCrossEntropyLoss(z_loss=0.01, reduction="sum", return_z_loss=True)
    loss, z_loss = module(hidden, weight, targets)
    lse = torch.logsumexp(hidden.double() @ weight.double().t(), -1)
    torch.testing.assert_close(
        z_loss.double(), 0.01 * (lse.pow(2) * (targets != IGNORE)).sum(), rtol=1e-6, atol=0
    )
    expected = torch_loss(hidden.double(), weight.double(), targets, reduction="sum", z_loss=0.01)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_default_chunk_from_memory_budget():
    # rows = budget // (V * itemsize), down to a multiple of 256, at least 256, at most N
    assert default_chunk_rows(16384, 128256, 2, 256 << 20) == 1024  # 268435456 // 256512 = 1046
    assert default_chunk_rows(65536, 128256, 2, 4_500_000_000) == 17408  # 17543 -> 68 * 256
    assert default_chunk_rows(65536, 128256, 4, 4_500_000_000) == 8704  # fp32 logits: half the rows
    assert default_chunk_rows(100, 32000, 2, 256 << 20) == 100
    assert default_chunk_rows(10**6, 10**7, 2, 256 << 20) == 256
    assert flce.logits_budget_bytes(torch.device("cpu")) == 256 << 20
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        assert flce.logits_budget_bytes(torch.device("cuda", 0)) == total // 32


def test_budget_chunking_does_not_change_results(monkeypatch):
    # a budget of 3 rows' logits: the automatic rule then cuts 29 rows into 10 chunks
    hidden, weight, targets, gen = _inputs(29, 24, 131, torch.float32, seed=3)
    whole = _run(linear_cross_entropy, hidden, weight, targets, None, chunk_size=29)
    monkeypatch.setattr(flce, "logits_budget_bytes", lambda device: 3 * 131 * 4)
    monkeypatch.setattr(flce, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(flce, "CHUNK_ROW_MULTIPLE", 1)
    assert default_chunk_rows(29, 131, 4, flce.logits_budget_bytes(hidden.device)) == 3
    chunked = _run(linear_cross_entropy, hidden, weight, targets, None)
    for ours, ref in zip(chunked, whole):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_bad_arguments_name_the_problem():
    hidden, weight, targets, _ = _inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="differ"):
        linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")


def test_opcheck():
    hidden, weight, targets, gen = _inputs(6, 5, 33, torch.float32, seed=6)
    fwd = torch.ops.relscale.linear_cross_entropy_fwd_.default
    torch.library.opcheck(
        fwd,
        (
            hidden,
            weight,
            targets,
            torch.empty(6, 5, device=DEVICE),
            torch.empty(33, 5, device=DEVICE),
            IGNORE,
            "mean",
            1e-3,
            None,
            4,
        ),
    )
    torch.library.opcheck(
        fwd,
        (
            hidden,
            weight,
            targets,
            torch.empty(0, device=DEVICE),
            torch.empty(0, device=DEVICE),
            IGNORE,
            "none",
            0.0,
            3.0,
            4,
        ),
    )
    lse = torch.stack((torch.logsumexp(hidden @ weight.t(), -1), torch.zeros(6, device=DEVICE)))
    bwd = torch.ops.relscale.linear_cross_entropy_bwd.default
    torch.library.opcheck(
        bwd, (_rand(6, gen=gen), hidden, weight, targets, lse, IGNORE, 0.0, None, 4, True, True)
    )


def test_torch_compile_fullgraph():
    # aot_eager traces forward and backward through the custom ops as inductor would (inductor
    # itself is skipped only because compiling C++ on this CPU takes ~20 s).
    def loss_fn(hidden, weight, targets):
        return linear_cross_entropy(hidden * 2, weight, targets, z_loss=1e-3, chunk_size=4)

    hidden, weight, targets, _ = _inputs(10, 6, 29, torch.float32, seed=7)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(h, w, targets)
    grads = torch.autograd.grad(out, (h, w))
    out_eager = loss_fn(h, w, targets)
    grads_eager = torch.autograd.grad(out_eager, (h, w))
    torch.testing.assert_close(out, out_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)
