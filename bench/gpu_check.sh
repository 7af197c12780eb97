#!/usr/bin/env bash
# GPU check for an NVIDIA machine without internet, run from the repository root:
#   bash bench/gpu_check.sh [SHARED_DIR]
# Installs the carried tinygrad wheel (from ./.whl), benchmarks a llama2-7b-shaped model (random weights) in
# fp16, fp16+int8 and fp16+int4 with a profile of one decode step, measures the one-row GPU kernels per schedule
# (bench/gpu_matvec.py; --fused: what the norm/residual fused into them cost), then runs the kernel/parity/
# quantization tests on the GPU.
# Results go to $OUT (default /tmp/gpu_check). Budget: about 8 minutes (MATVEC_S=0 skips the kernel sweep,
# FUSED_S=0 the fusion timings).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tl2site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/tl2site:$PWD PYTHONUNBUFFERED=1
export DEV=${DEV:-CUDA} HCQ2=0
export TINYLLAMA2_SHARED=${1:-${TINYLLAMA2_SHARED:-$PWD/../shared}}
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
# tinygrad looks for libnvrtc in /usr/local/cuda/targets/*/lib only; point it at any copy on the machine
if [ -z "${NVRTC_PATH:-}" ]; then
  NVRTC_PATH=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt /usr/local/lib/python3* /usr/lib/python3* \
               -name 'libnvrtc.so*' ! -name '*builtins*' ! -name '*alt*' 2>/dev/null | sort | head -1)
  export NVRTC_PATH
fi
echo "NVRTC_PATH=$NVRTC_PATH" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv | tee "$OUT/gpu.txt"
python3 -c "from tinygrad import Tensor; print('smoke', (Tensor([1.0, 2.0]) + 1).tolist())" 2>&1 | tail -3 | tee -a "$OUT/env.txt"

timeout ${BENCH_S:-200} python3 bench/bench.py --model ${BENCH_MODEL:-llama2-7b} --dtype float16 --quantize none \
  --quantize int8 --quantize int4 --profile --json "$OUT/bench.json" 2>&1 | grep -v "^bench:" | tee "$OUT/bench.txt"
[ "${MATVEC_S:-110}" -gt 0 ] && timeout ${MATVEC_S:-110} python3 bench/gpu_matvec.py --bytes 256e6 2>&1 | tee "$OUT/matvec.txt"
[ "${FUSED_S:-60}" -gt 0 ] && timeout ${FUSED_S:-60} python3 bench/gpu_matvec.py --fused --bytes 256e6 2>&1 | tee "$OUT/fused.txt"
timeout ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_parity.py \
  tests/test_quantize.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
