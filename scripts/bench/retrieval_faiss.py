#!/usr/bin/env python3
"""Times FAISS IndexFlatIP, cn_clip's make_topk_predictions.py and the Rust `predict` example on the SAME
random unit features with the same thread count, and checks that the Rust ids equal FAISS's and cn_clip's.

    /root/.cache/cnclip-ref/venv/bin/python scripts/bench/retrieval_faiss.py --d 512 --threads 2 \
        --rust-bin target/release/examples/predict

Features: numpy seed 0, Gaussian rows normalised to unit length, written once as native .safetensors
(read by the Rust example) and as cn_clip jsonl (cn_clip's script, only the first --cnclip-queries texts:
the script scores one query at a time, so its full-size time is extrapolated per query).
"""
import argparse
import json
import os
import re
import runpy
import subprocess
import sys
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--nq", type=int, default=5004)
    ap.add_argument("--ng", type=int, default=30399)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cnclip-queries", type=int, default=100)
    ap.add_argument("--rust-bin", default="target/release/examples/predict")
    ap.add_argument("--rust-args", default="", help="extra flags for the Rust example")
    ap.add_argument("--work", default="/tmp/retrieval-bench")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import faiss
    import torch
    from safetensors.numpy import save_file
    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)

    rng = np.random.default_rng(0)
    def unit(n):
        x = rng.standard_normal((n, a.d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    q, g = unit(a.nq), unit(a.ng)
    tag = f"{a.nq}x{a.ng}x{a.d}"
    ip, tp = f"{a.work}/imgs_{tag}.safetensors", f"{a.work}/texts_{tag}.safetensors"
    for path, x, kind in ((ip, g, "image"), (tp, q, "text")):
        save_file({"ids": np.arange(len(x), dtype=np.int64), "features": x}, path,
                  metadata={"kind": kind, "dim": str(a.d)})
    flops = 2.0 * a.nq * a.ng * a.d

    # FAISS flat inner product
    index = faiss.IndexFlatIP(a.d)
    index.add(g)
    best = 1e9
    for _ in range(a.repeat):
        t = time.perf_counter()
        _, fids = index.search(q, a.k)
        best = min(best, time.perf_counter() - t)
    print(f"faiss IndexFlatIP {tag} k={a.k} threads={a.threads}: {best:.3f} s ({flops / best / 1e9:.0f} GFLOP/s)")

    # torch fp32 GEMM alone: the measured peak
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    gemm = 1e9
    for _ in range(a.repeat):
        t = time.perf_counter()
        qt @ gt.T
        gemm = min(gemm, time.perf_counter() - t)
    print(f"torch fp32 GEMM alone: {gemm:.3f} s ({flops / gemm / 1e9:.0f} GFLOP/s)")

    # Rust predict example
    out = f"{a.work}/rust_pred_{tag}.jsonl"
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    rbest = 1e9
    for _ in range(a.repeat):
        r = subprocess.run([a.rust_bin, "--image-feats", ip, "--text-feats", tp, "--top-k", str(a.k),
                            "--output", out, "--device", "cpu"] + a.rust_args.split(),
                           env=env, capture_output=True, text=True, check=True)
        m = re.search(r"search ([0-9.]+) s", r.stderr)
        rbest = min(rbest, float(m.group(1)))
    print(f"rust predict {a.rust_args or '(int8)'}: {rbest:.3f} s ({flops / rbest / 1e9:.0f} GFLOP/s fp32-equivalent); "
          f"{best / rbest:.2f}x FAISS")
    rust = [json.loads(l)["image_ids"] for l in open(out)]
    same = sum(list(map(int, f)) == r for f, r in zip(fids, rust))
    print(f"ids identical to FAISS on {same}/{a.nq} queries (differences only at fp32 near ties)")

    # cn_clip's make_topk_predictions.py on the first --cnclip-queries texts (CPU: .cuda() is identity)
    n = a.cnclip_queries
    ij, tj = f"{a.work}/imgs_{tag}.jsonl", f"{a.work}/texts_{tag}_{n}.jsonl"
    if not os.path.exists(ij):
        with open(ij, "w") as f:
            for i, v in enumerate(g):
                f.write(json.dumps({"image_id": i, "feature": v.tolist()}) + "\n")
    with open(tj, "w") as f:
        for i, v in enumerate(q[:n]):
            f.write(json.dumps({"text_id": i, "feature": v.tolist()}) + "\n")
    torch.Tensor.cuda = lambda self, *x, **y: self
    cout = f"{a.work}/cnclip_pred_{tag}.jsonl"
    sys.argv = ["make_topk_predictions", "--image-feats", ij, "--text-feats", tj, "--top-k", str(a.k),
                "--output", cout]
    t = time.perf_counter()
    runpy.run_module("cn_clip.eval.make_topk_predictions", run_name="__main__")
    ct = time.perf_counter() - t
    per_q = ct / n
    print(f"cn_clip make_topk_predictions.py: {ct:.2f} s for {n} queries (incl. jsonl load) -> "
          f"{per_q * a.nq:.1f} s extrapolated to {a.nq}; rust is {per_q * a.nq / rbest:.0f}x faster")
    cn = [json.loads(l)["image_ids"] for l in open(cout)]
    same = sum(c == r for c, r in zip(cn, rust))
    print(f"ids identical to cn_clip on {same}/{n} queries")


if __name__ == "__main__":
    main()
