"""One training step under autocast with fp32 weights (the single-GPU path, here CPU autocast) does
every matmul in bf16: a TorchDispatchMode trace of forward, backward and an AdamW step records
the dtype of every matrix product's operands (issue 14, section 2)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from relscale.config import KernelConfig, ModelConfig
from relscale.model import Transformer

V, S = 61, 16
ATTENTION = ("scaled_dot_product", "flash_attn")  # torch's SDPA and relscale's Triton flash attention
GEMMS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.addbmm", "aten.matmul", "aten.linear",
         "aten.mv", "aten.dot", "linear_cross_entropy") + ATTENTION
HEAD_DIM = 8


class DtypeTrace(TorchDispatchMode):
    """Records (phase, op name, dtypes of its floating tensor arguments) for every aten/custom op.

    For attention ops only the (…, head_dim) arguments are matmul operands (q, k, v, out, dout);
    their fp32 log-sum-exp is a softmax statistic by design, so it is left out."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.calls: list[tuple[str, str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tensors = [t for t in tensors if t.is_floating_point() and t.dim() >= 2]
        if any(a in str(func) for a in ATTENTION):
            tensors = [t for t in tensors if t.dim() >= 3 and t.shape[-1] == HEAD_DIM]
        dtypes = tuple(t.dtype for t in tensors)
        self.calls.append((self.phase, str(func), dtypes))
        return func(*args, **kwargs)

    def gemms(self, phase: str) -> list[tuple[str, tuple[torch.dtype, ...]]]:
        return [(name, dts) for p, name, dts in self.calls if p == phase and any(g in name for g in GEMMS)]


def _model(triton: bool = False, fused_loss: bool = True) -> Transformer:
    """The torch reference ops, or the Triton kernels (interpreted on the CPU) for norm, attention, loss."""
    torch.manual_seed(0)
    kernel = "triton" if triton else "torch"
    kernels = KernelConfig(rms_norm=kernel, rope="torch", swiglu="torch", attention=kernel,
                           cross_entropy=kernel)
    cfg = ModelConfig(vocab_size=V, hidden=32, layers=2, heads=4, kv_heads=2, max_seq_len=64,
                      fused_loss=fused_loss, kernels=kernels)
    assert cfg.d_head == HEAD_DIM
    return Transformer(cfg)


def _step(model: Transformer) -> tuple[DtypeTrace, dict[str, torch.dtype]]:
    gen = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, V, (2, S), generator=gen), torch.randint(0, V, (2, S), generator=gen)
    cu_seqlens = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in (5, 11, 4, 12)]).view(2, S)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen: dict[str, torch.dtype] = {}
    hooks = [
        model.blocks[0].register_forward_hook(
            lambda m, i, out: seen.update(branch=out[0].dtype, residual=out[1].dtype)
        ),
        model.blocks[1].mlp_norm.register_forward_hook(lambda m, i, out: seen.update(norm=out[0].dtype)),
    ]
    with DtypeTrace() as trace:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.hidden_states(tokens, positions, cu_seqlens, S)
            loss = model(tokens, targets, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=S)
        seen.update(hidden=hidden.dtype, loss=loss.dtype)
        trace.phase = "backward"
        loss.backward()
        trace.phase = "optimizer"
        optimizer.step()
    for hook in hooks:
        hook.remove()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    return trace, seen


def _assert_all_bf16(gemms):
    for name, dtypes in gemms:
        assert dtypes and all(d == torch.bfloat16 for d in dtypes), f"{name} ran on {dtypes}"


@pytest.mark.parametrize("triton", [False, True], ids=["torch-ops", "triton-kernels"])
def test_training_step_under_autocast_does_every_matmul_in_bf16(triton):
    model = _model(triton)
    trace, seen = _step(model)
    forward, backward = trace.gemms("forward"), trace.gemms("backward")
    _assert_all_bf16(forward)
    _assert_all_bf16(backward)
    assert trace.gemms("optimizer") == []  # AdamW is elementwise: no GEMM, in any dtype
    # One matmul per projection: QKV, wo, gate-up, w_down per block (not 7: the input is read
    # once per fused projection), twice over (hidden_states, then the loss), plus the head: an aten
    # matmul on the torch path, inside the fused linear cross-entropy op on the Triton path.
    mms = [name for name, _ in forward if name.startswith("aten.mm")]
    assert len(mms) == 2 * (4 * 2) + (0 if triton else 1)
    assert len([n for n, _ in backward if n.startswith("aten.mm")]) == 2 * 4 * 2 + (0 if triton else 2)
    if triton:  # the fused loss and the attention kernels ran, on bf16 operands (checked above)
        names = {name for name, _ in forward}
        assert "relscale.linear_cross_entropy_fwd_.default" in names
        assert "relscale.flash_attn_varlen_fwd.default" in names
        assert "relscale.flash_attn_varlen_bwd.default" in {name for name, _ in backward}
    # The activations themselves are bf16, not cast back and forth around each matmul.
    assert seen == dict(branch=torch.bfloat16, residual=torch.bfloat16, norm=torch.bfloat16,
                        hidden=torch.bfloat16, loss=torch.float32)


def test_unfused_loss_path_is_bf16_too():
    trace, _ = _step(_model(fused_loss=False))
    _assert_all_bf16(trace.gemms("forward") + trace.gemms("backward"))


def test_without_autocast_the_step_stays_fp32():
    # The control: the same trace without autocast sees fp32 matmuls, so the check above can fail.
    model = _model()
    tokens = torch.randint(0, V, (2, S))
    with DtypeTrace() as trace:
        model(tokens, tokens).backward()
    gemms = trace.gemms("forward")
    assert gemms and all(d == torch.float32 for _, dts in gemms for d in dts)
