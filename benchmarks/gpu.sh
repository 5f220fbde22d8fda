#!/bin/bash
# The GPU measurements of benchmarks/RESULTS.md, in stages that each fit a
# short lease on one H100/H200:
#
#   bash benchmarks/gpu.sh env b16        # versions, bf16 peak, ViT-B/16
#   bash benchmarks/gpu.sh large compile  # ViT-L/16, ViT-H/14, compile
#
# Results go to $OUT (default ./out/gpu). Uses the machine's own jax, flax and
# optax (jax 0.11.1-0.12 with flax >= 0.12.10 on Python 3.12 are within setup.py's
# ranges; see RESULTS.md, "GPU").
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Let XLA take most of the card (default 75%), for the largest-batch runs.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONPATH=$PWD
PY=python3
B16="--models ViT-B_16 --dtype bfloat16 --steps 10"

for stage in "$@"; do
  echo "=== stage $stage ($(date -u +%H:%M:%S))"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm \
        --format=csv
      $PY -c "
import jax, flax, optax, jax.numpy as jnp
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print(jax.devices())
from benchmarks import common
for n in (4096, 8192):
  r = common.matmul_peak(n, jnp.bfloat16, repeats=10, inner=8)
  print(f'bf16 {n}^3 matmul: {r[\"flops_per_s\"]/1e12:.0f} TFLOP/s (median), '
        f'{r[\"best_flops_per_s\"]/1e12:.0f} best')
" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    b16)
      $PY -m benchmarks.run $B16 --batch 256 --attention xla,cudnn \
        --json "$OUT/b16_attn.json" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    b16_batch)
      $PY -m benchmarks.run $B16 --batch 128,512 --attention default \
        --json "$OUT/b16_batch.json" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    b16_flags)
      XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
        $PY -m benchmarks.run $B16 --batch 256 --attention default \
        --json "$OUT/b16_notriton.json" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    b16_scan)
      $PY -m benchmarks.run $B16 --batch 256 --attention default --scan \
        --remat none,dots,full --json "$OUT/b16_scan.json" 2>&1 \
        | tee -a "$OUT/log.txt"
      ;;
    large)
      $PY -m benchmarks.run --models ViT-L_16,ViT-H_14 --dtype bfloat16 \
        --batch 128 --scan --remat none,dots,full --steps 3 \
        --json "$OUT/large.json" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    memory)
      $PY -m benchmarks.memory --model ViT-L_16 --dtype bfloat16 \
        --budget_gib 64 --remat none,full,dots --batch 64,256 --time_ratio 4 \
        --steps 5 --json "$OUT/memory_l16.json" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    compile)
      timeout 300 $PY -m benchmarks.compile_time --model ViT-H_14 --repeats 1 \
        --dtype bfloat16 --batch 32 --skip_check \
        --json "$OUT/compile_h14.json" 2>&1 | tee -a "$OUT/log.txt"
      ;;
    *) echo "unknown stage $stage"; exit 2;;
  esac
done
