"""Writes a synthetic MUGE-like split for the loader benchmark: `{out}/train_imgs.tsv` and
`{out}/train_texts.jsonl`.

Images are deterministic JPEGs (quality 90, 4:2:0) of product-photo-like content (smooth shapes,
edges and mild noise) with sides drawn from [--min-side, --max-side]; each text references two
images. Usage:

    python scripts/bench/make_loader_bench_data.py OUT [--images 2000] [--min-side 300] [--max-side 600]
"""

import argparse
import base64
import io
import json
import os

import numpy as np
from PIL import Image


def image(rng, w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7), min(w, h) * rng.uniform(0.2, 0.4)
    inside = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
    bg = rng.uniform(180, 250, size=3)
    fg = rng.uniform(0, 255, size=3)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        shade = bg[c] - 30 * (y / h) + 10 * np.sin(x / 17.0 + c)
        img[:, :, c] = np.where(inside, fg[c] + 25 * np.cos(y / 9.0 + x / 13.0), shade)
    img += rng.normal(0, 4, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--min-side", type=int, default=300)
    ap.add_argument("--max-side", type=int, default=600)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(7)
    total = 0
    with open(os.path.join(args.out, "train_imgs.tsv"), "w") as f:
        for i in range(args.images):
            w, h = rng.integers(args.min_side, args.max_side + 1, size=2)
            b = io.BytesIO()
            image(rng, int(w), int(h)).save(b, "JPEG", quality=90)
            total += len(b.getvalue())
            f.write(f"{100000 + i}\t{base64.b64encode(b.getvalue()).decode()}\n")
    with open(os.path.join(args.out, "train_texts.jsonl"), "w") as f:
        for t in range(args.images):
            ids = [100000 + t, 100000 + (t * 7 + 3) % args.images]
            f.write(json.dumps({"text_id": t, "text": f"商品 {t} 连衣裙 夏季新款", "image_ids": ids},
                               ensure_ascii=False) + "\n")
    print(f"{args.images} images, mean {total / args.images / 1024:.1f} KiB per JPEG, {2 * args.images} pairs")


if __name__ == "__main__":
    main()
