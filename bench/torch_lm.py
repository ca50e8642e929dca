#!/usr/bin/python3
"""The PyTorch twin of `linmix train` (--mixer softmax, linear, rwkv4 or mamba), for speed and
quality at equal wall-clock: the same model, initialisation, data, optimizer and evaluation, in
plain PyTorch on `--threads` CPU threads.

- The model and its starting weights: a linmix checkpoint (`--init`, written by `linmix train` with
  the run's config and seed, see bench/lm_peer.py). The forward is python/model_ref.py's (the
  independent implementation linmix's whole-model gradients are tested against), in float32, its
  float64 reference mechanisms swapped for the PyTorch forms a user would write, the peers of
  `linmix bench` (bench/peer.py, each checked against the float64 oracle there): softmax as masked
  scores, linear attention chunked (chunks of 64), RWKV-4 as ChatRWKV's token loop, Mamba as
  mamba_ssm's selective_scan_ref loop. tests/lm_twin_test.py checks this twin's loss and
  gradients against the float64 model.
- AdamW (betas 0.9 / 0.95, eps 1e-8, decoupled weight decay on tensors of rank >= 2, as linmix),
  linear warm-up then cosine to 0.1 of the peak, global-norm clipping; the first 90% of the bytes
  train, the last 10% validate; random windows; the validation loss on windows spread evenly over
  the split (linmix's evaluate_split).

Usage: bench/torch_lm.py --init CKPT --data FILE [--steps 600] [--time-budget S] [--batch 16]
       [--seq 128] [--lr 3e-3] [--warmup 30] [--threads 2]
Prints one JSON line: steps, seconds, train tokens/s, final train loss, validation loss and bpc,
and the (time, validation bpc) points of every evaluation.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import blas_env  # noqa: F401  (before torch: its OpenBLAS on the kernels linmix runs)
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import model_ref  # noqa: E402
import peer  # noqa: E402
import st  # noqa: E402


def _attention(f):  # the attention-like mechanisms: q, k, v [B, T, H, D] -> [B, T, H, E]
    def g(x, causal, prm):
        assert causal and not prm, "the twin runs the causal mechanism with its default params"
        return f(x["q"], x["k"], x["v"])
    return g


def _mamba(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=True):  # noqa: N803
    assert delta_softplus
    return peer.f_mamba(u, delta, A, Bm, Cm, D, z, delta_bias)


# the fast forms, by the name model_ref asks for (python/model_ref.py's _mech)
MECHANISMS = {"softmax": _attention(peer.f_softmax), "linear": _attention(peer.f_linear), "rwkv4": peer.f_rwkv4,
              "mamba": _mamba}


class Twin:
    """A linmix checkpoint's model in PyTorch: parameters by linmix's names, the config's layers."""

    def __init__(self, path, dtype=torch.float32, fast=True):
        cfg = json.loads(st.header(path)["__metadata__"]["config"])
        mixers = {layer["mixer"] for layer in cfg["layers"]}
        if fast:
            missing = mixers - set(MECHANISMS)
            if missing:
                raise SystemExit(f"torch_lm.py: no PyTorch form for {sorted(missing)} (have {sorted(MECHANISMS)})")
            cfg["mechanisms"] = MECHANISMS
        self.cfg = cfg
        # performer's projection is a buffer, not trained (linmix's is_buffer_param)
        self.p = {n: torch.tensor(a, dtype=dtype, requires_grad=not n.endswith("att.proj"))
                  for n, a in st.load(path).items() if not n.startswith("opt.")}

    def parameters(self):
        return [t for t in self.p.values() if t.requires_grad]

    def loss(self, x, y):
        return model_ref.loss(self.cfg, self.p, x, y)


def lr_at(a, step):  # linmix's lr_at: linear warm-up, then cosine to min_lr_ratio
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def evaluate(model, val, seq, windows):
    n = len(val) - 1
    w = min(windows, n // seq)
    stride = n // w
    with torch.no_grad():
        xs = torch.stack([val[i * stride:i * stride + seq] for i in range(w)])
        ys = torch.stack([val[i * stride + 1:i * stride + seq + 1] for i in range(w)])
        return sum(model.loss(xs[i:i + 16], ys[i:i + 16]).item() * len(xs[i:i + 16]) for i in range(0, w, 16)) / w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True, help="a linmix checkpoint: the model's config and starting weights")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--time-budget", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=128, help="linmix: --eval-batches 8 x --batch 16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = torch.from_numpy(np.fromfile(a.data, dtype=np.uint8).astype(np.int64))
    cut = len(data) * 9 // 10
    train, val = data[:cut], data[cut:]
    model = Twin(a.init)
    decay = [t for t in model.parameters() if t.dim() >= 2]
    rest = [t for t in model.parameters() if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)
    # one forward + backward before the clock starts: PyTorch's first call initialises its kernels
    # (~5 s here), a cost linmix's timed loop does not have either (its start-up precedes it)
    model.loss(train[:a.seq][None], train[1:a.seq + 1][None]).backward()
    opt.zero_grad(set_to_none=True)
    t0, tokens, curve, loss = time.perf_counter(), 0, [], float("nan")
    step = 0
    while step < a.steps:
        ix = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=gen)
        x = torch.stack([train[i:i + a.seq] for i in ix])
        y = torch.stack([train[i + 1:i + a.seq + 1] for i in ix])
        for g in opt.param_groups:
            g["lr"] = lr_at(a, step)
        loss_t = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        loss = loss_t.item()
        tokens += a.batch * a.seq
        step += 1
        secs = time.perf_counter() - t0
        last = step == a.steps or (a.time_budget > 0 and secs >= a.time_budget)
        if (a.eval_every > 0 and step % a.eval_every == 0) or last:
            vl = evaluate(model, val, a.seq, a.eval_windows)  # its time counts, as in linmix train
            curve.append((secs, vl / math.log(2)))
        if last:
            break
    secs = time.perf_counter() - t0
    vl = curve[-1][1] * math.log(2)
    print(json.dumps({"engine": "pytorch", "torch": torch.__version__, "mixers": sorted(
        {layer["mixer"] for layer in model.cfg["layers"]}), "steps": step, "seconds": secs, "tok_s": tokens / secs,
        "train_loss": loss, "val_loss": vl, "val_bpc": vl / math.log(2), "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
