#!/bin/bash
# Ours vs cn_clip 1.6.0, image and text encoding on the CPU, same model config, batch and threads,
# one after the other in the same run. Usage: scripts/bench/compare_encode_cpu.sh [MODEL] [BATCH] [THREADS] [ITERS]
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-ViT-B-16} batch=${2:-16} threads=${3:-2} iters=${4:-5}
PY=$(bash ../shared/tools/ref-venv.sh)
cargo bench --quiet --bench encode -- --model "$model" --batch "$batch" --threads "$threads" --iters "$iters" | grep '^{'
"$PY" scripts/bench/cnclip_encode.py --model "$model" --batch "$batch" --threads "$threads" --iters "$iters"
