#!/usr/bin/python3
"""The PyTorch twin of `linmix train --mixer softmax` (nanoGPT-style), for quality and speed at
equal wall-clock: the same model (byte-level, learned positions, pre-LayerNorm blocks of
multi-head causal softmax attention without biases and a GELU (tanh) MLP with biases, final
LayerNorm, an untied head without bias; GPT-2 initialisation: 0.02, output projections
0.02 / sqrt(2 L)), the same AdamW (betas 0.9 / 0.95, eps 1e-8, decoupled weight decay on matrices
and embeddings only), warm-up then cosine to 0.1 of the peak, global-norm clipping, the same data
split (the first 90% of the bytes train, the last 10% validation) and random windows, the same
validation (the loss on evaluation windows spread evenly over the split, as linmix's
evaluate_split), on `--threads` CPU threads.

Usage: bench/torch_lm.py --data FILE [--steps 600] [--time-budget S] [--batch 16] [--seq 128]
       [--d-model 128] [--layers 4] [--heads 4] [--lr 3e-3] [--warmup 30] [--threads 2] [--json OUT]
Prints one JSON line: steps, seconds, train tokens/s, final train loss, validation loss and bpc,
and the (time, validation bpc) points of every evaluation.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, H, T):
        super().__init__()
        self.H = H
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.q, self.k, self.v, self.o = (nn.Linear(C, C, bias=False) for _ in range(4))
        self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.register_buffer("mask", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def forward(self, x):
        B, T, C = x.shape
        a = self.ln1(x)
        q, k, v = (m(a).view(B, T, self.H, C // self.H).transpose(1, 2) for m in (self.q, self.k, self.v))
        s = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.H)
        s = s.masked_fill(~self.mask[:T, :T], float("-inf"))
        y = (F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.o(y)
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class LM(nn.Module):
    def __init__(self, V, C, L, H, ctx):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, C), nn.Embedding(ctx, C)
        self.blocks = nn.ModuleList(Block(C, H, ctx) for _ in range(L))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        for n, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm weights 1, biases 0 (PyTorch's defaults), as linmix
            std = 0.02 / math.sqrt(2 * L) if n.endswith(("o.weight", "proj.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        x = self.emb(idx) + self.pos.weight[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_out(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


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
        return sum(model(xs[i:i + 16], ys[i:i + 16]).item() * len(xs[i:i + 16]) for i in range(0, w, 16)) / w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--time-budget", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
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
    data = torch.tensor(list(open(a.data, "rb").read()), dtype=torch.long)
    cut = len(data) * 9 // 10
    train, val = data[:cut], data[cut:]
    model = LM(256, a.d_model, a.layers, a.heads, a.ctx)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)
    # one forward + backward before the clock starts: PyTorch's first call initialises its kernels
    # (~5 s here), a cost linmix's timed loop does not have either (its start-up precedes it)
    model(train[:a.seq][None], train[1:a.seq + 1][None]).backward()
    opt.zero_grad(set_to_none=True)
    t0, tokens, curve, loss = time.perf_counter(), 0, [], float("nan")
    step = 0
    while step < a.steps:
        ix = torch.randint(0, len(train) - a.seq - 1, (a.batch,), generator=gen)
        x = torch.stack([train[i:i + a.seq] for i in ix])
        y = torch.stack([train[i + 1:i + a.seq + 1] for i in ix])
        for g in opt.param_groups:
            g["lr"] = lr_at(a, step)
        loss_t = model(x, y)
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
    print(json.dumps({"engine": "pytorch", "torch": torch.__version__, "steps": step, "seconds": secs,
                      "tok_s": tokens / secs, "train_loss": loss, "val_loss": vl, "val_bpc": vl / math.log(2),
                      "curve": curve}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
