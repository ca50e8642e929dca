#!/usr/bin/python3
"""Converts an RWKV PyTorch checkpoint (.pth of BlinkDL's RWKV-LM / ChatRWKV: RWKV-4, 5.1, 5.2,
6.0 or 7.0) to safetensors, keeping every name and shape; linmix reads the version from the
tensors (docs/RWKV.md) and validates the rest by name when it loads the file.
Usage: scripts/convert_rwkv.py IN.pth OUT.safetensors [--tokenizer PATH] [--gn-eps EPS]
  --tokenizer  records the model's tokenizer in the metadata (linmix generate / eval use it)
  --gn-eps     records the group-norm eps of the v5/6/7 blocks (default 64e-5, BlinkDL's; 1e-5
               reproduces rwkv.cpp on v5)"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import rwkv_ref  # noqa: E402
import st  # noqa: E402


def fail(msg):
    print(f"convert_rwkv: {msg}", file=sys.stderr)
    return 2


def main():
    ap = argparse.ArgumentParser(usage=__doc__.strip().splitlines()[3])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--tokenizer")
    ap.add_argument("--gn-eps")
    try:
        a = ap.parse_args()
    except SystemExit:
        return 2
    try:
        w = torch.load(a.src, map_location="cpu")
    except Exception as e:  # a truncated or foreign file
        return fail(f"{a.src}: cannot load ({e})")
    if not isinstance(w, dict) or "emb.weight" not in w or "blocks.0.ln1.weight" not in w:
        return fail(f"{a.src}: not an RWKV state dict (no 'emb.weight' and 'blocks.0.ln1.weight')")
    meta = {}
    if a.tokenizer:
        meta["tokenizer"] = a.tokenizer
    if a.gn_eps is not None:
        try:
            eps = float(a.gn_eps)
        except ValueError:
            eps = -1.0
        if not (0 < eps < 1 and math.isfinite(eps)):
            return fail(f"--gn-eps must be a number in (0, 1), found '{a.gn_eps}'")
        meta["gn_eps"] = a.gn_eps
    ver = rwkv_ref.version(w)
    tmp = a.dst + ".tmp"
    st.save(tmp, {n: t.float().numpy() for n, t in w.items() if torch.is_tensor(t)}, metadata=meta or None)
    os.replace(tmp, a.dst)
    V, C = w["emb.weight"].shape
    print(f"convert_rwkv: RWKV-{ver}, {len(w)} tensors, V={V} C={C} -> {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
