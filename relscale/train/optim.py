"""AdamW, its hyper-parameters (including Marin's preset) and learning-rate schedules.

Weight decay: every matrix (attention, MLP, the input embedding and the output head) is decayed,
as in Marin; norm gains (1-D) are not, since pulling a gain towards 0 only fights the norm.

Schedules are pure functions of the step (0-based: the lr of optimizer step ``step``), so a
resumed run recomputes exactly the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from relscale.config import OptimConfig


@dataclass(frozen=True)
class AdamWSettings:
    """The hyper-parameters a run actually uses, after any preset."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip: float


def marin_beta2(global_batch: int) -> float:
    """Marin's batch-size-dependent beta2: 0.98 at 128 sequences, so that the averaging horizon
    measured in sequences stays the same as the batch changes."""
    return 0.98 ** (global_batch / 128)


def resolve_settings(cfg: OptimConfig, global_batch: int) -> AdamWSettings:
    """``preset = "marin"`` replaces beta1/beta2/eps/weight decay/clip; lr always comes from cfg."""
    if cfg.preset == "marin":
        return AdamWSettings(
            lr=cfg.lr, beta1=0.95, beta2=marin_beta2(global_batch), eps=1e-15, weight_decay=0.1, grad_clip=1.0
        )
    return AdamWSettings(
        lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
    )


def build_optimizer(model: torch.nn.Module, settings: AdamWSettings, device_type: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        fused=device_type == "cuda",  # one kernel for all parameters; the CPU path is the default
    )


def warmup_steps(cfg: OptimConfig, steps: int) -> int:
    return round(cfg.warmup * steps)


def lr_at(cfg: OptimConfig, step: int, steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``steps`` steps.

    Warm-up: linear from 0, ``lr * (step + 1) / warmup`` over the first ``round(warmup * steps)``
    steps (so the first step is not wasted at lr 0). Then:
      * ``constant``: lr.
      * ``wsd``: lr until the last ``round(decay * steps)`` steps, which decay linearly to
        ``min_lr_ratio * lr``, reached at the last step.
      * ``cosine``: half a cosine from lr after warm-up to ``min_lr_ratio * lr`` at the last step.
    """
    if not 0 <= step < steps:
        raise ValueError(f"step {step} outside a run of {steps} steps")
    warm = warmup_steps(cfg, steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    floor = cfg.min_lr_ratio * cfg.lr
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay = round(cfg.decay * steps)
        start = steps - decay  # first decaying step
        if decay == 0 or step < start:
            return cfg.lr
        progress = (step - start + 1) / decay  # 1 at the last step
        return cfg.lr + (floor - cfg.lr) * progress
    if cfg.schedule == "cosine":
        span = steps - warm
        progress = (step - warm + 1) / span  # 1 at the last step
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
