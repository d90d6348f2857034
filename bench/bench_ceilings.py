"""The two ceilings every other number is read against, measured on this device in this run:
device-to-device copy bandwidth (bytes read + written) and the dense bf16 matmul rate on random data.

    python bench/bench_ceilings.py --profile quick     # GPU: 2 GiB copy, 8192^3 bf16 matmul, ~5 s
    python bench/bench_ceilings.py --profile ci        # CPU: tiny sizes, proves the script runs

Source of the method: the workplace's device notes (METHOD.md: measure both ceilings once per
machine; never time zeros). Datasheet values are recorded next to them for comparison only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    copy_bandwidth_gbps,
    datasheet_bandwidth,
    datasheet_bf16_tflops,
    device_name,
    matmul_tflops,
    run_from_command_line,
)

NAME = "ceilings"
PROFILES = {
    "ci": {"copy_bytes": 1 << 22, "matmul_n": 256},
    "quick": {"copy_bytes": 1 << 31, "matmul_n": 8192},
    "full": {"copy_bytes": 1 << 31, "matmul_n": 8192},
}


def run(profile: str, device: str) -> list[dict]:
    """[copy record, bf16 matmul record] for ``device``; raises ValueError for an unknown profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    cfg = PROFILES[profile]
    name = device_name(device)
    on_gpu = torch.device(device).type == "cuda"
    copy = copy_bandwidth_gbps(device, cfg["copy_bytes"])
    tflops = matmul_tflops(device, cfg["matmul_n"], torch.bfloat16)
    return [
        {"op": "copy", "bytes": cfg["copy_bytes"], "gbps": copy,
         "datasheet_gbps": datasheet_bandwidth(name) if on_gpu else None},
        {"op": "matmul_bf16", "n": cfg["matmul_n"], "tflops": tflops,
         "datasheet_tflops": datasheet_bf16_tflops(name) if on_gpu else None},
    ]


if __name__ == "__main__":
    records, path = run_from_command_line(NAME, run, __doc__, PROFILES)
    for r in records:
        print(r)
    print(f"wrote {path}")
