"""``relscale eval``: per-example loss dumps of models on eval sets (``--export-hf``: convert).

relscale eval runs/tiny/final                        # the model's own held-out split
relscale eval sweeps/sotu --eval default --eval mmlu:data/mmlu --shots 5
relscale eval runs/tiny --checkpoints                # every DCP checkpoint of a run too
relscale eval hf/isoflop-1e19-d512 --eval text:ice/  # a Hugging Face Qwen3/Llama checkpoint
relscale eval runs/tiny/final --export-hf hf/tiny    # write our weights as a HF checkpoint
relscale eval --from-lm-eval lmeval_out --out evals  # lm-eval --log_samples output -> dumps
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relscale.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``relscale eval`` to ``parser``."""
    parser.add_argument(
        "models", nargs="*", help="model, run, sweep or Hugging Face directories (not with --from-lm-eval)"
    )
    parser.add_argument(
        "--eval",
        dest="evals",
        action="append",
        metavar="SPEC",
        help="eval set: 'default' (held-out split of the model's data), or "
        "[NAME=][KIND:]PATH with KIND text, textdir, mc, mmlu, anthropic, bigbench "
        "(guessed from the file when left out); repeatable; default: default",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: SWEEP/evals for one sweep, else evals)"
    )
    parser.add_argument("--force", action="store_true", help="rewrite dumps that already exist")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed rows (written to <out>/<dataset>/bad_rows.jsonl) instead of failing",
    )
    parser.add_argument("--checkpoints", action="store_true", help="also evaluate runs' DCP checkpoints")
    parser.add_argument("--steps", help="only these checkpoint steps (comma separated)")

    data = parser.add_argument_group("data and tokenizer")
    data.add_argument(
        "--data", type=Path, help="prepared data directory (default: data_path in the model's meta)"
    )
    data.add_argument(
        "--split", default="val", help="split of the prepared data for 'default' (default: val)"
    )
    data.add_argument("--tokenizer", type=Path, help="tokenizer.json to use instead of the model's own")
    data.add_argument(
        "--start-token",
        default="auto",
        help="what precedes each context/document: auto (as lm-eval: the tokenizer's own special "
        "tokens; documents start from its BOS, else EOS), bos, eos, none, or a token string/id "
        "(default: auto)",
    )
    data.add_argument("--text-field", default="text", help="text field of JSONL/Parquet text sets")
    data.add_argument("--id-field", help="example id field (default: id or doc_id, else the row number)")
    data.add_argument("--group-by", help="group fields, comma separated (default: the data's group fields)")
    data.add_argument("--limit", type=int, help="score only the first N examples of each set")
    data.add_argument("--max-chars", type=int, help="text sets: score each document's first N chars only")

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument(
        "--context",
        type=int,
        help="tokens per window (default: the training seq_len, else min(max length, 4096))",
    )
    scoring.add_argument(
        "--stride",
        type=int,
        help="new tokens scored per window after the first (default: the context, lm-eval's disjoint "
        "windows; the last window always has a full context)",
    )
    scoring.add_argument("--pack-len", type=int, help="packed row length (default: the context)")
    scoring.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward pass")
    scoring.add_argument(
        "--prefix-tokens",
        type=int,
        default=0,
        help="score each document only after its first K tokens (conditional)",
    )
    scoring.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    scoring.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's own; 1-2 on a busy machine)"
    )
    scoring.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 autocast on CUDA, fp32 on the CPU",
    )

    prompts = parser.add_argument_group("multiple-choice prompts (\\n and \\t in strings are escapes)")
    prompts.add_argument("--shots", type=int, default=0, help="solved examples before each question")
    prompts.add_argument("--template", help="question template, e.g. 'Question: {question}\\nAnswer:'")
    prompts.add_argument("--choice-sep", default=" ", help="written between the prompt and a choice")
    prompts.add_argument("--shot-sep", default="\\n\\n", help="written between shots")
    prompts.add_argument("--mmlu-format", default="letters", choices=("letters", "cloze"))
    prompts.add_argument("--fewshot-pool", type=Path, help="file of solved examples for the shots")
    prompts.add_argument("--seed", type=int, default=0, help="seed of the drawn shots")

    other = parser.add_argument_group("other")
    other.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model column override, e.g. tokens=2e9 budget=1e19 (repeatable)",
    )
    other.add_argument(
        "--export-hf",
        type=Path,
        metavar="DIR",
        help="instead of evaluating: write the (one) model as a Hugging Face checkpoint",
    )
    other.add_argument(
        "--from-lm-eval",
        type=Path,
        metavar="DIR",
        help="instead of evaluating: turn lm-eval --log_samples output under DIR into dumps "
        "(task/subtask as the 'subject' group); model columns from --meta and the run's pretrained",
    )
    other.add_argument("--model-id", help="with --from-lm-eval: the model id of the (one) run")
    other.add_argument("--quiet", action="store_true")
    other.add_argument("--progress", action="store_true", help="show a progress bar while scoring")


def _unescape(text: str | None) -> str | None:
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _parse_meta(items: list[str]) -> dict:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta {item!r}: expected KEY=VALUE")
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
        if key in ("tokens", "seq_len") and isinstance(meta[key], float):
            meta[key] = int(meta[key])
    return meta


def _steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError(f"--steps {text!r}: expected comma-separated integers") from err


def _default_out(models: list[str]) -> Path:
    """SWEEP/evals when the one path given is a sweep folder, else ./evals."""
    from relscale.sweep.layout import is_sweep_dir

    if len(models) == 1 and is_sweep_dir(models[0]):
        return Path(models[0]) / "evals"
    return Path("evals")


def run(args: argparse.Namespace) -> int:
    """Run ``relscale eval`` with parsed ``args``; exit status 0. Raises ConfigError for a bad
    flag value (the CLI exits 2) and DataError for unreadable inputs."""
    from relscale.eval.options import RunOptions
    from relscale.eval.runner import evaluate
    from relscale.eval.sets import SetOptions

    for name in ("context", "stride", "pack_len", "batch_tokens", "limit", "max_chars", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    if args.prefix_tokens < 0 or args.shots < 0:
        raise ConfigError("--prefix-tokens and --shots must be >= 0")
    if args.from_lm_eval is not None:
        return _from_lm_eval(args)
    if not args.models:
        raise ConfigError("relscale eval: give model directories (or --from-lm-eval DIR)")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.export_hf is not None:
        return _export(args)
    sets = SetOptions(
        data_dir=args.data,
        split=args.split,
        text_field=args.text_field,
        id_field=args.id_field,
        group_by=[f.strip() for f in args.group_by.split(",")] if args.group_by else None,
        template=_unescape(args.template),
        choice_sep=_unescape(args.choice_sep),
        shot_sep=_unescape(args.shot_sep),
        shots=args.shots,
        seed=args.seed,
        mmlu_style=args.mmlu_format,
        fewshot_pool=args.fewshot_pool,
        limit=args.limit,
        max_chars=args.max_chars,
    )
    opts = RunOptions(
        out_dir=args.out or _default_out(args.models),
        sets=sets,
        context=args.context,
        stride=args.stride,
        pack_len=args.pack_len,
        batch_tokens=args.batch_tokens,
        prefix_tokens=args.prefix_tokens,
        device=args.device,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        start_token=args.start_token,
        meta=_parse_meta(args.meta),
        skip_bad=args.skip_bad,
        force=args.force,
        progress=args.progress,
        quiet=args.quiet,
        threads=args.threads,
    )
    evaluate(
        args.models, args.evals or ["default"], opts, checkpoints=args.checkpoints, steps=_steps(args.steps)
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from relscale.data import layout as data_layout
    from relscale.data.tokenizer import EOS_TOKEN
    from relscale.eval.discover import discover_models, own_tokenizer, read_info
    from relscale.eval.hf import export_hf
    from relscale.eval.models import load_weights
    from relscale.eval.options import RunOptions

    entries = discover_models(args.models, checkpoints=args.checkpoints)
    if len(entries) != 1:
        raise ConfigError(f"--export-hf converts one model; {len(entries)} found in {args.models}")
    entry = entries[0]
    info = read_info(entry, RunOptions(sets=_sets_with_data(args.data), meta=_parse_meta(args.meta)))
    model = load_weights(entry, info.cfg, "cpu")
    tokenizer = args.tokenizer
    if tokenizer is None:  # the tokenizer stored next to the weights (a moved run has no data)
        tokenizer = (own_tokenizer(entry) or (None,))[0]
    if tokenizer is None and info.data_dir is not None and data_layout.is_prepared(info.data_dir):
        tokenizer = data_layout.tokenizer_path(info.data_dir)
    out = export_hf(
        model,
        args.export_hf,
        tokenizer_path=tokenizer,
        eos_token=EOS_TOKEN if tokenizer else None,
        meta=info.meta,
    )
    if not args.quiet:
        print(f"relscale eval: wrote {entry.model_id} as a Hugging Face checkpoint to {out}")
    return 0


def _from_lm_eval(args: argparse.Namespace) -> int:
    from relscale.eval.from_lmeval import convert_lm_eval

    if args.models:
        raise ConfigError("--from-lm-eval converts lm-eval output; give no model directories with it")
    outcomes = convert_lm_eval(
        args.from_lm_eval,
        args.out or Path("evals"),
        meta=_parse_meta(args.meta),
        model_id=args.model_id,
        force=args.force,
        quiet=args.quiet,
    )
    if not args.quiet:
        written = sum(o.status == "written" for o in outcomes)
        print(f"relscale eval: {written} dump(s) written from lm-eval output, {len(outcomes) - written} kept")
    return 0


def _sets_with_data(data: Path | None):
    from relscale.eval.sets import SetOptions

    return SetOptions(data_dir=data)
