"""The decoder: shapes, causality, document masking, GQA, tied embeddings, loss reductions."""

import pytest
import torch

from relscale.config import ModelConfig
from relscale.counting import param_counts
from relscale.model import Transformer

V, S = 97, 12


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden=32, layers=2, heads=4, max_seq_len=64, init_std=0.1)
    return Transformer(ModelConfig(**{**cfg, **overrides})).eval()


def _tokens(batch=2, seq=S, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_shapes():
    model, tokens = _model(), _tokens()
    assert model(tokens).shape == (2, S, V)
    assert model(tokens, tokens).shape == ()
    assert model(tokens, tokens, reduction="none").shape == (2, S)
    assert model.hidden_states(tokens).shape == (2, S, 32)


@torch.no_grad()
def test_causality_future_tokens_do_not_change_past_logits():
    model, tokens = _model(), _tokens()
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % V
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-3  # the change is visible from there on


@torch.no_grad()
def test_document_masking_equals_running_each_document_alone():
    model = _model()
    docs = [_tokens(1, n, seed=n)[0] for n in (5, 4, 3, 7, 5)]
    # Two packed rows of 12: [5, 4, 3] and [7, 5]; positions restart at each document.
    rows = [torch.cat(docs[:3]), torch.cat(docs[3:])]
    tokens = torch.stack(rows)
    positions = torch.stack(
        [torch.cat([torch.arange(len(d)) for d in group]) for group in (docs[:3], docs[3:])]
    )
    cu_seqlens = torch.tensor([0, 5, 9, 12, 19, 24], dtype=torch.int32)
    packed = model(tokens, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=S).reshape(-1, V)
    alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Without the mask the later documents see the earlier ones: the test can tell the difference.
    unmasked = model(tokens, positions=positions).reshape(-1, V)
    assert (unmasked[5:9] - alone[5:9]).abs().max() > 1e-3


@torch.no_grad()
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa = _model(kv_heads=2)
    assert gqa.blocks[0].attn.wk.weight.shape == (2 * 8, 32)
    mha = _model(kv_heads=4)
    state = gqa.state_dict()
    for name, value in state.items():
        if name.endswith(("wk.weight", "wv.weight")):  # kv head j serves query heads 2j and 2j+1
            state[name] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens = _tokens()
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in gqa.parameters()) == param_counts(gqa.cfg).total


@torch.no_grad()
def test_tied_embeddings_share_one_matrix():
    model = _model(tie_embeddings=True)
    assert model.output.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == param_counts(model.cfg).total
    tokens = _tokens()
    logits = model.hidden_states(tokens) @ model.embed.weight.t()
    torch.testing.assert_close(model(tokens), logits)


@pytest.mark.parametrize("fused", [True, False])
def test_loss_reductions_agree_and_match_a_float64_reference(fused):
    model, tokens = _model(fused_loss=fused), _tokens()
    targets = torch.roll(tokens, -1, dims=1)
    targets[0, :4] = -100  # ignored
    per_token = model(tokens, targets, reduction="none")
    assert (per_token[0, :4] == 0).all()
    valid = targets != -100
    mean, total = model(tokens, targets), model(tokens, targets, reduction="sum")
    torch.testing.assert_close(mean, per_token[valid].mean())
    torch.testing.assert_close(total, per_token.sum())
    logits = model(tokens).double()
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(mean.double(), reference, rtol=1e-5, atol=1e-6)
    everything_ignored = torch.full_like(targets, -100)
    assert model(tokens, everything_ignored).item() == 0.0
