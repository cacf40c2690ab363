#!/bin/bash
# Issue 21's acceptance check: random-weight ViT-B-16 and RN50 checkpoints in the released layout,
# exported by `convert --format onnx`, run through cn_clip's unchanged extract_features_onnx.py,
# compared with cn_clip's PyTorch extract_features.py and our extract_features on the same LMDB
# (the loop fixture's 11 images) and 9 texts.
#   scripts/onnx/e2e.sh WORKDIR        (after `cargo build --example convert --example extract_features`)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:?usage: e2e.sh WORKDIR}
PY=${PY:-/root/.cache/cnclip-ref/venv/bin/python}
B=${B:-$repo/target/debug/examples}
run=$repo/../shared/tools/run_cnclip.py
[ -f "$run" ] || run=/work/shared/tools/run_cnclip.py
mkdir -p "$work/data" && cd "$work"
cp "$repo/crates/cnclip-train/tests/fixtures/loop/train_imgs.tsv" data/valid_imgs.tsv
cp "$repo/crates/cnclip-train/tests/fixtures/loop/train_texts.jsonl" data/valid_texts.jsonl
[ -d data/lmdb/valid/imgs ] || "$PY" -m cn_clip.preprocess.build_lmdb_dataset --data_dir data --splits valid
cmp=$repo/scripts/onnx/compare_features.py
for arch in ViT-B-16 RN50; do
  if [ $arch = RN50 ]; then text=RBT3-chinese; else text=RoBERTa-wwm-ext-base-chinese; fi
  [ -f $arch.pt ] || "$PY" "$repo/scripts/onnx/make_random_checkpoint.py" $arch $arch.pt
  data=(--extract-image-feats --extract-text-feats --image-data data/lmdb/valid/imgs
        --text-data data/valid_texts.jsonl --vision-model $arch --text-model $text)
  mkdir -p ref_$arch ort_$arch ort16_$arch ours_$arch onnx
  "$B/convert" --input $arch.pt --vision-model $arch --text-model $text --format onnx \
      --output onnx/$arch --fp16
  "$PY" "$run" cn_clip.eval.extract_features "${data[@]}" --resume $arch.pt --precision fp32 \
      --img-batch-size 4 --text-batch-size 4 \
      --image-feat-output-path ref_$arch/img.jsonl --text-feat-output-path ref_$arch/txt.jsonl >/dev/null
  for v in fp32 fp16; do
    out=ort_$arch; [ $v = fp16 ] && out=ort16_$arch
    "$PY" "$run" cn_clip.eval.extract_features_onnx "${data[@]}" --device cpu \
        --onnx-image-model onnx/$arch.img.$v.onnx --onnx-text-model onnx/$arch.txt.$v.onnx \
        --image-feat-output-path $out/img.jsonl --text-feat-output-path $out/txt.jsonl >/dev/null
  done
  "$B/extract_features" "${data[@]}" --resume $arch.pt --precision fp32 \
      --img-batch-size 4 --text-batch-size 4 \
      --image-feat-output-path ours_$arch/img.jsonl --text-feat-output-path ours_$arch/txt.jsonl >/dev/null
  for k in img txt; do
    "$PY" "$cmp" ref_$arch/$k.jsonl ort_$arch/$k.jsonl 1e-5
    "$PY" "$cmp" ours_$arch/$k.jsonl ort_$arch/$k.jsonl 1e-5
    "$PY" "$cmp" ref_$arch/$k.jsonl ours_$arch/$k.jsonl 1e-5
    "$PY" "$cmp" ref_$arch/$k.jsonl ort16_$arch/$k.jsonl 3e-3
  done
done
