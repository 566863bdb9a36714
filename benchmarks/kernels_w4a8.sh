#!/usr/bin/env bash
# INT4 x FP8 GEMM on one GPU, in one call: every kernel row is checked against its f32
# reference on the device before it is timed (bench kernels exits non-zero otherwise).
#   device run:  bash benchmarks/kernels_w4a8.sh            (JSON under $OUT if set)
#   TUNE=1 also runs the block-size search first (llama3-8b shapes; several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -c "import jax; print(jax.__version__, jax.devices())"
if [ "${TUNE:-0}" = 1 ]; then
  python -m pallas_kernels.tune_w4a8 --models llama3-8b --out "$out/w4a8_tuned.json"
  cp "$out/w4a8_tuned.json" pallas_kernels/w4a8_tuned.json
fi
python -m fineserve_jax.bench kernels --op w4a8 --e2e --out "$out/kernels_w4a8.json"
