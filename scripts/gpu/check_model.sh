#!/bin/bash
# Runs on a borrowed GPU machine (torch 2.11.0 at /opt/torch/.venv, no Rust, no network) against
# binaries built on a CPU machine. Prepare on the CPU machine (see docs/BENCHMARKS.md, "GPU checks"):
#   cargo test -p cnclip-model --release --test model_parity --no-run   -> gpu-bin/model_parity
#   cargo bench --bench encode --no-run                                 -> gpu-bin/encode
#   cn_clip (pure Python) and six.py from the reference venv            -> gpu-py/
# then run this script from the repository root there. Prints the parity errors and throughputs.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-/opt/torch/.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== CUDA parity of tiny checkpoints (fp32 / fp16 / bf16 vs cn_clip fp32)"
CNCLIP_MODEL_FIXTURES=$PWD/crates/cnclip-model/tests/fixtures/model \
  ./gpu-bin/model_parity --nocapture --test-threads 1 2>&1 | grep -E "cuda|test result|panicked|skipped"
for spec in "ViT-B-16 256" "ViT-H-14 64"; do
  set -- $spec
  echo "== encode throughput $1, batch $2: ours"
  RUST_BACKTRACE=0 ./gpu-bin/encode --model "$1" --batch "$2" --iters 10 --device cuda 2>&1 | tail -12
  echo "== encode throughput $1, batch $2: cn_clip 1.6.0 on torch $($PY -c 'import torch;print(torch.__version__)')"
  PYTHONPATH=$PWD/gpu-py $PY scripts/bench/cnclip_encode.py --model "$1" --batch "$2" --iters 10 --device cuda 2>&1 | tail -6
done
