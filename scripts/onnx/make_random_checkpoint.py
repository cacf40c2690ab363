"""A random-weight checkpoint in the layout of cn_clip's released `.pt` files (the converted
weights in fp16, as `convert_weights` leaves them, `module.` prefixes), for the ONNX end-to-end
check (scripts/onnx/e2e.sh).

    /root/.cache/cnclip-ref/venv/bin/python scripts/onnx/make_random_checkpoint.py ViT-B-16 OUT.pt
"""
import contextlib
import io
import sys

import torch
from cn_clip.clip.utils import _MODEL_INFO, create_model

arch, out = sys.argv[1:3]
torch.manual_seed(0)
with contextlib.redirect_stdout(io.StringIO()):  # create_model prints the model info
    model = create_model(_MODEL_INFO[arch]["struct"])
# BatchNorm statistics other than the 0/1 defaults, so that the export must carry them.
for name, buf in model.named_buffers():
    if name.endswith("running_mean"):
        buf.normal_(0, 0.1)
    elif name.endswith("running_var"):
        buf.uniform_(0.5, 1.5)
sd = {"module." + k: v for k, v in model.state_dict().items()}
torch.save({"epoch": 0, "step": 0, "name": f"random-{arch}", "state_dict": sd}, out)
print(out, sum(v.numel() for v in sd.values()), "numbers")
