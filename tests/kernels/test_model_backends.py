"""The model with every op routed to our kernels equals the torch-reference model, with packed
documents (document-masked attention) and GQA: loss, per-token losses and every gradient."""

import pytest
import torch

from relscale.config import KernelConfig, ModelConfig
from relscale.model import Transformer


def _model(kernels: KernelConfig) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, hidden=32, layers=2, heads=4, kv_heads=2, max_seq_len=64,
                      kernels=kernels)
    return Transformer(cfg)


@pytest.mark.parametrize("fused_loss", [True, False])
def test_all_kernel_backends_match_the_torch_reference(fused_loss):
    from relscale import ext

    custom = "cuda" if ext.available() else "torch"
    reference = _model(KernelConfig(*(["torch"] * 5)))
    ours = _model(KernelConfig(rms_norm="triton", rope=custom, swiglu=custom, attention="triton",
                               cross_entropy="triton"))
    reference.cfg.fused_loss = ours.cfg.fused_loss = fused_loss
    torch.manual_seed(1)
    tokens, targets = torch.randint(0, 61, (2, 23)), torch.randint(0, 61, (2, 23))
    # Documents [0,5) [5,23) in row 0 and [23,30) [30,46) in row 1: boundaries inside tiles.
    cu_seqlens = torch.tensor([0, 5, 23, 30, 46], dtype=torch.int32)
    positions = torch.cat([torch.arange(5), torch.arange(18), torch.arange(7), torch.arange(16)]).view(2, 23)
    kwargs = dict(positions=positions, cu_seqlens=cu_seqlens, max_seqlen=23)
    losses = []
    for model in (reference, ours):
        loss = model(tokens, targets, **kwargs)
        loss.backward()
        per_token = model(tokens, targets, reduction="none", **kwargs)
        losses.append((loss.detach(), per_token.detach()))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-5, atol=1e-5)
    for (name, p_ref), (_, p_ours) in zip(reference.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
