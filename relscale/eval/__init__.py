"""Evaluation: per-example loss dumps of our checkpoints, sweeps and Hugging Face checkpoints.

    from relscale.eval import RunOptions, evaluate
    evaluate(["sweeps/sotu"], ["default", "mmlu:data/mmlu"], RunOptions(out_dir=Path("evals")))

Modules, each importing only those before it (no cycle; tests/eval/test_structure.py):
dump (the dump contract: layout, Parquet schema, settings metadata; torch-free, what relscale.fit
reads), formats (example types, generic readers), adapters (MMLU, Anthropic evals, BIG-bench),
sets (eval-set specs -> eval sets), packing (windows and document-masked batches), scoring
(tokenisation as lm-evaluation-harness does it, start-token policies, NLL, metrics), options
(RunOptions, the scoring settings built from them), hf (Llama/Qwen3 import and export), discover
(models under a path, through the run-folder and sweep-folder contracts), models (weights,
tokenizer, model columns), writer (writing dumps), runner (models -> dumps), hook (the training-time
``on_step`` dump hook), lmeval (``--model relscale`` for lm-eval; optional extra), from_lmeval
(lm-eval ``--log_samples`` output -> dumps), cli.
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
