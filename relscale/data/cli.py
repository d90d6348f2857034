"""`relscale prepare [SOURCE ...] --out DIR [options]` and `relscale prepare --verify DIR`."""

from __future__ import annotations

import argparse

from relscale.errors import DataError

# Where `relscale prepare` puts the default corpus; DataConfig.path (relscale/config.py) reads it.
DEFAULT_SOTU_OUT = "relscale_data/sotu"


def _fields(text: str | None) -> list[str] | None:
    return None if text is None else [field.strip() for field in text.split(",") if field.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``relscale prepare`` (sources, --out, tokenizer, split and shard options)."""
    parser.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="text files, folders of .txt files (one group per subfolder), .jsonl/.json, "
        ".parquet, or saved Hugging Face dataset folders; none (or 'sotu') = the "
        "embedded State of the Union corpus",
    )
    parser.add_argument(
        "--out", help=f"output folder, written atomically (default for the sotu corpus: {DEFAULT_SOTU_OUT})"
    )
    parser.add_argument(
        "--verify",
        metavar="DIR",
        help="check every file of a prepared folder against the sha256 in its manifest, then exit",
    )
    parser.add_argument(
        "--text-field", default="text", help="column holding the document text (default: text)"
    )
    parser.add_argument(
        "--id-field",
        default=None,
        help="column holding a unique document id (default: file name and row; fileid for sotu)",
    )
    parser.add_argument(
        "--group-fields",
        default=None,
        metavar="A,B",
        help="metadata columns used as group labels (default: sotu_type,century,party for "
        "sotu; the subfolder 'group' for .txt folders; none otherwise)",
    )
    parser.add_argument(
        "--extra-fields",
        default=None,
        metavar="A,B",
        help="more metadata columns copied to index.parquet (default: year,president for sotu)",
    )
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default=None, metavar="PATH", help="an existing tokenizer.json")
    tokenizer.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="train a byte-level BPE of this size on the training split (default: 4096)",
    )
    parser.add_argument("--eos-token", default="<|endoftext|>", help="end-of-document token")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="documents held out (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    parser.add_argument(
        "--stratify-field",
        default=None,
        help="group field whose labels the split keeps in proportion (default: the first "
        "group field; 'none' for no strata)",
    )
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N non-empty documents")
    parser.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard (default: 2^27)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenisation processes (default: 1)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if up to date, overwriting an output prepared differently",
    )


def run(args: argparse.Namespace) -> int:
    """``relscale prepare``: build (or, with --verify, check) a prepared folder; 0 on success.
    Bad flags raise DataError naming the flag (the CLI exits 2)."""
    from relscale.data.dataset import PreparedData
    from relscale.data.prepare import prepare

    _check_flags(args)
    if args.verify:
        n_files = PreparedData(args.verify).verify()
        print(f"{args.verify}: OK ({n_files} files match their sha256)")
        return 0
    if not args.out:
        if args.sources not in ([], ["sotu"]):
            raise DataError("--out DIR is required for these sources (or --verify DIR)")
        args.out = DEFAULT_SOTU_OUT
    prepare(
        args.sources,
        args.out,
        text_field=args.text_field,
        id_field=args.id_field,
        group_fields=_fields(args.group_fields),
        extra_fields=_fields(args.extra_fields),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        eos_token=args.eos_token,
        val_fraction=args.val_fraction,
        seed=args.seed,
        stratify_field=args.stratify_field,
        max_docs=args.max_docs,
        shard_tokens=args.shard_tokens,
        num_proc=args.num_proc,
        force=args.force,
    )
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse impossible flag values by flag name (DataError: one line, exit status 2)."""
    from relscale.data.tokenizer import MIN_VOCAB_SIZE

    vocab_size, val_fraction = getattr(args, "vocab_size", None), getattr(args, "val_fraction", 0.1)
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"--vocab-size: {vocab_size} is too small; a byte-level BPE needs at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + EOS)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction: {val_fraction} must be in [0, 1)")
    for flag in ("shard_tokens", "num_proc", "max_docs"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise DataError(f"--{flag.replace('_', '-')}: {value} must be >= 1")
    if getattr(args, "verify", None) and getattr(args, "sources", None):
        raise DataError("--verify DIR takes no SOURCE arguments")
