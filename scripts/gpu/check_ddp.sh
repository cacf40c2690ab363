#!/bin/bash
# DDP on a borrowed GPU machine: 1-rank NCCL training steps of the finetune example on CUDA tensors
# (fp32, AMP, --gather-with-grad), launched through the environment, our --nproc-per-node launcher
# and torchrun, plus Gloo on CUDA tensors; then a table. Builds nothing: it runs binaries built on a
# CPU machine (see docs/BENCHMARKS.md, "GPU checks"). Prepare, from the repository root:
#   # NCCL headers: `cargo xtask setup --cuda`, or only the header wheels (nvidia-nccl-cu13==2.28.9,
#   # nvidia-cuda-crt==13.0.88, nvidia-cuda-cccl==13.0.85, cuda-toolkit[cublas,cusolver,cusparse]==13.0.2)
#   # unpacked somewhere and named by CNCLIP_CUDA_INCLUDE=<site>/nvidia/cu13/include:<site>/nvidia/nccl/include
#   cargo build --release --features nccl --example finetune
#   cp target/release/examples/finetune gpu-bin/finetune_nccl
#   mkdir -p gpu-bin/ddp-raw && cp crates/cnclip-train/tests/fixtures/loop/train_* gpu-bin/ddp-raw/
#   target/release/examples/build_lmdb --data_dir gpu-bin/ddp-raw --splits train --lmdb_dir gpu-bin/ddp-lmdb
# and carry gpu-bin (git-ignored). The binary links libtorch_cuda (the `nccl` feature), so it only
# starts where a CUDA torch is found through its rpath: /opt/torch/.venv/.../torch/lib here.
# THROUGHPUT=0 skips the ViT-B-16 step-time comparison (about 2 minutes).
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-/opt/torch/.venv/bin/python}
# BIN/DATA/DEVICE can be overridden to try the script's mechanics on a CPU box (NCCL rows then fail).
BIN=${BIN:-./gpu-bin/finetune_nccl}
DATA=${DATA:-gpu-bin/ddp-lmdb/train}
DEVICE=${DEVICE:-cuda}
FX=crates/cnclip-model/tests/fixtures/model
OUT=$(mktemp -d)
export RUST_BACKTRACE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
[ -x "$BIN" ] && [ -d "$DATA" ] || { echo "missing $BIN or $DATA: see the header of $0"; exit 1; }

tiny=(--train-data "$DATA" --resume "$FX/tiny_vit.pt" --vision-model "$FX/configs/tiny-vit.json"
      --text-model "$FX/configs/tiny-bert.json" --batch-size 4 --lr 1e-3 --wd 0.1 --beta1 0.9
      --beta2 0.98 --eps 1e-6 --warmup 1 --num-workers 2 --device "$DEVICE")
single=(env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531)
ROWS=()

# row NAME COMMAND...: runs it, keeps its log, records status, seconds, last loss and DDP line.
row() {
  local name=$1; shift
  local log="$OUT/$name.log" start end rc loss dist
  start=$(date +%s.%N)
  timeout 300 "$@" > "$log" 2>&1; rc=$?
  end=$(date +%s.%N)
  loss=$(grep -o 'last loss [0-9.naif]*' "$log" | tail -1 | cut -d' ' -f3)
  dist=$(grep -o 'distributed: .*' "$log" | head -1 | sed 's/distributed: //')
  ROWS+=("$(printf '%-22s | %-4s | %6.1f s | %-10s | %s' "$name" \
    "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" "$(awk "BEGIN{print $end - $start}")" "${loss:--}" "${dist:-single process}")")
  if [ $rc != 0 ]; then echo "== $name failed:"; grep -v '^frame' "$log" | tail -15; fi
}

row single-cuda-amp "$BIN" "${tiny[@]}" --max-steps 3 --precision amp --logs "$OUT/a" --name a
row nccl-env-amp "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --logs "$OUT/b" --name b
row nccl-env-fp32 "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision fp32 --logs "$OUT/c" --name c
row nccl-gather-with-grad "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --gather-with-grad --logs "$OUT/d" --name d
row nccl-skip-aggregate "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --skip-aggregate --logs "$OUT/e" --name e
row nccl-launcher "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --nproc-per-node 1 --logs "$OUT/f" --name f
row nccl-torchrun "$PY" -m torch.distributed.run --no-python --nproc_per_node=1 --master_port=29532 -- \
  "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --logs "$OUT/g" --name g
row gloo-cuda-amp "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --precision amp --dist-backend gloo --logs "$OUT/h" --name h
# torch's reducer with the compression comm hooks on NCCL.
row nccl-fp16-hook "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --ddp-comm-hook fp16 --logs "$OUT/i" --name i
row nccl-bf16-hook "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 3 --dist-backend nccl --precision amp --ddp-comm-hook bf16 --logs "$OUT/j" --name j
# Resume under NCCL: the checkpoint of nccl-env-amp continued to step 5.
row nccl-resume "${single[@]}" "$BIN" "${tiny[@]}" --max-steps 5 --dist-backend nccl --precision amp --logs "$OUT/b" --name b

if [ "${THROUGHPUT:-1}" != 0 ]; then
  # ViT-B-16 (random init), batch 32, AMP: seconds per step from the difference of a 12- and a
  # 2-step run (start-up and the final checkpoint cancel), without DDP and as 1 NCCL rank (whose
  # extra work is torch's reducer: the bucketed all-reduce of 188M gradients from autograd hooks).
  vitb=(--train-data "$DATA" --vision-model ViT-B-16 --text-model RoBERTa-wwm-ext-base-chinese
        --batch-size 32 --lr 1e-5 --warmup 1 --num-workers 4 --device "$DEVICE" --precision amp
        --save-epoch-frequency 0)
  for mode in single nccl; do
    for steps in 2 12; do
      pre=(); post=(); [ $mode = nccl ] && { pre=("${single[@]}"); post=(--dist-backend nccl); }
      row "vitb-$mode-$steps" "${pre[@]}" "$BIN" "${vitb[@]}" "${post[@]}" --max-steps $steps --logs "$OUT/v$mode$steps" --name v
    done
  done
fi

echo
printf '%-22s | %-4s | %8s | %-10s | %s\n' check rc time "last loss" "process group"
for r in "${ROWS[@]}"; do echo "$r"; done
if [ "${THROUGHPUT:-1}" != 0 ]; then
  for mode in single nccl; do
    a=$(grep -o 'vitb-'$mode'-2 .*' <<< "$(printf '%s\n' "${ROWS[@]}")" | awk -F'|' '{print $3}' | tr -dc '0-9.')
    b=$(grep -o 'vitb-'$mode'-12 .*' <<< "$(printf '%s\n' "${ROWS[@]}")" | awk -F'|' '{print $3}' | tr -dc '0-9.')
    echo "ViT-B-16 b32 amp, $mode: $(awk "BEGIN{printf \"%.3f\", ($b - $a) / 10}") s/step"
  done
fi
rm -rf "$OUT"
