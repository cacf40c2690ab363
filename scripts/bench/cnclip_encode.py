"""Times cn_clip 1.6.0's image and text encoders on CPU, for comparison with `cargo bench --bench encode`.

Same model config, batch size, input shapes and thread count as the Rust bench; weights are random
(speed does not depend on their values). Run with the reference venv:

    PY=$(bash ../shared/tools/ref-venv.sh)
    $PY scripts/bench/cnclip_encode.py --model ViT-B-16 --batch 16 --threads 2

Prints one JSON line per measurement: images/s (or texts/s) for cn_clip fp32 (the extract_features.py
path: fp32 model, no autocast) and for torch CPU bf16 autocast.
"""
import argparse
import json
import time

import torch


def _stub_torchvision_if_missing():
    """cn_clip.clip imports torchvision transforms at import time; the encoders never use them. A
    GPU image with torch alone can still run this benchmark with inert stand-ins."""
    try:
        import torchvision.transforms  # noqa: F401
    except ImportError:
        import sys
        import types
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        for name in ["Compose", "ToTensor", "Normalize", "Resize", "InterpolationMode"]:
            setattr(tr, name, type(name, (), {"BICUBIC": None}))
        tv.transforms = tr
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tr


def _stub_numpy_if_missing():
    """cn_clip's model uses numpy only for np.log(1/0.07) at construction."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        import math
        import sys
        import types
        np = types.ModuleType("numpy")
        np.log = math.log
        sys.modules["numpy"] = np


_stub_torchvision_if_missing()
_stub_numpy_if_missing()
from cn_clip.clip import tokenize  # noqa: E402
from cn_clip.clip.model import CLIP, convert_weights  # noqa: E402


def build(model_name):
    import importlib.resources as res
    import cn_clip.clip as clip_pkg

    vision, text = {
        "ViT-B-16": ("ViT-B-16", "RoBERTa-wwm-ext-base-chinese"),
        "ViT-L-14": ("ViT-L-14", "RoBERTa-wwm-ext-base-chinese"),
        "ViT-H-14": ("ViT-H-14", "RoBERTa-wwm-ext-large-chinese"),
        "RN50": ("RN50", "RBT3-chinese"),
    }[model_name]
    base = res.files(clip_pkg) / "model_configs"
    info = json.loads((base / f"{vision}.json").read_text())
    info.update(json.loads((base / f"{text}.json").read_text()))
    if isinstance(info["vision_layers"], str):
        info["vision_layers"] = eval(info["vision_layers"])
    model = CLIP(**info).float().eval()
    return model, info["image_resolution"]


def timed(fn, iters):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, res = build(args.model)
    dev = torch.device(args.device)
    model = model.to(dev)
    images = torch.randn(args.batch, 3, res, res, device=dev)
    texts = tokenize(["这是一张图片，里面存在商品：女士夏季新款连衣裙"] * args.batch, context_length=52).to(dev)

    def report(what, mode, seconds):
        print(json.dumps({"impl": "cn_clip", "model": args.model, "device": args.device, "what": what, "mode": mode,
                          "batch": args.batch, "threads": args.threads,
                          "per_s": round(args.batch / seconds, 3), "s_per_batch": round(seconds, 4)}))

    with torch.no_grad():
        report("image", "fp32", timed(lambda: model.encode_image(images), args.iters))
        report("text", "fp32", timed(lambda: model.encode_text(texts), args.iters))
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            report("image", "bf16-autocast", timed(lambda: model.encode_image(images), args.iters))
            report("text", "bf16-autocast", timed(lambda: model.encode_text(texts), args.iters))
        if dev.type == "cuda":
            # load_from_name(..., device="cuda") / extract_features.py --precision fp16.
            convert_weights(model)
            report("image", "fp16", timed(lambda: model.encode_image(images), args.iters))
            report("text", "fp16", timed(lambda: model.encode_text(texts), args.iters))


if __name__ == "__main__":
    main()
