"""Times ONNX Runtime (CPU) on our `convert --format onnx` files, with the shapes, thread count and
warm-up of `cargo bench --bench encode` (random images, the bench's 25-token text padded to 52).

    $PY scripts/bench/onnx_encode.py --prefix DIR/vit-b-16 --model ViT-B-16 --batch 16 --threads 2 --iters 5

Prints one JSON line per measurement, like the Rust bench (`impl` "onnxruntime").
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort

p = argparse.ArgumentParser()
p.add_argument("--prefix", required=True)
p.add_argument("--model", default="ViT-B-16")
p.add_argument("--resolution", type=int, default=224)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--modes", default="fp32")
args = p.parse_args()

ids = [101, 6821, 3221, 671, 2476, 1745, 4275, 8024, 7027, 7481, 2100, 1762, 1555, 1501, 8038,
       1957, 1894, 1909, 1075, 3173, 3621, 6825, 6132, 6170, 102]
texts = np.array([ids + [0] * (52 - len(ids))] * args.batch, dtype=np.int64)
images = np.random.default_rng(0).standard_normal(
    (args.batch, 3, args.resolution, args.resolution)).astype(np.float32)

for mode in args.modes.split(","):
    for what, suffix, name, x in [("image", "img", "image", images), ("text", "txt", "text", texts)]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        start = time.perf_counter()
        sess = ort.InferenceSession(f"{args.prefix}.{suffix}.{mode}.onnx", so,
                                    providers=["CPUExecutionProvider"])
        load = time.perf_counter() - start
        sess.run(None, {name: x})  # warm-up
        start = time.perf_counter()
        for _ in range(args.iters):
            sess.run(None, {name: x})
        s = (time.perf_counter() - start) / args.iters
        print(json.dumps({"impl": "onnxruntime " + ort.__version__, "model": args.model,
                          "device": "cpu", "what": what, "mode": mode, "batch": args.batch,
                          "threads": args.threads, "per_s": round(args.batch / s, 3),
                          "s_per_batch": round(s, 4), "session_load_s": round(load, 2)}))
