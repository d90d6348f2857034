"""Fitting speed: the vectorised paired bootstrap of relative laws, absolute laws, and approach 3.

The fits are numpy/scipy on the host CPU whatever --device says (recorded as such). Profiles:
'full' = 1,000 groups x 100 models x 1,000 bootstrap draws (the README figure); 'ci' = 50 x 30 x
200, seconds on any machine. Approach 3 (L-BFGS-B from 64 grid starts + 100 bootstrap refits) runs
on a noise-added synthetic IsoFLOP sweep of 81 points.

    python bench/bench_fit.py [--profile ci|full]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import time_fn, write_results  # noqa: E402

from relscale.fit import error_matrix, fit_group_laws, fit_parametric, fit_relative_laws  # noqa: E402
from relscale.fit.synthetic import make_group_errors, make_isoflop_sweep  # noqa: E402

NAME = "fit"
PROFILES = {
    "ci": {"groups": 50, "models": 30, "draws": 200, "parametric_boot": 10, "rep_ms": 100},
    "full": {"groups": 1000, "models": 100, "draws": 1000, "parametric_boot": 100, "rep_ms": 3000},
}


def run(profile: str, device: str) -> list[dict]:
    cfg = PROFILES[profile]
    flops = np.geomspace(1e18, 1e21, cfg["models"])
    frame, _ = make_group_errors(flops, cfg["groups"], seed=0)
    em = error_matrix(frame, flop_convention="flops_marin")
    shape = {
        "groups": cfg["groups"],
        "models": cfg["models"],
        "draws": cfg["draws"],
        "dtype": "float64",
        "backend": "numpy (host CPU)",
        "requested_device": device,
    }
    records = []

    def relative():
        return fit_relative_laws(em, baseline="pooled", n_boot=cfg["draws"], seed=0, project_at=[1e23])

    timing = time_fn(relative, warmup=0, rep=cfg["rep_ms"])
    result = relative()
    records.append(
        {
            "name": "relative_laws_paired_bootstrap",
            **shape,
            **timing,
            "group_draw_fits_per_s": cfg["groups"] * cfg["draws"] / (timing["median_ms"] * 1e-3),
            "verdicts": {v: result.verdict.count(v) for v in sorted(set(result.verdict))},
        }
    )
    print(records[-1])

    timing = time_fn(lambda: fit_group_laws(em, n_boot=cfg["draws"], seed=0), warmup=0, rep=cfg["rep_ms"])
    records.append({"name": "absolute_group_laws_bootstrap", **shape, **timing})
    print(records[-1])

    sweep = make_isoflop_sweep(budgets=np.geomspace(1e17, 1e21, 9), n_per_budget=9, noise=0.01, seed=0)
    t0 = time.perf_counter()
    fit = fit_parametric(
        sweep["params"], sweep["tokens"], sweep["loss"], n_boot=cfg["parametric_boot"], seed=0
    )
    wall = time.perf_counter() - t0
    records.append(
        {
            "name": "approach3_lbfgsb_64_starts_plus_bootstrap",
            "points": len(sweep),
            "starts": fit.n_starts,
            "draws": cfg["parametric_boot"],
            "wall_s": wall,
            "converged": fit.converged,
            "alpha": fit.alpha,
            "beta": fit.beta,
            "backend": "scipy L-BFGS-B (host CPU)",
        }
    )
    print(records[-1])
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--device", default="cpu", help="recorded only: the fits run on the host CPU")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    records = run(args.profile, args.device)
    meta = {
        "profile": args.profile,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }
    print(write_results(NAME, records, meta=meta))


if __name__ == "__main__":
    main()
