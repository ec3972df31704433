#!/usr/bin/env bash
# Every GPU figure of issue 17 in one command, sized to end in under 8 minutes on an H100/H200:
#
#   1. pytest on the tests that touch devices (tests/test_compile.py, tests/test_gpu_bench.py): on a
#      GPU they also run on CUDA (compiled step == eager loss, reduce-overhead captures CUDA graphs,
#      no host synchronisation inside a step, float16 storage);
#   2. bench/gpu_train.py at Norman scale (DESIGN section 6): SAMS-VAE (correlated), CPA-VAE and the
#      conditional VAE in eager, compiled and graph-captured modes, float32 and bf16, with bf16's
#      held-out ELBO checked against float32's; one table: s/epoch, cells/s, peak memory, x floor.
#
#   bash bench/gpu_check.sh            # on the GPU machine (device tool: timeout_s=540)
#   bash bench/gpu_check.sh --small    # CPU dry run, CI-sized: a tiny screen, Dynamo-only compile
#
# Arguments after the first go to bench/gpu_train.py (e.g. --models sams_vae --modes graphs).
# Environment: OUT (folder: pytest.txt, gpu_train.log and gpu_train.md are written there),
# PYTHON (interpreter; default .venv/bin/python, else python3), GPU_CHECK_TESTS=0 (skip step 1),
# GPU_CHECK_LIMIT_S (seconds for the whole script, default 450: the bench starts no new run
# once its share is spent, and still prints the table).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LIMIT_S=${GPU_CHECK_LIMIT_S:-450}
start=$(date +%s)
small=0
if [ "${1:-}" = "--small" ]; then
  small=1
  shift
fi
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU visible"

tests_rc=0
if [ "${GPU_CHECK_TESTS:-1}" != "0" ]; then
  echo "== tests on the devices"
  # --noconftest: these tests make their own data (the GPU image has no anndata)
  timeout 300 "$PY" -m pytest -q --noconftest tests/test_compile.py tests/test_gpu_bench.py 2>&1 | tee ${OUT:+"$OUT/pytest.txt"}
  tests_rc=${PIPESTATUS[0]}
fi

elapsed=$(( $(date +%s) - start ))
budget=$(( LIMIT_S - elapsed - 75 ))  # room for the run in flight and the table
if [ "$budget" -lt 30 ]; then budget=30; fi
if [ "$small" = 1 ]; then
  bench_args=(--small --device cpu --cells 1200 --genes 80 --latent 8 --hidden 64 --embed-hidden 32 --embed-layers 2
              --perturbations 12 --combinations 10 --batch-size 128 --epochs 1 --matmul-size 512 --compile-backend eager)
else
  bench_args=(--epochs 2)
fi
echo "== bench/gpu_train.py (starts no new run after ${budget} s)"
"$PY" bench/gpu_train.py "${bench_args[@]}" --budget-s "$budget" "$@" 2>&1 | tee ${OUT:+"$OUT/gpu_train.log"}
bench_rc=${PIPESTATUS[0]}

echo "== tests exit ${tests_rc}, bench exit ${bench_rc}, $(( $(date +%s) - start )) s in all"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
