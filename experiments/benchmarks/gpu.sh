#!/usr/bin/env bash
# Every GPU benchmark of optdist in one call (about 8 minutes on an H100), for a machine with jax
# and optax but without this package installed (the lent GPU image: no network, no ml_collections).
#
#   bash experiments/benchmarks/gpu.sh            # writes JSON + one log to $OUT (or ./gpu_results)
#
# Order: correctness first (kernel tests compiled for the GPU, not interpreted), then the timings.
# Each step has its own time limit, so one slow benchmark cannot eat the others' time.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" /tmp/optdist_path
ln -sfn "$PWD/kernels" /tmp/optdist_path/optdist_kernels  # the package-dir mapping of pyproject
export PYTHONPATH="$PWD:/tmp/optdist_path:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
step() {
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
}
step 60 python3 -c "import jax, optax; print('jax', jax.__version__, jax.devices())"
step 150 env OPTDIST_TEST_ACCELERATOR=1 python3 -m pytest -q -p no:cacheprovider tests/kernels
step 150 python3 -m optdist_kernels.bench --out "$OUT/kernels.json"
step 120 python3 -m optdist.preconditioning.bench --out "$OUT/shampoo.json"
step 90 python3 -m experiments.benchmarks.shampoo_step --out "$OUT/shampoo_lm.json"
step 45 python3 -m optdist.compression.bench --out "$OUT/compression.json"
step 30 python3 -m optdist.outer.bench --out "$OUT/outer.json"
step 30 python3 -m optdist.robust.bench --out "$OUT/robust.json"
step 30 python3 -m experiments.benchmarks.simulate_overhead --out "$OUT/simulate.json"
