"""Named sweep presets (``relscale grid --preset NAME``) and a preset sized to the hardware.

* ``marin``: the rule of Marin's IsoFLOP sweeps behind the 255 released checkpoints of
  "Relative Scaling Laws for LLMs" (see relscale/sweep/grid.py for the rule and its source),
  trained with the suite's recipe: a Qwen3-style decoder (QK-norm, untied embeddings, RMSNorm
  eps 1e-5), Llama-3 RoPE (theta 500000; llama3 scaling with factor 8, low/high frequency
  factors 1/4, original context 8192), C-AdamC (``optim.name = "c_adamc"``: Cautious AdamW with
  AdamC weight decay; beta1 0.95, beta2 = 0.98^(B/128), eps 1e-15, weight decay 0.1, clip 1.0),
  10% warm-up and a linear decay towards 0 over the last 20%, step for step as Levanter's
  "linear" schedule (``optim.schedule = "wsd_levanter"``). The three datasets are placeholders
  for the paper's three pretraining corpora; point their paths at prepared copies.
  Remaining differences from the paper's suite (Marin's Levanter runs):
  - initialisation is relscale's (normal, std ``model.init_std`` = 0.02, residual outputs scaled
    by 1/sqrt(2L)), not haliax's default initialisers;
  - gradient clipping divides by (norm + 1e-6) (torch), optax by the norm;
  - validation: a fixed ``eval_tokens`` of held-out windows of the prepared data, not Marin's
    validation sets (the paper's scores come from separate evaluations: ``relscale eval``).
* ``tiny``: the same rule scaled down so a whole sweep (3 budgets x 4 widths, 12 runs) trains in
  a few minutes on a 2-core CPU on the default corpus (``relscale prepare --out
  relscale_data/sotu``), with the same optimizer recipe (C-AdamC) and plain RoPE (theta 10000:
  at sequences of 128 the llama3 scaling would only touch frequencies the runs never resolve).
  Its budgets were chosen by timing the trainer there: the 12 runs took
  about 2 minutes with one torch thread (``--threads 1``) while other jobs shared the cores; the
  largest run (d=32 at 1e11) 20-40 s. At such budgets the loss-optimal width sits at the
  narrow end (at 1e11 d=32 wins clearly; at 3e10 d=32..96 are within 0.02 nats): an optimum
  inside the width range needs ~10x larger budgets, i.e. tens of minutes on this CPU.

The shipped presets exist once, as TOML in the package (``relscale/configs/sweeps/marin.toml``,
``tiny.toml``, commented key by key); :func:`marin` and :func:`tiny` load those files.
``gpu-small`` (the GPU shape of :func:`preset_for_hardware`) is defined here only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

from relscale.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from relscale.errors import ConfigError
from relscale.sweep.spec import (
    BatchRule,
    Beta2Rule,
    DatasetSpec,
    DepthRule,
    LRRule,
    SweepConfig,
    WidthRule,
)

DEFAULT_DATA = "relscale_data/sotu"


def _marin_optim() -> OptimConfig:
    """Marin's C-AdamC (Levanter ``CautiousConfig(adamc_weight_decay=True)``): beta1 0.95, eps
    1e-15, weight decay 0.1, clip 1, 10% warm-up, linear decay over the last 20% towards 0, on
    Levanter's own step convention (``wsd_levanter``). beta2 and lr come from the grid."""
    return OptimConfig(name="c_adamc", beta1=0.95, eps=1e-15, weight_decay=0.1, grad_clip=1.0,
                       schedule="wsd_levanter", warmup=0.1, decay=0.2, min_lr_ratio=0.0)


def _shipped(name: str) -> SweepConfig:
    """The validated sweep config shipped as ``relscale/configs/sweeps/<name>.toml``."""
    from relscale.config import packaged_configs
    from relscale.sweep.spec import load_sweep_config

    return load_sweep_config(packaged_configs("sweep")[name])


def marin() -> SweepConfig:
    """Marin's IsoFLOP sweep (see the module docstring), from the shipped ``marin.toml``."""
    return _shipped("marin")


def _small_train(seq_len: int, ckpt_interval: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(qk_norm=True, tie_embeddings=False),
        data=DataConfig(path=DEFAULT_DATA, seq_len=seq_len),
        optim=_marin_optim(),
        seed=0,
        ckpt_interval=ckpt_interval,
        eval_interval=0,
        eval_tokens=64 * seq_len,
        log_interval=10,
        progress=False,
    )


def tiny() -> SweepConfig:
    """Marin's rule at CPU scale, from the shipped ``tiny.toml``: widths 32..128 (head dim 16),
    sequences of 128, budgets measured to make the whole sweep a few minutes on 2 cores. The depth
    formula keeps Marin's slope with a smaller base (16) so the narrowest models still get a layer
    or two; the LR cap is raised to 0.03 since tiny models train stably at higher rates and Marin's
    0.01 would leave no batch >= 1 for the narrow widths; the minimum batch is one sequence so
    every budget has 4 widths."""
    return _shipped("tiny")


PRESETS: dict[str, Callable[[], SweepConfig]] = {"marin": marin, "tiny": tiny}


def get_preset(name: str) -> SweepConfig:
    """The validated sweep preset ``name`` (``marin``, ``tiny``); ConfigError naming ``--preset``
    and the known names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    cfg = PRESETS[name]()
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# A sweep sized to the hardware at hand


def gpu_small() -> SweepConfig:
    """The GPU counterpart of ``tiny``: Marin's rule unchanged (depth formula, LR 0.33*sqrt(B)/d
    capped at 0.01, B >= 8) on widths 128..768 and sequences of 512; budgets are set by
    :func:`preset_for_hardware`."""
    return SweepConfig(
        name="gpu-small",
        budgets=[1e13],
        flop_convention="marin",
        seq_len=512,
        vocab_size=None,
        head_dim=64,
        mlp_ratio=4,
        target_steps=1000,
        width=WidthRule(min=128, max=768, step=128),
        depth=DepthRule(rule="marin"),
        batch=BatchRule(rule="marin", min=8),
        lr=LRRule(rule="marin", constant=0.33, max=0.01),
        beta2=Beta2Rule(rule="marin"),
        datasets=[DatasetSpec(name="sotu", path=DEFAULT_DATA)],
        train=_small_train(512, ckpt_interval=200),
    )


def estimate_seconds(cfg: SweepConfig, vocab_size: int, train_flops_per_s: float, fixed_s: float) -> float:
    """Estimated wall time of a whole sweep: each run's training FLOPs at the given rate plus a
    fixed cost per run (start-up, evaluation, saving)."""
    from relscale.sweep.grid import build_grid

    runs = build_grid(cfg, {ds.name: vocab_size for ds in cfg.datasets})
    return sum(run.flops_train / train_flops_per_s + fixed_s for run in runs)


def measure_train_flops_per_s(device: str, hidden: int = 64, layers: int = 2, head_dim: int = 16,
                              seq: int = 128, batch: int = 8, vocab_size: int = 4096,
                              seconds: float = 2.0) -> float:
    """Training FLOP/s (flops_train convention) of one model shape on ``device``, timed here."""
    import torch

    from relscale.counting import flops_per_token_train
    from relscale.model import Transformer

    dev = torch.device(device)
    model_cfg = ModelConfig(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=hidden // head_dim,
                            max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(model_cfg).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab_size, (batch, seq), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(tokens, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or steps < 2:
        step()
        steps += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return flops_per_token_train(model_cfg, seq) * batch * seq * steps / elapsed


def measure_with_trainer(cfg: SweepConfig, device: str, hidden: int, steps: int = 30,
                         batch: int = 8) -> float:
    """Training FLOP/s of the real training loop (data loading, document masking, optimizer) for
    one width of ``cfg``, between its first and last optimizer step, on its first dataset."""
    import tempfile

    from relscale.counting import flops_per_token_train
    from relscale.data import PreparedData
    from relscale.train import train

    data = PreparedData(cfg.datasets[0].path)
    model = ModelConfig(vocab_size=data.vocab_size, hidden=hidden, layers=cfg.depth.layers_for(hidden),
                        heads=hidden // cfg.head_dim, mlp_hidden=cfg.mlp_ratio * hidden,
                        max_seq_len=cfg.seq_len)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        run = TrainConfig(model=model, data=DataConfig(path=cfg.datasets[0].path, seq_len=cfg.seq_len),
                          steps=steps, micro_batch=batch, out_dir=out, device=device, progress=False,
                          eval_tokens=batch * cfg.seq_len, log_interval=steps)
        train(run, data=data, on_step=lambda done, _: stamps.append(time.perf_counter()))
    tokens = (len(stamps) - 1) * batch * cfg.seq_len
    return flops_per_token_train(model, cfg.seq_len) * tokens / (stamps[-1] - stamps[0])


def _measured_rate(cfg: SweepConfig, device: str, vocab_size: int) -> float:
    """The harmonic mean of the rates of the narrowest and widest model: every width gets the
    same budget, so the time of a budget is its FLOPs over this mean (narrow models, bound by
    per-step overheads, run at a fraction of the wide ones' rate). Timed through the trainer
    on the prepared data when it exists, else on the bare model."""
    rates = []
    for hidden in (cfg.width.min, cfg.width.max):
        if _train_tokens(cfg) is not None:
            rates.append(measure_with_trainer(cfg, device, hidden))
        else:
            rates.append(measure_train_flops_per_s(
                device, hidden=hidden, layers=cfg.depth.layers_for(hidden), head_dim=cfg.head_dim,
                seq=cfg.seq_len, batch=8, vocab_size=vocab_size))
    return len(rates) / sum(1.0 / r for r in rates)


def _vocab_size(cfg: SweepConfig) -> int | None:
    try:
        from relscale.data import PreparedData

        return PreparedData(cfg.datasets[0].path).vocab_size
    except Exception:  # noqa: BLE001 -- no prepared data (yet)
        return None


def _train_tokens(cfg: SweepConfig) -> int | None:
    try:
        from relscale.data import PreparedData

        return PreparedData(cfg.datasets[0].path).n_tokens("train")
    except Exception:  # noqa: BLE001 -- no prepared data (yet): no cap on epochs
        return None


def preset_for_hardware(device: str, minutes: float, *, train_flops_per_s: float | None = None,
                        fixed_s: float | None = None, vocab_size: int | None = None, n_budgets: int = 3,
                        budget_ratio: float = 3.0, train_tokens: int | None = None,
                        max_epochs: float = 4.0, shape: SweepConfig | None = None) -> SweepConfig:
    """A tiny-like sweep whose whole run takes about ``minutes`` on ``device`` ("cpu" or "cuda").

    The shape rule is ``tiny`` on the CPU and ``gpu_small`` on a GPU; the budgets are a
    geometric ladder (``budget_ratio`` apart) whose base is solved for so that the estimated
    time (:func:`estimate_seconds`) matches. ``train_flops_per_s`` is measured on the device
    when not given (a few seconds); ``fixed_s`` is the cost per run besides its FLOPs;
    ``vocab_size`` is the prepared default data's when not given (else 4096).
    No run may see more than ``max_epochs`` passes over the data (``train_tokens``: the
    training split's size, read from the prepared default data when not given), since repeated
    data would bend the IsoFLOP curves; on a fast device that, not the time, may bound the budgets.
    ``shape`` replaces the preset that gives the shape rule (its budgets are replaced).
    """
    if minutes <= 0:
        raise ConfigError(f"minutes: {minutes} must be positive")
    on_gpu = device.startswith("cuda")
    device = "cuda" if on_gpu else "cpu"
    cfg = shape if shape is not None else (gpu_small() if on_gpu else tiny())
    if vocab_size is None:
        vocab_size = _vocab_size(cfg) or 4096
    rate = train_flops_per_s if train_flops_per_s is not None else _measured_rate(cfg, device, vocab_size)
    fixed = fixed_s if fixed_s is not None else (3.0 if on_gpu else 2.0)
    target = 60.0 * minutes

    def sized(base: float) -> SweepConfig:
        out = copy.deepcopy(cfg)
        out.budgets = [float(f"{base * budget_ratio**i:.2g}") for i in range(n_budgets)]
        # Runs of a few dozen steps can miss an arbitrary budget by over 1% from rounding the
        # steps alone; 2% keeps every width (the tiny preset's budgets were picked to fit 1%).
        out.flop_tolerance = max(out.flop_tolerance, 0.02)
        return out

    # The estimate grows with the base budget (more FLOPs; runs appear as batches reach the
    # minimum): bisect on log(base) between budgets far too small and far too large.
    tokens = train_tokens if train_tokens is not None else _train_tokens(cfg)
    cap = None if tokens is None else max_epochs * tokens

    def too_big(base: float) -> bool:
        from relscale.sweep.grid import build_grid

        sweep = sized(base)
        if cap is not None and any(r.tokens > cap for r in build_grid(sweep, {"sotu": vocab_size})):
            return True
        return estimate_seconds(sweep, vocab_size, rate, fixed) > target

    lo, hi = 1e6, 1e22
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if too_big(mid):
            hi = mid
        else:
            lo = mid
    out = sized(lo)
    out.name = f"{cfg.name}-{'gpu' if on_gpu else 'cpu'}-{minutes:g}min"
    out.validate()
    return out
