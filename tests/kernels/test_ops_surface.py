"""What ``relscale.ops`` exposes of the kernels (softcap, deterministic attention, the LSE, the fused
residual + RMSNorm) and how every backend behaves under autocast: each against float64 torch, and
a dispatch trace showing the fused linear cross-entropy's GEMMs run in bf16 under CPU autocast."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from relscale import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
BACKENDS = ["torch", "triton"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_matches_float64(backend):
    gen = _gen(0)
    x = torch.randn(2, 5, 24, generator=gen).to(DEVICE).requires_grad_()
    residual = torch.randn(2, 5, 24, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(24, generator=gen).to(DEVICE).requires_grad_()
    normed, new_residual = ops.add_rms_norm(x, residual, weight, 1e-6, backend=backend)
    g1, g2 = torch.randn(2, 5, 24, generator=gen).to(DEVICE), torch.randn(2, 5, 24, generator=gen).to(DEVICE)
    torch.autograd.backward((normed, new_residual), (g1, g2))
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    h64 = x64 + r64
    y64 = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.autograd.backward((y64, h64), (g1.double(), g2.double()))
    pairs = [(normed, y64), (new_residual, h64), (x.grad, x64.grad), (residual.grad, r64.grad)]
    for ours, ref in [*pairs, (weight.grad, w64.grad)]:
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_promotes_a_bf16_branch_into_an_fp32_stream(backend):
    gen = _gen(1)
    x = torch.randn(3, 16, generator=gen).to(DEVICE).bfloat16()
    residual = torch.randn(3, 16, generator=gen).to(DEVICE)
    normed, new_residual = ops.add_rms_norm(x, residual, torch.ones(16, device=DEVICE), 1e-6, backend=backend)
    assert normed.dtype == new_residual.dtype == torch.float32
    torch.testing.assert_close(new_residual, x.float() + residual)
    with pytest.raises(ValueError, match=r"add_rms_norm: x \(3, 16\) and residual \(3, 8\) differ"):
        ops.add_rms_norm(x, residual[:, :8], torch.ones(16, device=DEVICE), 1e-6, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("docs", [False, True])
def test_attention_lse_and_deterministic(backend, docs):
    gen = _gen(2)
    b, s, h, kv, d = 2, 24, 4, 2, 16
    q = torch.randn(b, s, h, d, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(b, s, kv, d, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(b, s, kv, d, generator=gen).to(DEVICE).requires_grad_()
    cu = torch.tensor([0, 10, 24, 31, 48], dtype=torch.int32, device=DEVICE) if docs else None
    out, lse = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=24, deterministic=True, return_lse=True,
                             backend=backend)
    assert lse.shape == (b, h, s) and lse.dtype == torch.float32
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    grad_lse = torch.randn(lse.shape, generator=gen)
    torch.autograd.backward((out, lse), (grad_out, grad_lse.to(DEVICE)))
    # float64 reference written out: scores, mask, softmax
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kk, vv = k64.repeat_interleave(h // kv, dim=2), v64.repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q64, kk) / d**0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=DEVICE).tril()
    if docs:
        seg = torch.searchsorted(cu[1:].long(), torch.arange(b * s, device=DEVICE), right=True).view(b, s)
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref_out = torch.einsum("bhst,bthd->bshd", torch.softmax(scores, -1), vv)
    torch.autograd.backward((ref_out, ref_lse), (grad_out.double(), grad_lse.double().to(DEVICE)))
    pairs = [(out, ref_out), (lse, ref_lse), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)]
    for ours, ref in pairs:
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    # deterministic: the same bits on a second run
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out2 = ops.attention(q2, k2, v2, cu_seqlens=cu, max_seqlen=24, deterministic=True, backend=backend)
    out2.backward(grad_out)
    assert torch.equal(out2, out.detach())
    q3 = q.detach().clone().requires_grad_()
    ops.attention(q3, k2.detach(), v2.detach(), cu_seqlens=cu, max_seqlen=24, deterministic=True,
                  backend=backend).backward(grad_out)
    assert torch.equal(q3.grad, q2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_softcap_through_ops(backend):
    gen = _gen(3)
    logits = (5 * torch.randn(6, 40, generator=gen)).to(DEVICE)
    targets = torch.randint(0, 40, (6,), generator=gen).to(DEVICE)
    hidden = torch.randn(6, 8, generator=gen).to(DEVICE)
    weight = torch.randn(40, 8, generator=gen).to(DEVICE)
    cap = 4.0

    def ref(z):
        return F.cross_entropy(cap * torch.tanh(z.double() / cap), targets)

    got = ops.cross_entropy(logits, targets, softcap=cap, backend=backend)
    torch.testing.assert_close(got.double(), ref(logits), rtol=1e-5, atol=1e-6)
    got = ops.linear_cross_entropy(hidden, weight, targets, softcap=cap, backend=backend)
    torch.testing.assert_close(got.double(), ref(hidden.double() @ weight.double().t()), rtol=1e-5, atol=1e-5)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every aten matmul, also inside relscale custom ops."""

    MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("aten::") and name.split("::")[1] in self.MATMULS:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.calls.append((name, dtypes))
        if name.startswith("relscale::"):  # look inside the custom op: run its backend kernel
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_ce_gemms_run_in_bf16_under_cpu_autocast(reduction):
    gen = _gen(4)
    hidden = torch.randn(40, 16, generator=gen).requires_grad_()  # fp32 residual stream
    weight = torch.randn(50, 16, generator=gen).requires_grad_()  # fp32 parameter
    targets = torch.randint(0, 50, (40,), generator=gen)
    trace = MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), trace:
        loss = ops.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend="triton")
        loss.sum().backward()
    names = [name for name, _ in trace.calls]
    # forward logits, grad_hidden and grad_weight GEMMs (the "none" backward recomputes the logits)
    assert len(names) >= 3, trace.calls
    assert all(dtypes and set(dtypes) == {torch.bfloat16} for _, dtypes in trace.calls), trace.calls
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    logits64 = hidden.detach().double() @ weight.detach().double().t()
    ref = F.cross_entropy(logits64, targets, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, rtol=3e-2, atol=3e-2)


def test_autocast_attention_runs_in_the_autocast_dtype_and_norms_keep_theirs():
    gen = _gen(5)
    q = torch.randn(1, 16, 2, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(q, q[:, :, :1], q[:, :, :1], backend="triton")
        normed = ops.rms_norm(q, torch.ones(16), 1e-6, backend="triton")
        loss = ops.cross_entropy(q.reshape(32, 16), torch.zeros(32, dtype=torch.long), backend="triton")
    assert out.dtype == torch.bfloat16  # as autocast does for scaled_dot_product_attention
    assert normed.dtype == torch.float32 and loss.dtype == torch.float32
