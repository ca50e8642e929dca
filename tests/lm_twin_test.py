#!/usr/bin/python3
"""The PyTorch twin of `linmix train` (bench/torch_lm.py, the peer of bench/lm_peer.py's speed
comparison) computes linmix's model: for every mixer it has a form for, on a checkpoint `linmix
train --mixer M` writes (the shape lm_peer.py trains, weights scaled so every path is alive), its
float32 loss and every parameter's gradient against python/model_ref.py in float64 with the
oracle's mechanisms (the model linmix's own gradients are tested against, model_grad_test.py).
Loss to 1e-5 relative, each gradient to 1e-3 of its RMS.  Usage: lm_twin_test.py PATH/TO/linmix"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import torch_lm  # noqa: E402  (puts python/ on the path)
import model_ref  # noqa: E402
import st  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-twin-")


def main():
    corpus = os.path.join(TMP, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 200)
    rng = np.random.default_rng(7)
    B, T = 2, 70  # the linear twin's chunks of 64: one full, one partial
    x = torch.tensor(rng.integers(0, 256, (B, T)))
    y = torch.tensor(rng.integers(0, 256, (B, T)))
    failed = 0
    for mixer in torch_lm.MECHANISMS:
        run = os.path.join(TMP, mixer)
        subprocess.run([LINMIX, "train", "--data", corpus, "--mixer", mixer, "--steps", "1", "--batch", "2", "--seq",
                        "8", "--out", run], check=True, capture_output=True)
        ck = os.path.join(run, "ckpt.safetensors")
        w = st.load(ck)
        model_ref.alive_weights(w)
        big = os.path.join(run, "big.safetensors")
        st.save(big, {n: a for n, a in w.items() if not n.startswith("opt.")}, metadata=st.header(ck)["__metadata__"])
        twin, ref = torch_lm.Twin(big), torch_lm.Twin(big, dtype=torch.float64, fast=False)
        lt, lr = twin.loss(x, y), ref.loss(x, y)
        lt.backward()
        lr.backward()
        ok = abs(lt.item() - lr.item()) <= 1e-5 * abs(lr.item())
        worst, worst_name = 0.0, ""
        for n, t in ref.p.items():
            if not t.requires_grad:
                continue
            want, got = t.grad.numpy(), twin.p[n].grad
            got = np.zeros_like(want) if got is None else got.double().numpy()  # no path to it: 0
            rel = np.sqrt(np.mean((got - want) ** 2)) / max(np.sqrt(np.mean(want ** 2)), 1e-30)
            if rel > worst:
                worst, worst_name = rel, n
        ok = ok and worst <= 1e-3
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {mixer}: loss {lt.item():.7f} vs {lr.item():.7f}, "
              f"worst gradient rel-rms {worst:.2e} ({worst_name})", flush=True)
    print(f"{len(torch_lm.MECHANISMS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
