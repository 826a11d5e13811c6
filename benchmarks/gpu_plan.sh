#!/usr/bin/env bash
# The benchmark plan on one CUDA GPU, in under 10 minutes on an H100/H200 (each configuration in its
# own process, bf16 base under autocast, 512x512 px for SD1.5 and 1024x1024 px for SDXL):
#   1. SD1.5 U-Net: SaRA (with / without the rank term), PEFT LoRA and full FT at 5M/20M/50M, batch 1 and 4
#   2. SD1.5, batch 1: the SDDMM delta gradient forced on, against the dense GEMM (the rule's CUDA case)
#   3. SDXL U-Net: SaRA vs LoRA at 5M/20M, batch 1
# Results go to benchmarks/results/memory_speed*_cuda_bf16*.{md,json} (or $OUT when set).
#   bash benchmarks/gpu_plan.sh [python]
# Needs torch with CUDA, diffusers, peft; bitsandbytes if present (else torch AdamW for every method).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
RESULTS=${OUT:-benchmarks/results}
OPTIM=adamw8bit
"$PY" -c "import bitsandbytes" 2>/dev/null || OPTIM=adamw
COMMON=(--device cuda --dtype bf16 --threads 8 --steps 10 --warmup 2 --optim "$OPTIM" --out "$RESULTS" --fresh --timeout 120)
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" benchmarks/memory_speed.py --plan gpu --latent 64 --budgets 5M,20M,50M --batches 1,4 "${COMMON[@]}"
"$PY" benchmarks/memory_speed.py --plan norank --latent 64 --budgets 5M,50M --only_ckpt off --sampled_grad on \
  --methods sara_norank "${COMMON[@]}"
"$PY" benchmarks/memory_speed.py --plan sdxl --arch sdxl --latent 128 --budgets 5M,20M --methods sara,lora "${COMMON[@]}"
