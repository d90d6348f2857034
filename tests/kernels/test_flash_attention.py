"""Flash attention kernels vs an explicit masked softmax computed here in float64.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), so shapes stay tiny; the
interpreter's block sizes (32/16) still give several tiles per sequence and document boundaries
inside tiles at these lengths.
"""

import pytest
import torch
from relscale.kernels import flash_attention as fa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k, v, cu_seqlens, causal=True, scale=None):
    """(out, lse) of masked softmax attention on packed (tokens, heads, dim), in the inputs' dtype."""
    tokens, heads, dim = q.shape
    group = heads // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    positions = torch.arange(tokens, device=q.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= positions[:, None] >= positions[None, :]
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    out = torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)
    return out, lse


def run_kernel(q, k, v, cu_seqlens, causal, deterministic, grad_out, grad_lse, dense_seq=None):
    """Outputs and grads of the custom op path; dense_seq switches to the (B, S, H, D) entry."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if dense_seq is None:
        out, lse = fa.FlashAttentionFunction.apply(
            q, k, v, cu_seqlens, 64, causal, q.shape[-1] ** -0.5, deterministic
        )
        loss = (out.float() * grad_out).sum() + (lse * grad_lse).sum()
    else:
        shape = lambda t: t.view(-1, dense_seq, *t.shape[1:])  # noqa: E731
        out = fa.flash_attention(shape(q), shape(k), shape(v), causal=causal, deterministic=deterministic)
        out, lse = out.reshape(q.shape), None
        loss = (out.float() * grad_out).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def reference_results(q, k, v, cu_seqlens, causal, grad_out, grad_lse, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference(q, k, v, cu_seqlens, causal)
    loss = (out.double() * grad_out.double()).sum()
    if grad_lse is not None:
        loss = loss + (lse.double() * grad_lse.double()).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = [
    # (dtype, head_dim, layout, causal, deterministic)
    (torch.float32, 64, "dense", True, False),
    (torch.float32, 128, "docs", True, True),
    (torch.float32, 96, "docs", True, False),  # padded to 128 with masking
    (torch.float32, 64, "docs", False, False),
    (torch.bfloat16, 64, "docs", True, False),
    (torch.bfloat16, 128, "dense", True, True),
    (torch.bfloat16, 32, "dense", True, False),
    (torch.float16, 64, "dense", True, True),
    (torch.float16, 128, "docs", True, False),
]
# relative-norm bounds for 16-bit inputs (bf16 keeps 8 significant bits, fp16 11)
REL_BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_reference(case):
    dtype, head_dim, layout, causal, deterministic = CASES[case]
    gen = torch.Generator().manual_seed(1000 + case)
    heads, kv_heads = 4, 2  # GQA: dK/dV sum over the two query heads of each group
    if layout == "dense":
        dense_seq, batch = 37, 2  # 37 is odd: query blocks straddle the batch boundary
        tokens = dense_seq * batch
        cu_seqlens = torch.tensor([0, dense_seq, tokens], dtype=torch.int32)
    else:
        dense_seq = None
        # an empty document, a one-token document, boundaries in the middle of 16/32-token tiles
        cu_seqlens = torch.tensor([0, 5, 5, 28, 29, 61, 90], dtype=torch.int32)
        tokens = 90
    # q, k, v as strided views of one fused projection, as a model produces them
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    grad_out = torch.randn(tokens, heads, head_dim, generator=gen)
    grad_lse = torch.randn(heads, tokens, generator=gen) if dense_seq is None else None
    q, k, v, cu_seqlens, grad_out = (t.to(DEVICE) for t in (q, k, v, cu_seqlens, grad_out))
    grad_lse = grad_lse.to(DEVICE) if grad_lse is not None else None

    ours = run_kernel(q, k, v, cu_seqlens, causal, deterministic, grad_out, grad_lse, dense_seq)
    exact = reference_results(q, k, v, cu_seqlens, causal, grad_out, grad_lse, torch.float64)
    names = ("out", "lse", "dq", "dk", "dv")
    assert ours[0].dtype == dtype and ours[2].dtype == dtype and ours[3].shape == k.shape
    if dtype == torch.float32:
        for name, a, b in zip(names, ours, exact):
            if a is not None:
                assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))
        return
    # 16-bit: at most twice the error of the same math done by torch in that dtype, and small in norm
    lowp = reference_results(q, k, v, cu_seqlens, causal, grad_out, grad_lse, dtype)
    for name, a, b, c in zip(names, ours, exact, lowp):
        if a is None:
            continue
        ours_err, torch_err = max_err(a, b), max_err(c, b)
        assert ours_err <= 2 * torch_err, (name, ours_err, torch_err)
        assert rel_err(a, b) < REL_BOUND[dtype], (name, rel_err(a, b))


def test_documents_equal_separate_calls():
    """Packed documents give exactly what each document gives on its own."""
    gen = torch.Generator().manual_seed(7)
    lengths = [7, 30, 1, 23]
    cu_seqlens = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE
    )
    tokens, heads, kv_heads, dim = sum(lengths), 4, 1, 64
    q, k, v = (torch.randn(tokens, h, dim, generator=gen).to(DEVICE) for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(tokens, heads, dim, generator=gen).to(DEVICE)
    packed = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fa.flash_attention_varlen(*packed, cu_seqlens, max(lengths))
    (out * grad_out).sum().backward()

    start = 0
    for length in lengths:
        part = slice(start, start + length)
        doc = [t[part].detach().clone()[None].requires_grad_() for t in (q, k, v)]
        doc_out = fa.flash_attention(*doc)
        (doc_out[0] * grad_out[part]).sum().backward()
        torch.testing.assert_close(out[part], doc_out[0], atol=1e-5, rtol=1e-5)
        for whole, single in zip(packed, doc):
            torch.testing.assert_close(whole.grad[part], single.grad[0], atol=1e-5, rtol=1e-5)
        start += length


def test_deterministic_mode_repeats_bits():
    gen = torch.Generator().manual_seed(3)
    cu_seqlens = torch.tensor([0, 19, 50, 71], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(71, h, 64, generator=gen).to(DEVICE, torch.bfloat16) for h in (4, 2, 2))
    grad_out = torch.randn(71, 4, 64, generator=gen).to(DEVICE, torch.bfloat16)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fa.flash_attention_varlen(*leaves, cu_seqlens, 31, deterministic=True)
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves]

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(11)
    cu_seqlens = torch.tensor([0, 9, 20], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(20, h, 32, generator=gen).to(DEVICE).requires_grad_() for h in (2, 1, 1))
    torch.library.opcheck(
        torch.ops.relscale.flash_attn_varlen_fwd.default, (q, k, v, cu_seqlens, 11, True, 0.2, False)
    )
    out, lse = torch.ops.relscale.flash_attn_varlen_fwd(q, k, v, None, 10, True, 0.2, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.relscale.flash_attn_varlen_bwd.default,
        (
            dout,
            None,
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse.detach(),
            None, 10, True, 0.2, True,
        ),
    )


def test_module_under_torch_compile_fullgraph():
    """The module compiles to one graph (no graph breaks, no host syncs) and matches eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    cu_seqlens = torch.tensor([0, 13, 40], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(40, h, 32, generator=gen).to(DEVICE) for h in (2, 2, 2))
    attn = fa.FlashAttention()

    def step(q, k, v, cu_seqlens):
        packed = attn(q * 2, k, v, cu_seqlens, 40)
        dense = attn(q.view(2, 20, 2, 32), k.view(2, 20, 2, 32), v.view(2, 20, 2, 32))
        return packed.square().sum() + (dense.view(40, 2, 32) * packed).sum()

    compiled = torch.compile(step, fullgraph=True)  # inductor; the kernels stay opaque custom ops
    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    loss_c = compiled(*leaves_c, cu_seqlens)
    loss_e = step(*leaves_e, cu_seqlens)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "shapes, cu, message",
    [
        (((10, 4, 64), (10, 3, 64), (10, 3, 64)), [0, 10], "multiple of k/v heads"),
        (((10, 4, 64), (9, 2, 64), (9, 2, 64)), [0, 10], "agree in tokens"),
        (((10, 4, 64), (10, 2, 64), (10, 2, 64)), [0, 4, 12], "rise from 0 to the token count 10"),
    ],
)
def test_bad_inputs_name_the_problem(shapes, cu, message):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=message):
        fa.flash_attention_varlen(q, k, v, torch.tensor(cu, dtype=torch.int32, device=DEVICE), 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Hopper-sized tiles)")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_long_documents_without_host_sync(head_dim):
    """GPU block sizes on long packed documents vs SDPA in fp32; the whole step never syncs the host."""
    gen = torch.Generator().manual_seed(head_dim)
    lengths = [1000, 1, 2500, 595]  # boundaries at arbitrary offsets of the 128-row blocks
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    tokens, heads, kv_heads = sum(lengths), 8, 2
    q, k, v = (
        torch.randn(tokens, h, head_dim, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    )
    grad_out = torch.randn(tokens, heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fa.flash_attention_varlen(q, k, v, cu_seqlens, max(lengths))
        out.backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t[part].float().transpose(0, 1) for t in (q, k, v)), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        assert rel_err(out[part], ref) < 1e-2
        start += length
    exact = reference_results(q, k, v, cu_seqlens, True, grad_out.float(), None, torch.float32)
    for ours, ref in zip((q.grad, k.grad, v.grad), exact[2:]):
        assert rel_err(ours, ref) < 2e-2
