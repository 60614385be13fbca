#!/usr/bin/env bash
# The GPU checks of optdist in one call (at most ~8 minutes; ALL=1 adds ~3 more), for a machine with jax
# and optax but without this package installed (the lent GPU image: no network, no ml_collections).
#
#   bash experiments/benchmarks/gpu.sh            # writes JSON + one log to $OUT (or ./gpu_results)
#   SMALL=1 bash experiments/benchmarks/gpu.sh    # smoke run of the same steps at tiny sizes (CPU)
#   ALL=1 bash experiments/benchmarks/gpu.sh      # also compression / outer / robust / simulation
#
# Order: correctness first (kernel tests compiled for the GPU, not interpreted), then the timings.
# Each step has its own time limit, so one slow benchmark cannot eat the others' time; every benchmark
# rewrites its JSON after each row, so a step stopped by its limit leaves the rows it measured.
# A failed or timed-out step does not stop the others; the script exits 1 if any step failed and
# lists them at the end (and in $OUT/gpu.log).
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT" /tmp/optdist_path
ln -sfn "$PWD/kernels" /tmp/optdist_path/optdist_kernels  # the package-dir mapping of pyproject
export PYTHONPATH="$PWD:/tmp/optdist_path:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
S=${SMALL:+--small}
FAILED=()
step() {
  local limit=$1
  shift
  echo "== $* (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "== timed out after ${limit}s: $*" | tee -a "$LOG"
    echo "== FAILED (exit $rc): $*" | tee -a "$LOG"
    FAILED+=("$* (exit $rc)")
  fi
}
step 30 python3 -c "import jax, optax; print('jax', jax.__version__, jax.devices())"
step 90 env OPTDIST_TEST_ACCELERATOR=1 python3 -m pytest -q -p no:cacheprovider tests/kernels
step 100 python3 -m experiments.benchmarks.kernels $S --out "$OUT/kernels.json"
step 100 python3 -m experiments.benchmarks.shampoo_roots $S --out "$OUT/shampoo.json"
step 80 python3 -m experiments.benchmarks.shampoo_step $S --out "$OUT/shampoo_lm.json"
step 90 python3 -m experiments.benchmarks.compression_cost $S --out "$OUT/compression_cost.json"
step 60 python3 -m experiments.benchmarks.overlap $S --out "$OUT/overlap.json"  # records a skip on one GPU
if [ -n "${ALL:-}" ]; then  # the step-time benchmarks of the other families (about 3 more minutes)
  step 60 python3 -m experiments.benchmarks.compression $S --out "$OUT/compression.json"
  step 40 python3 -m experiments.benchmarks.outer_loop $S --out "$OUT/outer.json"
  step 40 python3 -m experiments.benchmarks.robust $S --out "$OUT/robust.json"
  step 40 python3 -m experiments.benchmarks.simulate_overhead --out "$OUT/simulate.json"
  step 40 python3 -m experiments.benchmarks.gossip $S --out "$OUT/gossip.json"
fi
if [ ${#FAILED[@]} -ne 0 ]; then
  echo "== ${#FAILED[@]} step(s) failed:" | tee -a "$LOG"
  printf '   %s\n' "${FAILED[@]}" | tee -a "$LOG"
  exit 1
fi
echo "== all steps passed" | tee -a "$LOG"
