#!/usr/bin/env bash
# One GPU session in one call: build, correctness on CUDA, then every benchmark.
#
#   bash bench/gpu_session.sh [OUT_DIR]
#
# Meant for the device machine (torch 2.11 cu130, triton 3.6, Python 3.12, offline): installs the
# project without dependencies, builds relscale._C for sm_90, runs the kernel, extension and model
# tests on the GPU (they run on CUDA when it is present), then `bench/run_all.py --profile full`,
# which writes bench/results/*.json with device, versions, commit and shapes. Optional baselines
# (liger-kernel, flash-attn) are used when importable: carry their wheels (see the device notes).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
RELSCALE_BUILD_EXT=cuda python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee "$out/build.log"
python3 -m pytest -q -x tests/kernels tests/csrc tests/core tests/model 2>&1 | tee "$out/tests.log" | tail -15
python3 bench/run_all.py --profile full 2>&1 | tee "$out/bench.log" | tail -40
cp bench/results/*.json "$out/" 2>/dev/null || true
