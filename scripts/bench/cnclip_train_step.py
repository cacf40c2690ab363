"""Times one cn_clip training step (forward, get_loss's symmetric cross-entropy, backward, AdamW with
cn_clip's two parameter groups, logit_scale clamp; amp = autocast fp16 + GradScaler as train.py does)
on random data, for comparison with `cargo bench --bench train_step`. Same config, batch, threads.

    PY=$(bash ../shared/tools/ref-venv.sh)
    $PY scripts/bench/cnclip_train_step.py --model ViT-B-16 --batch 32 --iters 5 --device cpu --precision fp32
"""
import argparse
import json
import time

import torch

from cnclip_encode import build  # same model construction as the encode benchmark


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "amp", "bf16"])
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, res = build(args.model)
    model = model.to(dev).train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n)], "weight_decay": 0.001}],
        lr=5e-5, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler(dev.type) if args.precision == "amp" else None
    images = torch.randn(args.batch, 3, res, res, device=dev)
    texts = torch.randint(672, 8000, (args.batch, 52), device=dev)
    ce = torch.nn.CrossEntropyLoss()
    gt = torch.arange(args.batch, device=dev)
    autocast_dtype = {"amp": torch.float16, "bf16": torch.bfloat16}.get(args.precision)

    def step():
        opt.zero_grad()
        with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            img, txt, scale = model(images, texts)
            logits = scale.mean() * img @ txt.t()
            loss = (ce(logits, gt) + ce(logits.t(), gt)) / 2
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        model.logit_scale.data = torch.clamp(model.logit_scale.data, 0, 4.6052)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.iters
    print(json.dumps({"impl": "cn_clip", "model": args.model, "device": args.device, "precision": args.precision,
                      "grad_checkpointing": args.grad_checkpointing, "batch": args.batch, "threads": args.threads,
                      "steps_per_s": round(1 / seconds, 4), "samples_per_s": round(args.batch / seconds, 2)}))


if __name__ == "__main__":
    main()
