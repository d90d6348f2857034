"""The lean trainer: ``train(cfg) -> TrainResult``, one process or many (torchrun, FSDP2).

    from relscale.config import load_train_config
    from relscale.train import train
    result = train(load_train_config("configs/tiny.toml"))

Command line: ``relscale train CONFIG [key=value ...] [--resume] [--threads N]``, or for several processes
``torchrun --nproc_per_node N -m relscale.train CONFIG [key=value ...] [--resume]``.
"""

from relscale.train.loop import NonFiniteValidationLoss, OutDirInUse, TrainingDiverged, TrainResult, train

__all__ = ["NonFiniteValidationLoss", "OutDirInUse", "TrainResult", "TrainingDiverged", "train"]
