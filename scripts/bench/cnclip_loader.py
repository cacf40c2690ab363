"""cn_clip 1.6.0's data path on the CPU: `LMDBDataset.__getitem__` (LMDB read, pickle, urlsafe base64,
Pillow decode, Resize((S, S), BICUBIC), convert('RGB'), ToTensor, Normalize, tokenize) without
augmentation, timed per sample in one process with one torch thread, i.e. samples/s per core.
With --workers K > 0 it also times torch's DataLoader(num_workers=K, batch_size=B) and reports
samples/s per worker. Prints one JSON line per measurement.

    python scripts/bench/cnclip_loader.py LMDB_SPLIT_DIR [--resolution 224] [--samples 2000] [--workers 0]
"""

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from cn_clip.training.data import LMDBDataset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lmdb")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = LMDBDataset(args.lmdb, split="val", max_txt_length=52, use_augment=False, resolution=args.resolution)
    n = min(args.samples, ds.number_samples)
    for i in range(min(50, n)):  # warm-up: page cache, imports, allocator
        ds[i]
    start = time.perf_counter()
    for i in range(n):
        ds[i]
    dt = time.perf_counter() - start
    print(json.dumps({"impl": "cn_clip", "mode": "getitem", "resolution": args.resolution, "samples": n,
                      "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
                      "samples_per_s_per_core": round(n / dt, 1)}))
    if args.workers > 0:
        ds.dataset_len = n
        dl = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, shuffle=False)
        start = time.perf_counter()
        seen = sum(len(b[0]) for b in dl)
        dt = time.perf_counter() - start
        print(json.dumps({"impl": "cn_clip", "mode": "dataloader", "workers": args.workers, "batch": args.batch,
                          "resolution": args.resolution, "samples": seen, "seconds": round(dt, 3),
                          "samples_per_s": round(seen / dt, 1),
                          "samples_per_s_per_core": round(seen / dt / args.workers, 1)}))


if __name__ == "__main__":
    main()
