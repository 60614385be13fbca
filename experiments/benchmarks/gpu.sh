#!/usr/bin/env bash
# The GPU checks of optdist in one call (at most ~7 minutes; ALL=1 adds ~3 more), for a machine with jax
# and optax but without this package installed (the lent GPU image: no network, no ml_collections).
#
#   bash experiments/benchmarks/gpu.sh            # writes JSON + one log to $OUT (or ./gpu_results)
#   SMALL=1 bash experiments/benchmarks/gpu.sh    # smoke run of the same steps at tiny sizes (CPU)
#   ALL=1 bash experiments/benchmarks/gpu.sh      # also compression / outer / robust / simulation
#
# Order: correctness first (kernel tests compiled for the GPU, not interpreted), then the timings.
# Each step has its own time limit, so one slow benchmark cannot eat the others' time.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" /tmp/optdist_path
ln -sfn "$PWD/kernels" /tmp/optdist_path/optdist_kernels  # the package-dir mapping of pyproject
export PYTHONPATH="$PWD:/tmp/optdist_path:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
S=${SMALL:+--small}
step() {
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
}
step 30 python3 -c "import jax, optax; print('jax', jax.__version__, jax.devices())"
step 90 env OPTDIST_TEST_ACCELERATOR=1 python3 -m pytest -q -p no:cacheprovider tests/kernels
step 100 python3 -m optdist_kernels.bench $S --out "$OUT/kernels.json"
step 100 python3 -m optdist.preconditioning.bench $S --out "$OUT/shampoo.json"
step 80 python3 -m experiments.benchmarks.shampoo_step $S --out "$OUT/shampoo_lm.json"
if [ -n "${ALL:-}" ]; then  # the step-time benchmarks of the other families (about 3 more minutes)
  step 60 python3 -m optdist.compression.bench $S --out "$OUT/compression.json"
  step 40 python3 -m optdist.outer.bench $S --out "$OUT/outer.json"
  step 40 python3 -m optdist.robust.bench $S --out "$OUT/robust.json"
  step 40 python3 -m experiments.benchmarks.simulate_overhead --out "$OUT/simulate.json"
  step 40 python3 -m optdist.decentralized.bench $S --out "$OUT/gossip.json"
fi
