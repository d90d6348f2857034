"""Optimizers (AdamW, C-AdamC) and learning-rate schedules.

``optim.name = "adamw"`` (the default) is torch's AdamW. Weight decay: every matrix (attention,
MLP, the input embedding and the output head) is decayed; norm gains (1-D) are not, since pulling
a gain towards 0 only fights the norm.

``optim.name = "c_adamc"`` is :class:`CautiousAdamC`, the optimizer of Marin's IsoFLOP suites
(Levanter's ``CautiousConfig`` with ``adamc_weight_decay=True``), including Levanter's default
weight-decay mask: matrices are decayed except the token embedding; norm gains are not.

Schedules are pure functions of the step (0-based: the lr of optimizer step ``step``), so a
resumed run recomputes exactly the same values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from relscale.config import OptimConfig, marin_beta2

__all__ = ["CautiousAdamC", "build_optimizer", "lr_at", "marin_beta2", "set_lr", "warmup_steps"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of a DTensor (a view), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _process_group(tensor: torch.Tensor) -> dist.ProcessGroup | None:
    """The group over which a DTensor is sharded (FSDP2: its 1-D mesh); None for a plain tensor."""
    mesh = getattr(tensor, "device_mesh", None)
    return None if mesh is None else mesh.get_group()


class CautiousAdamC(torch.optim.Optimizer):
    """Cautious AdamW with AdamC corrected weight decay ("C-AdamC").

    For each parameter x with (already clipped) gradient g, at step t = 1, 2, ... with learning
    rate lr_t (the schedule) and peak learning rate ``lr_max``:

        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2           (Adam; Kingma & Ba 2015)
        u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
        phi = 1[u * g > 0]                                           (cautious mask; Liang et al. 2024)
        c = u * phi / (mean(phi) + eps)                              mean over the whole param group
        x = x - lr_t * (c + weight_decay * (lr_t / lr_max) * x)      (AdamC; Defazio et al. 2025)

    This is Levanter's ``scale_by_cautious`` followed by ``add_decayed_weights(wd * lr_t / lr_max)``
    and ``scale(-lr_t)``. The mask is normalised by its mean over *all* elements of a parameter
    group, so the caller chooses the scope: one tensor per group gives the per-tensor rule of the
    paper; :func:`build_optimizer` groups the same parameter of every block, as Levanter's scanned
    layer stack does (one array per parameter kind for all layers).

    Distributed (FSDP2): parameters, gradients and states are DTensors; the arithmetic runs on the
    local shards and the mask counts are summed over ranks (one all-reduce per step), so mean(phi)
    is over the whole tensor, not the shard. ``foreach``: the multi-tensor path (torch._foreach_*);
    None takes it on CUDA and the per-tensor reference loop elsewhere. Both give the same update.
    (u, phi) are computed twice (to count, then to apply) rather than kept, a few tensors at a time
    (``chunk_elements``), so the extra memory stays bounded whatever the size of a layer stack.

    Groups: ``lr``, ``lr_max`` (> 0), ``betas``, ``eps``, ``weight_decay``. State per parameter:
    ``step`` (float64 scalar), ``exp_avg``, ``exp_avg_sq`` (like the parameter).
    """

    def __init__(self, params: Iterable[Any], lr: float, lr_max: float | None = None,
                 betas: tuple[float, float] = (0.95, 0.98), eps: float = 1e-15, weight_decay: float = 0.1,
                 foreach: bool | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas {betas} must lie in [0, 1)")
        defaults = dict(lr=lr, lr_max=lr if lr_max is None else lr_max, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if not group["lr_max"] > 0:
                raise ValueError(f"lr_max={group['lr_max']} must be positive")
        self.foreach = foreach
        # Temporaries (u, phi) live for at most this many elements at a time (besides one tensor
        # larger than it): 2^26 fp32 elements = 256 MiB each, whatever the size of a layer stack.
        self.chunk_elements = 2**26

    def _prepare(self, group: dict[str, Any]) -> tuple[list, list, list, list, float, float]:
        """The group's parameters with a gradient, their local gradients and moments (states made
        on first use, step counts advanced), and the bias corrections 1 - beta1^t, sqrt(1 - beta2^t)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CautiousAdamC does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            steps.append(int(state["step"].item()))
            params.append(p)
            grads.append(_local(p.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
        if len(set(steps)) > 1:
            raise RuntimeError(f"parameters of one group are at different steps {sorted(set(steps))}")
        t = steps[0] if steps else 1
        beta1, beta2 = group["betas"]
        return params, grads, exp_avgs, exp_avg_sqs, 1 - beta1**t, math.sqrt(1 - beta2**t)

    @staticmethod
    def _directions_loop(grads, exp_avgs, exp_avg_sqs, bc1, bc2_sqrt, eps):
        """(u, phi) per tensor: the bias-corrected Adam direction and the cautious mask (0/1)."""
        out = []
        for g, m, v in zip(grads, exp_avgs, exp_avg_sqs, strict=True):
            denom = v.sqrt().div_(bc2_sqrt).add_(eps)
            u = m.div(bc1).div_(denom)
            phi = (u * g).sign_().clamp_min_(0)
            out.append((u, phi))
        return out

    @staticmethod
    def _directions_foreach(grads, exp_avgs, exp_avg_sqs, bc1, bc2_sqrt, eps):
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(exp_avgs, bc1)
        torch._foreach_div_(u, denom)
        phi = torch._foreach_mul(u, grads)
        torch._foreach_sign_(phi)
        torch._foreach_clamp_min_(phi, 0)
        return list(zip(u, phi, strict=True))

    @torch.no_grad()
    def step(self, closure=None):
        """One C-AdamC update of every parameter with a gradient (see the class docstring);
        ``closure`` re-evaluates the loss as in torch.optim.Optimizer.step. Returns its loss or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if first is None:
            return loss
        foreach = self.foreach if self.foreach is not None else _local(first).device.type == "cuda"
        directions = self._directions_foreach if foreach else self._directions_loop

        # Pass 1: update the moments; count the mask's ones per group (this rank's elements).
        prepared, counts, sizes = [], [], []
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, bc1, bc2_sqrt = self._prepare(group)
            beta1, beta2 = group["betas"]
            if foreach and params:
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            else:
                for g, m, v in zip(grads, exp_avgs, exp_avg_sqs, strict=True):
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            count = torch.zeros((), dtype=torch.float64, device=_local(first).device)
            for part in _chunks(grads, self.chunk_elements):
                moments = _take(part, grads, exp_avgs, exp_avg_sqs)
                for _, phi in directions(*moments, bc1, bc2_sqrt, group["eps"]):
                    count += phi.sum(dtype=torch.float64)
            prepared.append((params, grads, exp_avgs, exp_avg_sqs, bc1, bc2_sqrt))
            counts.append(count)
            sizes.append(sum(p.numel() for p in params))  # a DTensor's numel is the whole tensor's
        totals = torch.stack(counts)
        group_pg = _process_group(first)
        if group_pg is not None:  # FSDP: the mask's mean over every shard of the tensor
            dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group_pg)
        totals = totals.tolist()

        # Pass 2: recompute (u, phi) from the new moments (cheaper in memory than keeping them)
        # and apply the normalised cautious update and the AdamC decay.
        for group, (params, grads, exp_avgs, exp_avg_sqs, bc1, bc2_sqrt), total, size in zip(
            self.param_groups, prepared, totals, sizes, strict=True
        ):
            if not params:
                continue
            lr, eps = group["lr"], group["eps"]
            scale = 1.0 / (total / size + eps)
            decay = 1.0 - lr * group["weight_decay"] * (lr / group["lr_max"])
            locals_ = [_local(p) for p in params]
            for part in _chunks(grads, self.chunk_elements):
                xs, *moments = _take(part, locals_, grads, exp_avgs, exp_avg_sqs)
                pairs = directions(*moments, bc1, bc2_sqrt, eps)
                if foreach:
                    us = [u for u, _ in pairs]
                    torch._foreach_mul_(us, [phi for _, phi in pairs])
                    if decay != 1.0:
                        torch._foreach_mul_(xs, decay)
                    torch._foreach_add_(xs, us, alpha=-lr * scale)
                else:
                    for x, (u, phi) in zip(xs, pairs, strict=True):
                        u.mul_(phi)
                        if decay != 1.0:
                            x.mul_(decay)
                        x.add_(u, alpha=-lr * scale)
                del pairs
        return loss


def _chunks(tensors: list[torch.Tensor], limit: int) -> list[list[int]]:
    """Indices of ``tensors`` in consecutive runs of at most ``limit`` elements (a larger tensor
    is a run of its own)."""
    runs: list[list[int]] = []
    size = limit
    for index, tensor in enumerate(tensors):
        if size + tensor.numel() > limit or not runs:
            runs.append([])
            size = 0
        runs[-1].append(index)
        size += tensor.numel()
    return runs


def _take(indices: list[int], *lists: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [[items[i] for i in indices] for items in lists]


_BLOCK = re.compile(r"^blocks\.\d+\.")


def _stack_name(name: str) -> str:
    """``blocks.3.attn.wq.weight`` -> ``blocks.*.attn.wq.weight``: one name per layer stack."""
    return _BLOCK.sub("blocks.*.", name)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``model``'s trainable parameters (``cfg.preset`` resolved).

    adamw: two groups (decayed matrices, undecayed gains), torch AdamW, fused on CUDA.
    c_adamc: one group per parameter kind across the blocks (the cautious mask's normalisation
    scope, see :class:`CautiousAdamC`); decay on matrices other than embeddings (Levanter's mask).
    """
    if cfg.preset != "none":
        raise ValueError(f"optim.preset={cfg.preset!r} is resolved when the TrainConfig is built")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "adamw":
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            fused=device_type == "cuda",  # one kernel for all parameters; the CPU path is the default
        )
    if cfg.name == "c_adamc":
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        stacks: dict[str, list[nn.Parameter]] = {}
        for name, param in named:
            stacks.setdefault(_stack_name(name), []).append(param)
        groups = []
        for name, params in stacks.items():
            decayed = params[0].ndim >= 2 and id(params[0]) not in embeddings
            groups.append({"params": params, "name": name,
                           "weight_decay": cfg.weight_decay if decayed else 0.0})
        return CautiousAdamC(groups, lr=cfg.lr, lr_max=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def warmup_steps(cfg: OptimConfig, steps: int) -> int:
    """Optimizer steps of linear warm-up: ``round(cfg.warmup * steps)``."""
    return round(cfg.warmup * steps)


def lr_at(cfg: OptimConfig, step: int, steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``steps`` steps.

    Warm-up: linear from 0, ``lr * (step + 1) / warmup`` over the first ``round(warmup * steps)``
    steps (so the first step is not wasted at lr 0). Then:
      * ``constant``: lr.
      * ``wsd``: lr until the last ``round(decay * steps)`` steps, which decay linearly to
        ``min_lr_ratio * lr``, reached at the last step.
      * ``cosine``: half a cosine from lr after warm-up to ``min_lr_ratio * lr`` at the last step.
      * ``wsd_levanter``: Levanter's ``lr_schedule="linear"`` with ``warmup``/``decay`` fractions, as
        Marin's IsoFLOP sweeps ran it (optax schedules evaluated at the update count, from 0):
        W = int(warmup * steps) warm-up steps at ``lr * step / W`` (so the first is at lr 0),
        D = int(decay * steps) decay steps at ``lr - (lr - floor) * k / D`` (k = 0..D-1: the
        floor is never reached), lr in between.
    """
    if not 0 <= step < steps:
        raise ValueError(f"step {step} outside a run of {steps} steps")
    if cfg.schedule == "wsd_levanter":
        return _levanter_linear(cfg, step, steps)
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


def _levanter_linear(cfg: OptimConfig, step: int, steps: int) -> float:
    warm, decay = int(cfg.warmup * steps), int(cfg.decay * steps)
    start = steps - decay  # first decaying step
    if step < warm:
        return cfg.lr * step / warm
    if decay == 0 or step < start:
        return cfg.lr
    floor = cfg.min_lr_ratio * cfg.lr
    return cfg.lr - (cfg.lr - floor) * (step - start) / decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
