#!/usr/bin/env bash
# Attention kernels on one GPU, in one call: paged decode per KV format (bf16, fp8, int4,
# int4-g32) at contexts 512..32k x batch 1..256 against dense BF16 and the XLA paged path,
# and FP8 causal prefill at 1k/2k/4k tokens x batch 1..16 against XLA and cuDNN BF16.
# Every kernel output is checked on the device before it is timed (the run stops otherwise).
#   device run:  bash benchmarks/kernels_attention.sh     (JSON under $OUT if set)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -c "import jax; print(jax.__version__, jax.devices())"
python -m fineserve_jax.bench kernels --op attention --reps 5 --inner 5 \
  --out "$out/kernels_attention.json"
