#!/bin/bash
# Runs on a borrowed GPU machine against binaries built on a CPU machine (see docs/BENCHMARKS.md,
# "GPU checks"). Prepare, from the repository root:
#   cargo test -p retrieval --release --test topk --no-run        -> gpu-bin/topk
#   cargo test -p cnclip-train --release --test trainer --no-run  -> gpu-bin/trainer
#   cargo bench --bench train_step --no-run                       -> gpu-bin/train_step
#   cn_clip (pure Python) and six.py from the reference venv      -> gpu-py/
# and carry gpu-bin and gpu-py (both git-ignored).
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-/opt/torch/.venv/bin/python}
export RUST_BACKTRACE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== retrieval: CUDA top-k vs brute force"
./gpu-bin/topk --exact cuda_search_matches_brute_force --nocapture 2>&1 | grep -E "cuda|test result|panicked|skipped"
echo "== trainer: AMP and bf16 steps on CUDA"
./gpu-bin/trainer --exact cuda_amp_and_bf16_steps --nocapture 2>&1 | grep -E "cuda|test result|panicked|skipped|assert|left|right"
echo "== training step throughput, ours vs cn_clip's model + loss + AdamW groups (same shapes)"
for spec in "ViT-B-16 64 fp32" "ViT-B-16 64 amp" "ViT-B-16 64 bf16" "ViT-H-14 32 amp"; do
  set -- $spec
  ./gpu-bin/train_step --model "$1" --batch "$2" --precision "$3" --iters 5 --device cuda 2>&1 | tail -3
  (cd scripts/bench && PYTHONPATH=$OLDPWD/gpu-py $PY cnclip_train_step.py --model "$1" --batch "$2" --precision "$3" --iters 5 --device cuda 2>&1 | tail -3)
done
echo "== grad checkpointing, ViT-H-14 batch 32 amp"
./gpu-bin/train_step --model ViT-H-14 --batch 32 --precision amp --iters 5 --device cuda --grad-checkpointing 2>&1 | tail -3
(cd scripts/bench && PYTHONPATH=$OLDPWD/gpu-py $PY cnclip_train_step.py --model ViT-H-14 --batch 32 --precision amp --iters 5 --device cuda --grad-checkpointing 2>&1 | tail -3)
