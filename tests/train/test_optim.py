"""Learning-rate schedules and optimizer settings against values worked out by hand; C-AdamC against
an independent float64 implementation of the published update rule."""

import math
import re

import pytest
import torch

from relscale.config import KernelConfig, ModelConfig, OptimConfig, TrainConfig, load_train_config, to_dict
from relscale.errors import ConfigError
from relscale.model import Transformer
from relscale.train.optim import CautiousAdamC, build_optimizer, lr_at, marin_beta2, set_lr


def test_wsd_by_hand():
    cfg = OptimConfig(lr=1.0, schedule="wsd", warmup=0.1, decay=0.2, min_lr_ratio=0.1)
    values = [lr_at(cfg, step, 20) for step in range(20)]
    # warm-up: 2 steps (0.1 * 20) reaching lr at the 2nd; decay: the last 4 steps, linear to 0.1.
    expected = [0.5, 1.0] + [1.0] * 14 + [1 - 0.9 * k / 4 for k in (1, 2, 3, 4)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[-1] == pytest.approx(0.1)


def test_cosine_by_hand():
    cfg = OptimConfig(lr=2.0, schedule="cosine", warmup=0.25, min_lr_ratio=0.0)
    values = [lr_at(cfg, step, 8) for step in range(8)]
    # warm-up: 2 steps (1.0, 2.0); then 6 steps along half a cosine, progress k/6 for k = 1..6.
    expected = [1.0, 2.0] + [1.0 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 7)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[-1] == pytest.approx(0.0, abs=1e-12)


def test_levanter_linear_schedule_by_hand():
    """Levanter's "linear" schedule as Marin ran it (optax schedules at update counts 0..N-1):
    W = int(0.1 * 20) = 2 warm-up steps lr * c / W, D = int(0.2 * 20) = 4 decay steps
    lr - (lr - 0.1 lr) * k / D for k = 0..3, the stable phase in between."""
    cfg = OptimConfig(lr=1.0, schedule="wsd_levanter", warmup=0.1, decay=0.2, min_lr_ratio=0.1)
    values = [lr_at(cfg, step, 20) for step in range(20)]
    expected = [0.0, 0.5] + [1.0] * 14 + [1.0, 0.775, 0.55, 0.325]
    assert values == pytest.approx(expected, abs=1e-12)
    # 25 steps: int(2.5) = 2 warm-up steps and int(5.0) = 5 decay steps.
    values = [lr_at(cfg, step, 25) for step in range(25)]
    assert values[:3] == [0.0, 0.5, 1.0] and values[19] == 1.0 and values[20:] == pytest.approx(
        [1 - 0.9 * k / 5 for k in range(5)], abs=1e-12)


def test_constant_and_bounds():
    cfg = OptimConfig(lr=0.3, schedule="constant", warmup=0.0)
    assert [lr_at(cfg, s, 5) for s in range(5)] == [0.3] * 5
    with pytest.raises(ValueError, match="step 5"):
        lr_at(cfg, 5, 5)


def test_marin_preset_resolves_when_the_config_is_built(monkeypatch):
    assert marin_beta2(128) == pytest.approx(0.98)
    assert marin_beta2(256) == pytest.approx(0.9604)  # 0.98^2
    assert marin_beta2(32) == pytest.approx(0.98**0.25)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_train_config(None, ["optim.preset='marin'", "optim.lr=4e-3", "micro_batch=16", "grad_accum=4"])
    o = cfg.optim
    assert (o.preset, o.name, o.lr, o.beta1, o.eps, o.weight_decay, o.grad_clip) == (
        "none", "c_adamc", 4e-3, 0.95, 1e-15, 0.1, 1.0
    )
    assert o.beta2 == pytest.approx(0.98 ** (64 / 128))  # B = 16 x 4 sequences
    # The stored config carries the values used; rebuilt from it, nothing changes again.
    assert TrainConfig(**{**vars(cfg)}) == cfg and to_dict(cfg)["optim"]["beta2"] == o.beta2
    # Under torchrun the global batch counts every process.
    monkeypatch.setenv("WORLD_SIZE", "4")
    four = load_train_config(None, ["optim.preset='marin'", "micro_batch=16", "grad_accum=4"])
    assert four.optim.beta2 == pytest.approx(0.98 ** (256 / 128))
    # A key set to a value other than the preset's is refused, naming it; the preset's own value is fine.
    with pytest.raises(ConfigError, match=r"optim.beta1: 0.5 conflicts with optim.preset='marin'"):
        load_train_config(None, ["optim.preset='marin'", "optim.beta1=0.5"])
    assert load_train_config(None, ["optim.preset='marin'", "optim.eps=1e-15"]).optim.eps == 1e-15
    plain = OptimConfig(beta1=0.5, beta2=0.7, eps=1e-3, weight_decay=0.0, grad_clip=0.0)
    assert TrainConfig(optim=plain).optim == plain  # no preset: untouched


def test_eval_tokens_and_the_legacy_eval_batches():
    assert TrainConfig().eval_tokens == 2**16
    legacy = TrainConfig(eval_batches=3, micro_batch=4)
    assert (legacy.eval_tokens, legacy.eval_batches) == (3 * 4 * 128, None)
    assert legacy.eval_windows == 12
    assert TrainConfig(eval_tokens=129).eval_windows == 2  # ceil(129 / 128)
    with pytest.raises(ConfigError, match="eval_batches: give eval_tokens or the legacy eval_batches"):
        load_train_config(None, ["eval_tokens=100", "eval_batches=2"])


def test_weight_decay_on_matrices_not_on_norms():
    model = Transformer(ModelConfig(vocab_size=50, hidden=16, layers=1, heads=2))
    cfg = OptimConfig(beta1=0.95, beta2=marin_beta2(128), eps=1e-15, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg, "cpu")
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} == {n for n in names.values() if n.endswith("norm.weight")}
    assert "embed.weight" in {names[id(p)] for p in decayed["params"]}
    assert optimizer.defaults["betas"] == (0.95, pytest.approx(0.98)) and optimizer.defaults["eps"] == 1e-15
    assert not optimizer.defaults["fused"]  # fused AdamW is for CUDA
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    assert all(isinstance(p, torch.nn.Parameter) for p in decayed["params"])


def test_c_adamc_groups_follow_levanter():
    """One group per parameter kind across the blocks (Levanter's scanned layer stack), weight
    decay on every matrix except the token embedding, none on norm gains."""
    model = Transformer(ModelConfig(vocab_size=50, hidden=16, layers=3, heads=2))
    optimizer = build_optimizer(model, OptimConfig(name="c_adamc", weight_decay=0.1), "cpu")
    assert isinstance(optimizer, CautiousAdamC)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [names[id(p)] for p in groups["blocks.*.attn.wq.weight"]["params"]] == [
        f"blocks.{i}.attn.wq.weight" for i in range(3)
    ]
    decayed = {n for g in optimizer.param_groups if g["weight_decay"] > 0 for n in [g["name"]]}
    assert "embed.weight" not in decayed and "output.weight" in decayed
    assert decayed == {n for n in groups if n not in ("embed.weight",) and not n.endswith("norm.weight")}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------------
# C-AdamC against the published update rule, written out here in float64 from the papers:
#   Adam moments with bias correction (Kingma & Ba 2015); the cautious mask phi = 1[u*g > 0],
#   normalised by its mean (Liang et al. 2024, as Levanter's scale_by_cautious: u*phi/(mean+eps),
#   the mean over a layer stack); AdamC decay wd * lr_t / lr_max (Defazio et al. 2025); gradients
#   clipped to global norm 1 first.


def _reference_step(params, grads, state, t, lr, lr_max, betas, eps, wd, clip, decayed, stack_of):
    beta1, beta2 = betas
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    factor = min(1.0, clip / (norm + 1e-6))
    directions, masks = {}, {}
    for name, g in grads.items():
        g = g * factor
        m, v = state.setdefault(name, (torch.zeros_like(g), torch.zeros_like(g)))
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        state[name] = (m, v)
        u = (m / (1 - beta1**t)) / (torch.sqrt(v / (1 - beta2**t)) + eps)
        directions[name], masks[name] = u, (u * g > 0).double()
    ones, sizes = {}, {}
    for name, phi in masks.items():
        ones[stack_of[name]] = ones.get(stack_of[name], 0.0) + float(phi.sum())
        sizes[stack_of[name]] = sizes.get(stack_of[name], 0) + phi.numel()
    for name, x in params.items():
        mean = ones[stack_of[name]] / sizes[stack_of[name]]
        update = directions[name] * masks[name] / (mean + eps)
        decay = wd * (lr / lr_max) if name in decayed else 0.0
        params[name] = x - lr * (update + decay * x)


@pytest.mark.parametrize("foreach, chunk", [(False, None), (True, None), (True, 300)],
                         ids=["loop", "foreach", "foreach-chunked"])
def test_c_adamc_matches_the_published_rule_in_float64(foreach, chunk):
    torch.manual_seed(0)
    torch_ops = KernelConfig(rms_norm="torch", rope="torch", swiglu="torch", attention="torch",
                             cross_entropy="torch")
    model_cfg = ModelConfig(vocab_size=64, hidden=16, layers=2, heads=2, max_seq_len=16, fused_loss=False,
                            kernels=torch_ops)  # the torch reference ops run in float64
    model = Transformer(model_cfg).double()
    optim_cfg = TrainConfig(optim=OptimConfig(preset="marin", lr=2e-2, warmup=0.2, decay=0.3),
                            micro_batch=32).optim
    optimizer = build_optimizer(model, optim_cfg, "cpu")
    optimizer.foreach = foreach
    if chunk is not None:  # temporaries a few tensors at a time: the same update
        optimizer.chunk_elements = chunk
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stack_of = {n: re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in params}
    decayed = {n for n, p in params.items() if p.ndim >= 2 and n != "embed.weight"}
    state: dict = {}
    steps = 20
    for step in range(steps):
        tokens = torch.randint(0, 64, (4, 16))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        lr = lr_at(optim_cfg, step, steps)
        _reference_step(params, grads, state, step + 1, lr, optim_cfg.lr, (optim_cfg.beta1, optim_cfg.beta2),
                        optim_cfg.eps, optim_cfg.weight_decay, optim_cfg.grad_clip, decayed, stack_of)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = 0.0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[name], rtol=1e-6, atol=1e-12, msg=name)
        moved = max(moved, float((p.detach() - params[name]).abs().max()))
    # The rule is not plain AdamW: the same 20 steps with AdamW land elsewhere.
    torch.manual_seed(0)
    plain = Transformer(model_cfg).double()
    adamw = build_optimizer(plain, OptimConfig(lr=2e-2, warmup=0.2, decay=0.3, beta1=0.95,
                                               beta2=optim_cfg.beta2, eps=1e-15), "cpu")
    for step in range(steps):
        tokens = torch.randint(0, 64, (4, 16))
        plain(tokens[:, :-1], tokens[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        set_lr(adamw, lr_at(optim_cfg, step, steps))
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    gap = max(float((p.detach() - params[n]).abs().max()) for n, p in plain.named_parameters())
    assert gap > 1e-3 > moved


def test_c_adamc_normalises_the_mask_over_the_group():
    """One tensor, gradients chosen by hand. Step 1: m/(1-b1) = g and sqrt(v/(1-b2)) = |g|, so
    u = sign(g), the mask keeps everything and x moves by -lr * sign(g). Step 3's gradient opposes
    the momentum on the first two coordinates: only the other two move, by lr * u / mean(mask) =
    lr * u / 0.5."""
    x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = CautiousAdamC([x], lr=0.1, betas=(0.5, 0.5), eps=1e-15, weight_decay=0.0)
    m = torch.zeros(4, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    gradients = [[1.0, -2.0, 3.0, -4.0], [1.0, -2.0, -30.0, 40.0], [-0.1, 0.1, -1.0, 1.0]]
    expected_masks = [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    for t, (grad, mask) in enumerate(zip(gradients, expected_masks, strict=True), start=1):
        g = torch.tensor(grad, dtype=torch.float64)
        m, v = 0.5 * m + 0.5 * g, 0.5 * v + 0.5 * g * g
        u = (m / (1 - 0.5**t)) / (torch.sqrt(v / (1 - 0.5**t)) + 1e-15)
        phi = (u * g > 0).double()
        assert phi.tolist() == mask
        if t == 1:
            torch.testing.assert_close(u, torch.sign(g))
        before = x.detach().clone()
        x.grad = g.clone()
        opt.step()
        torch.testing.assert_close(x.detach(), before - 0.1 * u * phi / (phi.mean() + 1e-15))
    assert x.detach()[0] == before[0] and x.detach()[2] != before[2]
