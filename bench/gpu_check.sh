#!/usr/bin/env bash
# One short accelerator check, sized for a 15-minute device lease (about 8 minutes of work):
# the sampler and train-step benchmarks against PyTorch + transformers on the GPU, the step/sampler
# correctness tests on the GPU, and the quickstart's smoke run end to end. Logs go to $OUT (or /tmp/gpu_check).
# Packages the GPU image lacks travel as wheels in .whl/ (see bench/README.md).
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint, grain, torch, transformers as t; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', t.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@" 2>&1 | grep -v "Writing model shards" | tee "$OUT/$name.txt"; echo "=== $name rc ${PIPESTATUS[0]}"; }
step sampler_bf16 100 python3 bench/sampler.py --sizes h1024x8 --dtype bfloat16
step sampler_f32 100 python3 bench/sampler.py --sizes h1024x8 --dtype float32
step train_step 140 python3 bench/train_step.py --batch 4
step tests 170 env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_train_step.py
step quickstart_smoke 80 python3 run.py --config configs/quickstart.py:smoke --workdir /tmp/kld_smoke
