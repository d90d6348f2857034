"""The lean trainer: ``train(cfg) -> TrainResult``, one process or many (torchrun, FSDP2).

    from relscale.config import load_train_config
    from relscale.train import train
    result = train(load_train_config("tiny"))   # a packaged config, or a path to a TOML file

Command line: ``relscale train CONFIG [key=value ...] [--resume] [--threads N]``, or for several processes
``torchrun --nproc_per_node N -m relscale.train CONFIG [key=value ...] [--resume]``.

What a run writes is named and read by :mod:`relscale.train.run_dir` (torch-free). The names below
are imported lazily, so ``import relscale.train.run_dir`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["NonFiniteValidationLoss", "OnStep", "OutDirInUse", "TrainResult", "TrainingDiverged", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("relscale.train.loop"), name)
    raise AttributeError(f"module 'relscale.train' has no attribute {name!r}")
