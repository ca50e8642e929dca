#!/usr/bin/python3
"""PyTorch DDP through the binding (examples/ddp_train.py): 2 processes (gloo on 127.0.0.1, a
DistributedSampler, batch 2 each) follow the same run as 1 process with batch 4: every step's
loss and the final parameters agree; the checkpoint rank 0 writes is one `linmix generate`
samples from and `linmix train --init` continues; a batch the processes do not divide is refused.

Tolerance: DDP averages the ranks' gradients (gloo allreduce, float32) where one process sums
the rows in its GEMMs: float32 rounding, ~1e-7 relative per gradient, which AdamW carries into
the parameters at about that relative size per step; losses relative 1e-5, parameters after
8 steps max |difference| <= 1e-4 x max(1, |value|) (measured 3e-6: where a gradient element is
near zero, Adam's normalised update turns its rounding into up to lr 3e-3 per step; 1e-4 is 3% of one
such step, while a wrong split of the batch moves parameters by ~1e-2).

Usage: ddp_test.py  (env LINMIX: the linmix binary)"""
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_checks  # noqa: E402

LINMIX = os.environ.get("LINMIX", os.path.join(ROOT, "build", "release", "linmix"))
TMP = tempfile.mkdtemp(prefix="linmix-ddp-")
SCRIPT = os.path.join(ROOT, "examples", "ddp_train.py")
CONFIG = json.dumps({"vocab": 256, "d_model": 32, "n_layer": 2, "n_head": 2, "ctx": 64, "channel_mix": "rwkv",
                     "layers": [{"mixer": "gla"}, {"mixer": "rwkv4"}]})
check = checkpoint_checks.Checks()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp(nproc, name, batch=4):
    out, logp = os.path.join(TMP, name + ".safetensors"), os.path.join(TMP, name + ".jsonl")
    r = subprocess.run([sys.executable, SCRIPT, "--nproc", str(nproc), "--steps", "8", "--batch", str(batch), "--seq", "32",
                        "--warmup", "3", "--config", CONFIG, "--out", out, "--log", logp, "--port", str(free_port()),
                        "--quiet"], capture_output=True, text=True, timeout=600)
    return r, out, logp


def main():
    r1, out1, log1 = ddp(1, "one")
    check("1 process trains", r1.returncode == 0, r1.stderr[-500:])
    r2, out2, log2 = ddp(2, "two")
    check("2 processes train (DDP, gloo)", r2.returncode == 0, r2.stderr[-500:])
    if r1.returncode or r2.returncode:
        return check.summary()
    l1 = [json.loads(x)["loss"] for x in open(log1)]
    l2 = [json.loads(x)["loss"] for x in open(log2)]
    worst = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(l1, l2))
    check("every step's loss: 2 processes = 1 with the doubled batch", len(l1) == len(l2) == 8 and worst <= 1e-5,
          f"{len(l1)} / {len(l2)} steps, max relative difference {worst:.1e}")
    c1, c2 = st.load(out1), st.load(out2)
    check("same tensors in both checkpoints", sorted(c1) == sorted(c2))
    worst = max(float(np.max(np.abs(c1[n] - c2[n]) / np.maximum(1.0, np.abs(c1[n])))) for n in c1)
    check("final parameters: 2 processes = 1", worst <= 1e-4, f"max difference {worst:.1e}")
    check("(the runs learn: the loss falls)", l1[-1] < l1[0] - 0.1, f"{l1[0]:.3f} -> {l1[-1]:.3f}")
    g = subprocess.run([LINMIX, "generate", "--model", out2, "--tokens", "40", "--prompt", "ROMEO:", "--seed", "3"],
                       capture_output=True, text=True, errors="replace")
    check("linmix generate samples from rank 0's checkpoint", g.returncode == 0 and len(g.stdout) >= 40, g.stderr[-300:])
    t = subprocess.run([LINMIX, "train", "--init", out2, "--data", os.path.join(ROOT, "data", "tinyshakespeare.txt"),
                        "--steps", "2", "--batch", "2", "--seq", "32", "--out", os.path.join(TMP, "cont"), "--threads", "1"],
                       capture_output=True, text=True)
    check("linmix train --init continues it", t.returncode == 0, t.stderr[-300:])
    r3, _, _ = ddp(2, "odd", batch=3)
    check("a batch the processes do not divide is refused", r3.returncode != 0 and "not a multiple" in r3.stderr,
          r3.stderr[-300:])
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
