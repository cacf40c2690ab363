"""Compares two cn_clip feature jsonl files (`{"image_id"|"text_id": id, "feature": [...]}`):
same ids in the same order, and the largest |Δ| over max |reference| (the features are unit
vectors, so this is the largest elementwise error relative to the largest component).

    python compare_features.py REFERENCE.jsonl OTHER.jsonl [TOLERANCE]
"""
import json
import sys

import numpy as np


def read(path):
    ids, feats = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            ids.append(row.get("image_id", row.get("text_id")))
            feats.append(row["feature"])
    return ids, np.array(feats, dtype=np.float64)


ref_ids, ref = read(sys.argv[1])
ids, other = read(sys.argv[2])
tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-5
assert ids == ref_ids, (ids, ref_ids)
err = float(np.abs(other - ref).max() / np.abs(ref).max())
print(f"{sys.argv[2]} vs {sys.argv[1]}: {len(ids)} rows, max rel {err:.2e}")
sys.exit(0 if err <= tol else 1)
