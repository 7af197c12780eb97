#!/usr/bin/env bash
# GPU check for an NVIDIA machine without internet, run from the repository root:
#   bash bench/gpu_check.sh [SHARED_DIR]
# Installs the carried tinygrad wheel (from ./.whl), runs the parity/model/quantization tests on the GPU,
# then benchmarks a llama2-7b-shaped model (random weights) in fp16 and fp16+int8. Results go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tl2site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/tl2site:$PWD PYTHONUNBUFFERED=1
export DEV=${DEV:-CUDA}
export TINYLLAMA2_SHARED=${1:-${TINYLLAMA2_SHARED:-$PWD/../shared}}
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_quantize.py \
  2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 420 python3 bench/bench.py --model ${BENCH_MODEL:-llama2-7b} --dtype float16 --quantize none --quantize int8 --quantize int4 --profile \
  --json "$OUT/bench.json" 2>&1 | grep -v "^bench:" | tee "$OUT/bench.txt"
