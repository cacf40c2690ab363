#!/usr/bin/env python3
"""Full-size check of `convert --format hf`: a random-weight cn_clip model in the official `.pt`
layout → our converter → transformers' `ChineseCLIPModel`, whose features must equal cn_clip's.

The CI test (`cargo test -p cnclip-model --test hf_export`) does this for a tiny ViT; this script does
it for the real architectures, too large to commit. Run from the repository root with the reference
venv, after `cargo build --example convert` (or pass --convert to a release build):

    PY=$(bash ../shared/tools/ref-venv.sh)
    "$PY" scripts/check_hf_export.py --model ViT-B-16 --work /tmp/hf-check
    "$PY" scripts/check_hf_export.py --model ViT-L-14 --work /tmp/hf-check
    "$PY" scripts/check_hf_export.py --model ViT-H-14 --work /tmp/hf-check   # ~4 GB per copy

1. cn_clip's own `CLIP(**model_info)` with cn_clip's JSON configs, seeded, re-randomised as the model
   fixtures are (LayerNorms, biases, logit_scale: make_model_fixtures.py's `rerandomise`), saved as
   the dict cn_clip's training writes (`module.` keys, plus the two fake `bert.pooler` keys).
2. `convert --format hf` (it verifies its own read-back).
3. `ChineseCLIPModel.from_pretrained(output_loading_info=True)`: no missing/unexpected/mismatched
   key, no transformers log line about weights.
4. `get_image_features` / `get_text_features` on seeded images and `cn_clip.clip.tokenize` ids
   against cn_clip's `encode_image` / `encode_text` (fp32, eval): max |Δ| / max |ref| ≤ 1e-5.

Prints one JSON line per model. Leaves nothing in --work but an empty directory.
"""
import argparse
import gc
import io
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "crates/cnclip-model/tests/fixtures"))
import make_model_fixtures as mf  # noqa: E402  (cn_clip model building shared with the fixtures)

TEXT_FOR = {
    "ViT-B-16": "RoBERTa-wwm-ext-base-chinese",
    "ViT-B-32": "RoBERTa-wwm-ext-base-chinese",
    "ViT-L-14": "RoBERTa-wwm-ext-large-chinese",
    "ViT-L-14-336": "RoBERTa-wwm-ext-large-chinese",
    "ViT-H-14": "RoBERTa-wwm-ext-large-chinese",
}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=sorted(TEXT_FOR))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--convert", type=Path, default=ROOT / "target/debug/examples/convert")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import ChineseCLIPModel
    import transformers

    vision, text = args.model, TEXT_FOR[args.model]
    work = args.work / f"hf-check-{vision}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info = mf.model_info(mf.read_config(vision, {}), mf.read_config(text, {}))
    seed = mf.seed_for(f"hfcheck_{vision}")
    torch.manual_seed(seed)
    model = mf.CLIP(**info)
    gen = torch.Generator().manual_seed(seed + 1)
    mf.rerandomise(model, gen, [])
    model = model.float().eval()
    res = info["image_resolution"]
    images = torch.randn(2, 3, res, res, generator=gen)
    ids = mf.tokenize(mf.TEXTS, context_length=mf.CONTEXT_LENGTH)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(ids)
    pt = work / "model.pt"
    torch.save(mf.official_checkpoint(model, f"hfcheck_{vision}", gen), str(pt))
    del model
    gc.collect()

    hf_dir = work / "hf"
    start = time.perf_counter()
    subprocess.run([str(args.convert), "--input", str(pt), "--format", "hf", "--output", str(hf_dir),
                    "--vision-model", vision, "--text-model", text], check=True)
    convert_s = time.perf_counter() - start
    pt.unlink()

    transformers.utils.logging.set_verbosity_info()
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("transformers").addHandler(handler)
    hf, loading = ChineseCLIPModel.from_pretrained(str(hf_dir), output_loading_info=True)
    logging.getLogger("transformers").removeHandler(handler)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                        "error_msgs")), loading
    noisy = [l for l in log.getvalue().splitlines()
             if any(w in l.lower() for w in ("missing", "unexpected", "not used", "newly initialized",
                                             "not initialized", "mismatch"))]
    assert not noisy, noisy
    hf = hf.float().eval()
    with torch.no_grad():
        im = hf.get_image_features(pixel_values=images)
        im = im.pooler_output if hasattr(im, "pooler_output") else im
        tx = hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long(),
                                  token_type_ids=torch.zeros_like(ids))
        tx = tx.pooler_output if hasattr(tx, "pooler_output") else tx
    ri, rt = rel(im, ref_img), rel(tx, ref_txt)
    shutil.rmtree(work)
    print(json.dumps({"model": f"{vision}@{text}", "image_rel": ri, "text_rel": rt,
                      "convert_s": round(convert_s, 1), "loading_info": "clean",
                      "transformers": transformers.__version__, "torch": torch.__version__}))
    assert ri <= 1e-5 and rt <= 1e-5, (ri, rt)


if __name__ == "__main__":
    main()
