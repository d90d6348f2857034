"""A 30-step training run of a tiny model on the Triton kernels matches the torch-reference run.

Both runs start from the same weights and see the same token sequences; only the backends of the ops
owned by the kernels room differ (RMSNorm, cross-entropy / fused linear cross-entropy). In fp32 the
per-step losses must agree to ~1e-4 relative: a wrong gradient anywhere would make the runs drift
apart within a few AdamW steps.
"""

import pytest
import torch

from relscale.config import KernelConfig, ModelConfig
from relscale.model import Transformer

STEPS, BATCH, SEQ, VOCAB = 30, 2, 16, 97
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter


def _train(backend: str, fused_loss: bool, init_state: dict, data: torch.Tensor) -> list[float]:
    kernels = KernelConfig(
        rms_norm=backend, rope="torch", swiglu="torch", attention="torch", cross_entropy=backend
    )
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden=32,
        layers=2,
        heads=4,
        max_seq_len=SEQ,
        fused_loss=fused_loss,
        z_loss=1e-4,
        kernels=kernels,
    )
    model = Transformer(cfg).to(DEVICE)
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(data.shape[0]):
        tokens = data[step].to(DEVICE)
        targets = tokens.roll(-1, dims=1)
        targets[:, -1] = -100  # the usual shifted targets: nothing to predict after the last token
        loss = model(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fused_loss", [True, False], ids=["fused_linear_ce", "cross_entropy"])
def test_training_with_kernels_matches_torch_reference(fused_loss):
    torch.manual_seed(0)
    reference_cfg = ModelConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=4, max_seq_len=SEQ)
    init_state = {k: v.clone() for k, v in Transformer(reference_cfg).state_dict().items()}
    # Learnable data: every sequence follows x -> (5 x + 3) mod V from a random start.
    starts = torch.randint(0, VOCAB, (STEPS, BATCH, 1), generator=torch.Generator().manual_seed(1))
    data = starts.clone()
    for _ in range(SEQ - 1):
        data = torch.cat((data, (5 * data[..., -1:] + 3) % VOCAB), dim=-1)

    reference = _train("torch", fused_loss, init_state, data)
    kernels = _train("triton", fused_loss, init_state, data)

    assert reference[-1] < reference[0] - 0.1, "the reference run should learn something"
    torch.testing.assert_close(torch.tensor(kernels), torch.tensor(reference), rtol=1e-4, atol=0.0)
