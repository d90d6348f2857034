"""Evaluation: per-example loss dumps of our checkpoints, sweeps and Hugging Face checkpoints.

    from relscale.eval import RunOptions, evaluate
    evaluate(["sweeps/sotu"], ["default", "mmlu:data/mmlu"], RunOptions(out_dir=Path("evals")))

Modules: formats (eval sets), adapters (MMLU, Anthropic evals, BIG-bench), packing (windows and
document-masked batches), scoring (tokenisation as lm-evaluation-harness does it, start-token
policies, NLL, metrics), hf (Llama/Qwen3 import and export), writer (Parquet dumps), runner
(models -> dumps, the training hook), lmeval (``--model relscale`` for lm-eval; optional extra),
from_lmeval (lm-eval ``--log_samples`` output -> dumps), cli.
Names are imported on first use so ``relscale eval --help`` stays quick.
"""

import importlib

_EXPORTS = {
    "evaluate": "relscale.eval.runner",
    "discover_models": "relscale.eval.discover",
    "make_dump_hook": "relscale.eval.hook",
    "RunOptions": "relscale.eval.options",
    "SetOptions": "relscale.eval.sets",
    "load_eval_set": "relscale.eval.sets",
    "ScoreSettings": "relscale.eval.scoring",
    "score_requests": "relscale.eval.scoring",
    "StartTokens": "relscale.eval.scoring",
    "resolve_start": "relscale.eval.scoring",
    "convert_lm_eval": "relscale.eval.from_lmeval",
    "export_hf": "relscale.eval.hf",
    "load_hf_model": "relscale.eval.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'relscale.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
