"""Print one table of the headline numbers in a folder of benchmark JSONs (bench/results/ or a GPU
session's output folder), one row per measured record, skipped ones with their reason.

    python bench/summarize.py OUT_DIR [--max-rows-per-file 40]

Columns are whichever of the records' shape fields are present; values are the median time and the
rate the benchmark reports (GB/s and % of the measured copy, TFLOP/s, tokens/s, MFU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABEL_KEYS = ("op", "kind", "impl", "backend", "deterministic", "masking", "direction", "hidden", "layers",
              "vocab", "head_dim", "seq", "batch", "tokens", "n")
VALUE_KEYS = (("median_ms", "{:.3f} ms"), ("gbps", "{:.0f} GB/s"), ("pct_of_copy", "{:.0f}% copy"),
              ("tflops", "{:.1f} TFLOP/s"), ("tokens_per_s", "{:,.0f} tok/s"),
              ("mfu_vs_matmul_pct", "MFU {:.1f}% of matmul"), ("peak_extra_bytes", "+{:,} B peak"))


def _label(record: dict) -> str:
    parts = []
    for key in LABEL_KEYS:
        value = record.get(key)
        if value is None or value is False:
            continue
        parts.append(str(value) if key in ("op", "kind", "impl", "backend", "direction", "masking")
                     else ("det" if key == "deterministic" else f"{key}={value}"))
    return " ".join(parts)


def _values(record: dict) -> str:
    return "  ".join(fmt.format(record[key]) for key, fmt in VALUE_KEYS if record.get(key) is not None)


def summarize(folder: Path, max_rows: int = 40) -> list[str]:
    """Table lines for every ``*.json`` results file in ``folder`` (name order)."""
    lines = []
    files = sorted(folder.glob("*.json"))
    if not files:
        return [f"no results JSON in {folder}"]
    for path in files:
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            lines.append(f"{path.name}: unreadable ({error})")
            continue
        prov = payload.get("provenance", {})
        lines.append(f"== {payload.get('name', path.stem)} on {prov.get('device')} "
                     f"(torch {prov.get('torch')}, commit {prov.get('git_commit')}) [{path.name}]")
        records = payload.get("records", [])
        for record in records[:max_rows]:
            reason = record.get("skipped") or (record.get("reason") if record.get("status") not in
                                                (None, "ok") else None)
            body = f"skipped: {str(reason)[:90]}" if reason else _values(record)
            lines.append(f"  {_label(record)[:70]:70}  {body}")
        if len(records) > max_rows:
            lines.append(f"  ... {len(records) - max_rows} more records in the file")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-rows-per-file", type=int, default=40)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    print("\n".join(summarize(args.folder, args.max_rows_per_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
