#!/bin/bash
# Ours vs cn_clip 1.6.0: base64 JPEG in LMDB -> normalised tensor + token ids, no augmentation, on the
# CPU, on the same LMDB (built by our build_lmdb; byte-identical to cn_clip's build). Per core: ours
# with 1 worker thread, cn_clip's LMDBDataset.__getitem__ in one process with one torch thread.
# Usage: scripts/bench/compare_loader_cpu.sh [IMAGES] [RESOLUTION] [WORKERS]   (e.g. 2000 224 1,2)
set -euo pipefail
cd "$(dirname "$0")/../.."
images=${1:-2000} res=${2:-224} workers=${3:-1,2}
PY=$(bash ../shared/tools/ref-venv.sh)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$PY" scripts/bench/make_loader_bench_data.py "$dir" --images "$images"
cargo run --quiet --release --example build_lmdb -- --data_dir "$dir" --splits train >/dev/null
samples=$((images * 2))
cargo bench --quiet --bench loader -- --lmdb "$dir/lmdb/train" --resolution "$res" --samples "$samples" --workers "$workers" | grep '^{'
max_workers=$(echo "$workers" | tr ',' '\n' | sort -n | tail -1)
"$PY" scripts/bench/cnclip_loader.py "$dir/lmdb/train" --resolution "$res" --samples "$samples" --workers "$max_workers"
