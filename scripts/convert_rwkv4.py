#!/usr/bin/python3
"""Converts an RWKV-4 PyTorch checkpoint (.pth, BlinkDL's names) to safetensors, keeping the
names and validating the shapes.  Usage: scripts/convert_rwkv4.py IN.pth OUT.safetensors [--tokenizer PATH]
(--tokenizer records the model's tokenizer in the metadata: linmix generate / eval then use it.)"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import st  # noqa: E402


def main():
    tok = None  # --tokenizer PATH: recorded in the metadata, so that generate / eval find it
    if len(sys.argv) == 5 and sys.argv[3] == "--tokenizer":
        tok = sys.argv[4]
        sys.argv = sys.argv[:3]
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        w = torch.load(sys.argv[1], map_location="cpu")
    except Exception as e:  # a truncated or foreign file
        print(f"convert_rwkv4: {sys.argv[1]}: cannot load ({e})", file=sys.stderr)
        return 2
    if not isinstance(w, dict) or "emb.weight" not in w:
        print(f"convert_rwkv4: {sys.argv[1]}: not an RWKV-4 state dict (no 'emb.weight')", file=sys.stderr)
        return 2
    V, C = w["emb.weight"].shape
    L = 0
    while f"blocks.{L}.ln1.weight" in w:
        L += 1
    expect = {"head.weight": (V, C), "ln_out.weight": (C,), "blocks.0.ln0.weight": (C,)}
    for i in range(L):
        for n in ("key", "value", "receptance", "output"):
            expect[f"blocks.{i}.att.{n}.weight"] = (C, C)
        for n in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r"):
            expect[f"blocks.{i}.att.{n}"] = C
    for n, shape in expect.items():
        if n not in w:
            print(f"convert_rwkv4: missing tensor '{n}'", file=sys.stderr)
            return 2
        got = tuple(w[n].shape)
        if (isinstance(shape, int) and w[n].numel() != shape) or (not isinstance(shape, int) and got != shape):
            print(f"convert_rwkv4: tensor '{n}': expected shape {shape}, found {list(got)}", file=sys.stderr)
            return 2
    tmp = sys.argv[2] + ".tmp"
    st.save(tmp, {n: t.float().numpy() for n, t in w.items()}, metadata={"tokenizer": tok} if tok else None)
    os.replace(tmp, sys.argv[2])
    print(f"convert_rwkv4: {len(w)} tensors, V={V} C={C} L={L} -> {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
