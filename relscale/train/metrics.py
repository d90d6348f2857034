"""Training metrics: JSONL records, model FLOPs utilisation, peak memory, the progress bar."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) per device, from the vendors' datasheets (SXM parts).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (and on the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak of allocated memory; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kilobytes / 1024 if sys.platform != "darwin" else kilobytes / 2**20


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: non-finite numbers are written as null."""
    return value if value is not None and math.isfinite(value) else None


class MetricsLog:
    """Append-only JSONL (rank 0 only), one record per line, flushed as written."""

    def __init__(self, path: Path, enabled: bool, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        if truncate_after_step is not None and self.path.exists():
            self._drop_records_after(truncate_after_step)
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()  # a fresh run: no stale records
        self._file = self.path.open("a")

    def _drop_records_after(self, step: int) -> None:
        """On resume, the records of the interrupted run after the checkpoint are redone."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by the crash
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one JSON line (non-finite floats as null); no-op off rank 0."""
        if self._file is None:
            return
        clean = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order (strict; for a run folder's, tolerant of a
    line cut short by a crash, see relscale.train.run_dir.read_metrics)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over ``total`` optimizer steps starting at ``initial``, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=False)
