#!/usr/bin/env bash
# The library on a GPU: unit tests of the model code with JAX on CUDA, the local decode benchmark,
# weight storage and whole-pathway decode (GPT-2 small, 1.1 B). For a lent accelerator machine
# whose image has jax[cuda], flax and optax; results go to $OUT (or ./gpu-check). Generated protos are not needed by these tests.
set -uo pipefail
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
# float32 parity tests need full-precision matmuls: JAX uses TF32 for float32 on GPUs by default.
export PYTHONPATH=libs:. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import jax, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("devices", jax.devices())
PY
timeout 300 python3 -m pytest -q -p no:cacheprovider -W ignore \
  libs/pathways/modules libs/pathways/executor/local_test.py libs/pathways/generate_test.py \
  libs/pathways/sampling_test.py libs/pathways/pipeline 2>&1 | tee "$OUT/tests.txt" | tail -25
# What users run (LocalExecutor sessions, one fused program per step) against a hand-written single
# program, alternated 5 times (tools/bench/local_decode.py).
env -u JAX_DEFAULT_MATMUL_PRECISION timeout 300 python3 tools/bench/local_decode.py --repeat 5 \
  --out "$OUT/local_decode_gpu.json" 2>&1 | tee "$OUT/bench.txt" | tail -6
# Weight storage (float32/bfloat16/int8) on the device, then decode and prefill of GPT-2 small and
# the 1.1 B Llama-style spec with weights made on the device, at 1 and 32 sessions, as a fraction
# of the device's memory bandwidth (tools/bench/device_decode.py). Sharding tests need 8 devices:
# on a one-GPU machine they skip (they run on CPU host devices in CI).
timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore libs/pathways/weights_test.py \
  2>&1 | tee "$OUT/weights_tests.txt" | tail -5
env -u JAX_DEFAULT_MATMUL_PRECISION XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 \
  python3 tools/bench/device_decode.py --out "$OUT/device_decode_gpu.json" 2>&1 \
  | tee "$OUT/device_decode.txt" | tail -12
