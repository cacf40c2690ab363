#!/bin/bash
# cn_clip 1.6.0's real DDP training (main.py, unchanged, under torchrun as 2 Gloo ranks on this CPU via
# ../shared/tools/run_cnclip_train.py) against ours (`finetune --nproc-per-node 2`), on the loop
# fixture's data and tiny model (dropout 0), 2 samples per rank, fp32, 5 steps, in each of cn_clip's
# gather modes: the per-step losses rank 0 logs, side by side, and the largest relative difference.
# Usage (repository root): bash scripts/bench/compare_ddp_cnclip.sh   (~1 min; BIN= another finetune)
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-$(bash ../shared/tools/ref-venv.sh | tail -1)}
BIN=${BIN:-target/debug/examples/finetune}
[ -x "$BIN" ] || cargo build --example finetune
FX=crates/cnclip-model/tests/fixtures/model
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# A throwaway copy of cn_clip with the tiny configs among its model configs.
"$PY" - "$T/pkg" "$FX" <<'EOF'
import importlib.util, pathlib, shutil, sys
src = pathlib.Path(importlib.util.find_spec("cn_clip").submodule_search_locations[0])
dst = pathlib.Path(sys.argv[1]) / "cn_clip"
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
fx = pathlib.Path(sys.argv[2]) / "configs"
shutil.copy(fx / "tiny-vit.json", dst / "clip/model_configs/tiny-vit.json")
shutil.copy(fx / "tiny-bert.json", dst / "clip/model_configs/tiny-bert.json")
EOF
mkdir -p "$T/raw"
cp crates/cnclip-train/tests/fixtures/loop/train_imgs.tsv crates/cnclip-train/tests/fixtures/loop/train_texts.jsonl "$T/raw/"
PYTHONPATH="$T/pkg" "$PY" -m cn_clip.preprocess.build_lmdb_dataset --data_dir "$T/raw" --splits train \
  --lmdb_dir "$T/lmdb" > /dev/null 2>&1

common=(--train-data "$T/lmdb/train" --batch-size 2 --context-length 52 --max-steps 5 --warmup 2
        --lr 1e-3 --wd 0.1 --beta1 0.9 --beta2 0.98 --eps 1e-6 --precision fp32 --seed 123
        --vision-model tiny-vit --text-model tiny-bert --resume "$FX/tiny_vit.pt" --save-epoch-frequency 1)
losses() { grep -o 'Global Steps: [0-9]*/[0-9]* .* Loss: [0-9.]*' "$1" | sed 's/.*Loss: //'; }

for mode in "" --gather-with-grad --skip-aggregate; do
  PYTHONPATH="$T/pkg" "$PY" -m torch.distributed.run --nproc_per_node=2 --master_port=$((29600 + RANDOM % 300)) \
    -- ../shared/tools/run_cnclip_train.py "${common[@]}" --logs "$T/ref$mode" --name r --num-workers 0 \
    --log-interval 1 --reset-data-offset --reset-optimizer $mode > "$T/ref.log" 2>&1 \
    || { tail -30 "$T/ref.log"; exit 1; }
  ours=("${common[@]/tiny-vit/$FX/configs/tiny-vit.json}")
  ours=("${ours[@]/tiny-bert/$FX/configs/tiny-bert.json}")
  "$BIN" "${ours[@]}" --logs "$T/ours$mode" --name o --num-workers 1 --device cpu --nproc-per-node 2 \
    $mode > "$T/ours.log" 2>&1 || { tail -30 "$T/ours.log"; exit 1; }
  echo "== ${mode:-default (aggregate)}: step, cn_clip loss, our loss"
  paste <(seq 1 5) <(losses "$T/ref.log") <(losses "$T/ours.log") | tee "$T/pair"
  awk '{d = ($2 - $3) / $2; if (d < 0) d = -d; if (d > m) m = d} END {printf "max relative difference %.2e\n", m}' "$T/pair"
done
