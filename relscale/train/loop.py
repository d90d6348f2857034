"""The training loop: one call of :func:`train` is one run, start to finish (or resume to finish).

Per optimizer step: ``grad_accum`` micro-batches per rank (global batch = micro_batch x
grad_accum x world size sequences), loss averaged over the global batch, gradient clipping on
the global norm, the optimizer (``optim.name``: AdamW or C-AdamC, relscale.train.optim), then
(in this order) the ``on_step`` hooks, metrics, validation and checkpoints. The trainer knows
nothing about evaluation: callers that want per-example dumps during training (``relscale train``,
the sweep workers) pass relscale.eval's dump hook as an ``on_step`` hook. A non-finite loss or
gradient norm stops the run *before* the optimizer step, so the weights and the last checkpoint
stay good; a non-finite validation loss ends it as diverged too, before any checkpoint of those
weights. Validation measures a fixed set of held-out windows (``eval_tokens``), the same for
every batch layout and world size.

A run holds ``out_dir/.lock`` (:func:`out_dir_lock`): a second trainer on the same out_dir
refuses to start (OutDirInUse) instead of overwriting the first's files.

Outputs in ``out_dir`` (rank 0 writes them; every rank writes its checkpoint shards), named by
:mod:`relscale.train.run_dir`: ``train_config.json`` (at the start), ``metrics.jsonl`` (one JSON
record per line, appended as training goes), ``checkpoints/step_XXXXXXX/`` (written under a
temporary name, then renamed), ``final/`` (safetensors, config and tokenizer, see relscale.model_io)
and ``result.json`` (the last three written atomically).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from relscale.atomic import atomic_write_text
from relscale.config import TrainConfig, to_dict
from relscale.counting import param_counts, run_flops
from relscale.errors import ConfigError, RelscaleError
from relscale.train import checkpoint as ckpt
from relscale.train import run_dir
from relscale.train.metrics import MetricsLog, finite_or_none, peak_flops, peak_memory_mb, progress_bar
from relscale.train.optim import build_optimizer, lr_at, set_lr
from relscale.train.parallel import DistEnv, all_reduce_sum, barrier, init_distributed, shard_model, teardown

if TYPE_CHECKING:
    from relscale.data import PreparedData

RESULT = run_dir.RESULT
METRICS = run_dir.METRICS
FINAL = run_dir.FINAL

OnStep = Callable[[int, nn.Module], None]
"""A hook ``on_step(steps_done, model)`` called after every optimizer step, on every rank."""


class TrainingDiverged(RelscaleError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before updating the weights."""

    def __init__(self, step: int, loss: float, detail: str = ""):
        self.step, self.loss = step, loss
        super().__init__(
            f"training diverged at step {step}: loss {loss}{detail}; the weights were not updated and "
            "the last good checkpoint is kept (try a lower optim.lr)"
        )


class NonFiniteValidationLoss(TrainingDiverged):
    """The validation loss was NaN/inf: the weights are not usable, so the run is not done."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        RelscaleError.__init__(
            self,
            f"validation loss is {loss} after step {step}: the weights give a non-finite loss on held-out "
            "text, so the run is not done (recorded as diverged; no checkpoint or model of these weights "
            "is written)",
        )


class OutDirInUse(RelscaleError):
    """Another training process holds the lock of this out_dir."""


LOCK = run_dir.LOCK


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, env: DistEnv):
    """Hold ``out_dir/.lock`` (an exclusive ``fcntl.flock``) for the run, so that a second trainer
    on the same out_dir refuses to start instead of unlinking the first's metrics. Rank 0 takes
    the lock and every rank learns the outcome. The kernel drops the lock when the process
    ends, however it ends (kill -9 included), so a crashed run never leaves it stuck.

    Raises OutDirInUse naming the out_dir and the holder's process id.
    """
    import fcntl
    import os
    import socket

    handle, held = None, 1.0
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / LOCK, "a+")  # noqa: SIM115 -- held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            handle, held = None, 0.0
            message = (f"out_dir: {out_dir} is in use by another training run ({holder} holds "
                       f"{out_dir / LOCK}); wait for it to end or choose another out_dir")
    if env.distributed:
        flag = torch.tensor([held], device=env.device)
        torch.distributed.broadcast(flag, src=0)
        held = float(flag.item())
    if not held:
        raise OutDirInUse(message if env.is_main else f"out_dir: {out_dir} is in use by another training run")
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


@dataclass
class TrainResult:
    """The outcome of one run, as stored in ``result.json`` (plus its ``fingerprint``).

    Losses are mean cross-entropy in nats per token (None when not measured or non-finite);
    ``tokens`` are training tokens (steps x global batch x seq_len); FLOPs are for the whole run
    in the two conventions of relscale.counting.run_flops; times in seconds; ``params`` counts
    every parameter, tied embeddings once."""

    status: str  # "done" | "diverged"
    final_train_loss: float | None
    final_val_loss: float | None
    steps: int
    tokens: int
    flops_train: float
    flops_marin: float
    wall_s: float
    time_to_first_step_s: float | None
    params: int
    non_embedding_params: int
    model_dir: str | None  # out_dir/final, None when diverged

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """From a ``result.json`` dict; keys it lacks are None, extra keys are ignored."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


def fingerprint(cfg: TrainConfig, global_batch: int) -> dict[str, Any]:
    """What determines a run's trajectory, as dotted keys. Resuming needs the same values.
    Left out: kernel backends, dtype/device, batch layout (same global batch), logging, paths."""
    flat: dict[str, Any] = {}
    for section in ("model", "data", "optim"):
        for key, value in to_dict(getattr(cfg, section)).items():
            if key not in ("kernels", "path"):
                flat[f"{section}.{key}"] = value
    flat.update(steps=cfg.steps, seed=cfg.seed, global_batch=global_batch)
    return flat


def _compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def train(
    cfg: TrainConfig,
    *,
    resume: bool = True,
    data: PreparedData | None = None,
    progress: bool | None = None,
    on_step: OnStep | Sequence[OnStep] | None = None,
) -> TrainResult:
    """Train one model as ``cfg`` says; see the module docstring.

    resume: continue from the latest checkpoint in ``cfg.out_dir`` (a finished run there is
        returned as it is); with False, an out_dir that holds a run is refused.
    data: an open :class:`relscale.data.PreparedData` of ``cfg.data.path`` to reuse.
    progress: show the tqdm bar (None: ``cfg.progress``); only rank 0 shows it.
    on_step: a hook or a list of hooks, each called in order as ``hook(steps_done, model)``
        after every optimizer step, on every rank (``model`` is the training module: FSDP-sharded
        under torchrun, so a hook that runs forward passes must run on every rank). The trainer
        attaches none of its own: ``cfg.dump_steps`` is acted on by the callers (relscale train,
        the sweep workers), which add relscale.eval's dump hook here.

    Raises ConfigError for a bad config or an out_dir that holds another run, DataError for
    unreadable data or checkpoints, OutDirInUse, TrainingDiverged (NonFiniteValidationLoss).
    """
    started = time.perf_counter()
    cfg.validate()
    hooks = _hook_list(on_step)
    env = init_distributed(cfg.device)
    try:
        with out_dir_lock(Path(cfg.out_dir).expanduser().resolve(), env):
            return _Run(cfg, env, started, resume, data, progress, hooks).run()
    finally:
        teardown(env)


def _hook_list(on_step: OnStep | Sequence[OnStep] | None) -> list[OnStep]:
    """``on_step`` as a list of callables; TypeError naming the argument for anything else."""
    if on_step is None:
        return []
    hooks = [on_step] if callable(on_step) else list(on_step)
    for hook in hooks:
        if not callable(hook):
            raise TypeError(f"on_step: {hook!r} is not callable (expected hook(steps_done, model))")
    return hooks


class _Run:
    """The state of one run; run() is the whole of it."""

    def __init__(
        self, cfg: TrainConfig, env: DistEnv, started: float, resume: bool,
        data: PreparedData | None, progress: bool | None, hooks: list[OnStep],
    ):
        self.cfg, self.env, self.started = cfg, env, started
        self.resume, self.hooks = resume, hooks
        self.out_dir = Path(cfg.out_dir).expanduser().resolve()
        self.show_progress = (cfg.progress if progress is None else progress) and env.is_main
        self.global_batch = cfg.micro_batch * cfg.grad_accum * env.world_size
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.fingerprint = fingerprint(cfg, self.global_batch)
        self.counts = param_counts(cfg.model)
        self.data = data
        self._val_batches = None

    # ----------------------------------------------------------------------------- set-up
    def _finished_result(self) -> TrainResult | None:
        stored = run_dir.read_result(self.out_dir)  # DataError naming result.json when unreadable
        if stored is None:
            return None
        if not self.resume:
            raise ConfigError(
                f"out_dir: {self.out_dir} holds a finished run ({RESULT}); choose another out_dir"
            )
        if stored.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"out_dir: {self.out_dir} holds a finished run of a different config; choose another out_dir"
            )
        result = TrainResult.from_dict(stored)
        if result.status == "diverged":
            raise TrainingDiverged(stored.get("diverged_step"), stored.get("diverged_loss"), " (earlier run)")
        return result

    def _open_data(self):
        from relscale.data import PreparedData

        data = self.data if self.data is not None else PreparedData(self.cfg.data.path)
        if data.vocab_size != self.cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {self.cfg.model.vocab_size} differs from the vocabulary of the data "
                f"in {data.data_dir} ({data.vocab_size}); set model.vocab_size = {data.vocab_size}"
            )
        return data

    def _build_model(self) -> nn.Module:
        from relscale.model import Transformer

        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # every rank builds the same weights, as one process would
        with torch.device(env.device):
            model = Transformer(cfg.model, activation_checkpointing=cfg.activation_checkpointing)
        if cfg.compile:
            for block in model.blocks:
                block.compile()  # in place: state-dict keys stay the same
        if env.distributed:
            shard_model(model, self.dtype if self.dtype != torch.float32 else None)
        return model

    # ------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        finished = self._finished_result()
        if finished is not None:
            return finished
        latest = ckpt.latest_checkpoint(self.out_dir)
        if latest is not None and not self.resume:
            raise ConfigError(
                f"out_dir: {self.out_dir} holds checkpoints of an earlier run; resume it (--resume) "
                "or choose another out_dir"
            )
        self.data = self._open_data()
        self.dtype = _compute_dtype(cfg, env.device)
        # Without FSDP, bf16 compute on the GPU comes from autocast (weights stay fp32).
        self.autocast = (
            torch.autocast(env.device.type, dtype=self.dtype)
            if not env.distributed and self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        model = self._build_model()
        optimizer = build_optimizer(model, cfg.optim, env.device.type)

        from relscale.data import SequenceLoader

        loader = SequenceLoader(
            self.data, "train", cfg.data.seq_len, cfg.micro_batch, seed=cfg.seed, rank=env.rank,
            world_size=env.world_size, grad_accum=cfg.grad_accum, doc_masking=cfg.data.doc_masking,
            device=env.device,
        )
        start_step, prior_wall, last_loss = 0, 0.0, None
        if latest is not None:
            ckpt.check_compatible(latest, self.fingerprint)
            state = ckpt.load_checkpoint(latest, model, optimizer, env)
            start_step, prior_wall, last_loss = state["step"], state["wall_s"], state.get("train_loss")
            loader.load_state_dict(state["loader"])
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # The config this run trains with (presets resolved), for readers of the run folder.
            atomic_write_text(run_dir.train_config_path(self.out_dir), json.dumps(to_dict(cfg), indent=2))
        barrier(env)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)

        log = MetricsLog(self.out_dir / METRICS, env.is_main, start_step if latest is not None else None)
        bar = progress_bar(cfg.steps, start_step, self.show_progress)
        try:
            return self._loop(model, optimizer, loader, log, bar, start_step, prior_wall, last_loss)
        finally:
            log.close()
            if bar is not None:
                bar.close()

    def _loop(self, model, optimizer, loader, log, bar, start_step, prior_wall, last_loss):
        cfg, env = self.cfg, self.env
        flops_per_step = run_flops(cfg.model, cfg.data.seq_len, self.tokens_per_step).flops_train
        peak = peak_flops(env.device)
        time_to_first_step = None
        val_loss = None
        mark_time, mark_step = time.perf_counter(), start_step
        for step in range(start_step, cfg.steps):
            lr = lr_at(cfg.optim, step, cfg.steps)
            set_lr(optimizer, lr)
            loss = self._forward_backward(model, loader)
            grad_norm = self._grad_norm(model, cfg.optim.grad_clip)
            loss_value, norm_value = loss.item(), grad_norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                self._diverged(step + 1, loss_value, norm_value, prior_wall)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last_loss = loss_value
            if time_to_first_step is None:
                time_to_first_step = time.perf_counter() - self.started
            for hook in self.hooks:
                hook(done, model)

            if bar is not None:
                bar.update(1)
            if done % cfg.log_interval == 0 or done == cfg.steps:
                now = time.perf_counter()
                step_rate = (done - mark_step) / max(now - mark_time, 1e-9)
                mark_time, mark_step = now, done
                mfu = flops_per_step * step_rate / (peak * env.world_size) if peak else None
                log.write({
                    "step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                    "tokens": done * self.tokens_per_step, "tokens_per_s": self.tokens_per_step * step_rate,
                    "mfu": mfu, "peak_mem_mb": peak_memory_mb(env.device),
                    "time_s": prior_wall + now - self.started,
                })
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            if done == cfg.steps or (cfg.eval_interval and done % cfg.eval_interval == 0):
                val_loss = self._evaluate(model)
                if val_loss is not None:
                    log.write({"step": done, "val_loss": val_loss})
                    self._check_val_loss(done, val_loss, loss_value, prior_wall)
                mark_time, mark_step = time.perf_counter(), done  # not training throughput
            if done == cfg.steps or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0):
                ckpt.save_checkpoint(
                    self.out_dir, done, model, optimizer,
                    {"step": done, "loader": loader.state_dict(), "train_loss": loss_value,
                     "wall_s": prior_wall + time.perf_counter() - self.started},
                    {"fingerprint": self.fingerprint}, env,
                )
                mark_time, mark_step = time.perf_counter(), done
        if val_loss is None and start_step == cfg.steps:  # resumed from the final checkpoint
            val_loss = self._evaluate(model)
            if val_loss is not None:
                self._check_val_loss(cfg.steps, val_loss, last_loss, prior_wall)
        model_dir = self._save_final(model)
        return self._finish("done", cfg.steps, last_loss, val_loss, prior_wall, time_to_first_step, model_dir)

    # -------------------------------------------------------------------------- one step
    def _forward_backward(self, model: nn.Module, loader) -> torch.Tensor:
        cfg, env = self.cfg, self.env
        total = torch.zeros((), device=env.device)
        for micro in range(cfg.grad_accum):
            batch = loader.next_batch()
            if env.distributed:  # reduce-scatter gradients once per step, not per micro-batch
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            with self.autocast:
                loss = model(
                    batch.tokens, batch.targets, positions=batch.positions,
                    cu_seqlens=batch.cu_seqlens if cfg.data.doc_masking else None,
                    max_seqlen=batch.max_seqlen,
                )
            (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
        # Every micro-batch has the same number of (valid) tokens: the global mean is the mean of
        # the micro-batch means.
        return all_reduce_sum(total / cfg.grad_accum, env) / env.world_size

    @staticmethod
    def _grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: the norm over every shard
            norm = norm.full_tensor()
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        return norm

    # ------------------------------------------------------------------------- validation
    def _validation_batches(self) -> list:
        """The held-out windows every validation pass measures: the first ``cfg.eval_windows``
        windows of the val split (all, if fewer), in batches of ``micro_batch`` windows. The
        windows depend on eval_tokens and seq_len only, so runs that differ in micro_batch,
        grad_accum or world size are scored on the same text."""
        if self._val_batches is None:
            from relscale.data import Batch, document_segments, validation_batches

            cfg, data = self.cfg, self.data
            has_val = "val" in data.splits and data.n_tokens("val") > cfg.data.seq_len
            self._val_batches = []
            if has_val and cfg.eval_windows:
                (whole,) = validation_batches(
                    data, cfg.data.seq_len, cfg.eval_windows, 1, doc_masking=cfg.data.doc_masking,
                    device="cpu",
                )
                for first in range(0, whole.tokens.shape[0], cfg.micro_batch):
                    rows = slice(first, first + cfg.micro_batch)
                    tokens = whole.tokens[rows]
                    positions, cu_seqlens = document_segments(
                        tokens.numpy(), data.eos_id, cfg.data.doc_masking
                    )
                    batch = Batch(tokens, whole.targets[rows], torch.from_numpy(positions),
                                  torch.from_numpy(cu_seqlens), max_seqlen=whole.max_seqlen)
                    self._val_batches.append(batch.to(self.env.device))
        return self._val_batches

    @torch.no_grad()
    def _evaluate(self, model: nn.Module) -> float | None:
        """Token-weighted mean loss over the validation windows (see _validation_batches). Ranks
        take every world_size-th batch; a rank without one in the last round runs a zero-weight
        forward, since FSDP needs every rank in every forward."""
        batches = self._validation_batches()
        if not batches:
            return None
        env = self.env
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, tokens
        rounds = -(-len(batches) // env.world_size)
        for round_index in range(rounds):
            index = round_index * env.world_size + env.rank
            batch = batches[index] if index < len(batches) else batches[0]
            with self.autocast:
                loss_sum = model(
                    batch.tokens, batch.targets, positions=batch.positions,
                    cu_seqlens=batch.cu_seqlens if self.cfg.data.doc_masking else None,
                    max_seqlen=batch.max_seqlen, reduction="sum",
                )
            if index < len(batches):
                totals[0] += loss_sum.double()
                totals[1] += (batch.targets != -100).sum()
        model.train()
        all_reduce_sum(totals, env)
        return float(totals[0] / totals[1])

    # ---------------------------------------------------------------------------- outputs
    def _meta(self) -> dict[str, Any]:
        cfg = self.cfg
        tokens = cfg.steps * self.tokens_per_step
        flops = run_flops(cfg.model, cfg.data.seq_len, tokens)
        return {
            "tokens": tokens, "flops_train": flops.flops_train, "flops_marin": flops.flops_marin,
            "seq_len": cfg.data.seq_len, "data_path": str(Path(self.data.data_dir).resolve()),
            "params": self.counts.total, "non_embedding_params": self.counts.non_embedding,
            "steps": cfg.steps, "global_batch": self.global_batch, "train_config": to_dict(cfg),
        }

    def _save_final(self, model: nn.Module) -> Path:
        from relscale.model_io import save_model

        target = self.out_dir / FINAL
        if not self.env.distributed:
            if self.env.is_main:
                save_model(model, target, self._meta())
            return target
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from relscale.model import Transformer

        # Collective: every rank takes part, rank 0 receives the full fp32 weights on the CPU.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.is_main:
            with torch.device("meta"):
                plain = Transformer(self.cfg.model)
            missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
            allowed = {"output.weight"} if self.cfg.model.tie_embeddings else set()
            if set(missing) - allowed or unexpected:
                raise RuntimeError(f"gathered weights do not match the model: {missing}, {unexpected}")
            save_model(plain, target, self._meta())
        barrier(self.env)
        return target

    def _finish(
        self, status, steps, train_loss, val_loss, prior_wall, time_to_first_step, model_dir, extra=None
    ) -> TrainResult:
        cfg = self.cfg
        tokens = steps * self.tokens_per_step
        flops = run_flops(cfg.model, cfg.data.seq_len, tokens)
        result = TrainResult(
            status=status, final_train_loss=finite_or_none(train_loss),
            final_val_loss=finite_or_none(val_loss),
            steps=steps, tokens=tokens, flops_train=flops.flops_train, flops_marin=flops.flops_marin,
            wall_s=prior_wall + time.perf_counter() - self.started, time_to_first_step_s=time_to_first_step,
            params=self.counts.total, non_embedding_params=self.counts.non_embedding,
            model_dir=str(model_dir) if model_dir is not None else None,
        )
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            payload = {**asdict(result), **(extra or {}), "fingerprint": self.fingerprint}
            atomic_write_text(self.out_dir / RESULT, json.dumps(payload, indent=2))
        barrier(self.env)
        return result

    def _check_val_loss(self, step: int, val_loss: float, train_loss: float | None,
                        prior_wall: float) -> None:
        """A non-finite validation loss ends the run as diverged (never "done")."""
        if math.isfinite(val_loss):
            return
        extra = {"diverged_step": step, "diverged_loss": repr(val_loss), "diverged_on": "validation"}
        self._finish("diverged", step, train_loss, None, prior_wall, None, None, extra)
        raise NonFiniteValidationLoss(step, val_loss)

    def _diverged(self, step: int, loss: float, grad_norm: float, prior_wall: float) -> None:
        extra = {"diverged_step": step, "diverged_loss": repr(loss), "diverged_grad_norm": repr(grad_norm)}
        # The steps that updated the weights: the diverging one did not.
        self._finish("diverged", step - 1, None, None, prior_wall, None, None, extra)
        detail = "" if not math.isfinite(loss) else f" (gradient norm {grad_norm})"
        raise TrainingDiverged(step, loss, detail)
