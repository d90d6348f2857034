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
    b, s, h, kv, d = 2, 20, 2, 1, 16
    base = [torch.randn(b, s, n, d, generator=gen).to(DEVICE) for n in (h, kv, kv)]
    cu = torch.tensor([0, 9, 20, 27, 40], dtype=torch.int32, device=DEVICE) if docs else None
    grad_out = torch.randn(b, s, h, d, generator=gen).to(DEVICE)
    grad_lse = torch.randn(b, h, s, generator=gen).to(DEVICE)

    def run():
        q, k, v = (t.clone().requires_grad_() for t in base)
        out, lse = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=s, deterministic=True, return_lse=True,
                                 backend=backend)
        torch.autograd.backward((out, lse), (grad_out, grad_lse))
        return out.detach(), lse.detach(), q.grad, k.grad, v.grad

    first = run()
    assert first[1].shape == (b, h, s) and first[1].dtype == torch.float32
    # float64 reference written out: scores, mask, softmax
    q64, k64, v64 = (t.double().requires_grad_() for t in base)
    kk, vv = k64.repeat_interleave(h // kv, dim=2), v64.repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q64, kk) / d**0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=DEVICE).tril()
    if docs:
        seg = torch.searchsorted(cu[1:].long(), torch.arange(b * s, device=DEVICE), right=True).view(b, s)
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref_out = torch.einsum("bhst,bthd->bshd", torch.softmax(scores, -1), vv)
    torch.autograd.backward((ref_out, ref_lse), (grad_out.double(), grad_lse.double()))
    for ours, ref in zip(first, (ref_out, ref_lse, q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    # deterministic: the same bits on a second run
    for a, b_ in zip(first, run()):
        assert torch.equal(a, b_)


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
        op = name.split("::")[-1]
        if name.startswith("aten::") and op in self.MATMULS:
            # the two matrix operands (addmm's accumulator C may be fp32 by design: out_dtype)
            operands = args[1:3] if op.startswith(("addmm", "baddbmm")) else args[:2]
            self.calls.append((name, tuple(a.dtype for a in operands)))
        if name.startswith("relscale::"):  # look inside the custom op: run its backend kernel
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_ce_gemms_run_in_bf16_under_autocast(reduction):
    # on the CPU (CI): torch.autocast("cpu", bf16) with the Triton interpreter; on a GPU: "cuda"
    gen = _gen(4)
    hidden = torch.randn(40, 16, generator=gen).to(DEVICE).requires_grad_()  # fp32 residual stream
    weight = torch.randn(50, 16, generator=gen).to(DEVICE).requires_grad_()  # fp32 parameter
    targets = torch.randint(0, 50, (40,), generator=gen).to(DEVICE)
    trace = MatmulDtypes()
    with torch.autocast(DEVICE, dtype=torch.bfloat16), trace:
        loss = ops.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend="triton")
        loss.sum().backward()
    names = [name for name, _ in trace.calls]
    # forward logits, grad_hidden and grad_weight GEMMs (the "none" backward recomputes the logits)
    assert len(names) >= 3, trace.calls
    assert all(dtypes and set(dtypes) == {torch.bfloat16} for _, dtypes in trace.calls), trace.calls
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    logits64 = hidden.detach().double() @ weight.detach().double().t()
    ref = F.cross_entropy(logits64, targets, reduction=reduction)
    loss = loss.cpu() if DEVICE != "cpu" else loss
    ref = ref.to(loss.device)
    torch.testing.assert_close(loss.double(), ref, rtol=3e-2, atol=3e-2)


def test_autocast_attention_runs_in_the_autocast_dtype_and_norms_keep_theirs():
    gen = _gen(5)
    q = torch.randn(1, 16, 2, 16, generator=gen).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = ops.attention(q, q[:, :, :1], q[:, :, :1], backend="triton")
        normed = ops.rms_norm(q, torch.ones(16, device=DEVICE), 1e-6, backend="triton")
        targets = torch.zeros(32, dtype=torch.long, device=DEVICE)
        loss = ops.cross_entropy(q.reshape(32, 16), targets, backend="triton")
    assert out.dtype == torch.bfloat16  # as autocast does for scaled_dot_product_attention
    assert normed.dtype == torch.float32 and loss.dtype == torch.float32
