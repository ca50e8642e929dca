#!/usr/bin/python3
"""Train a linmix.nn language model data-parallel with torch.distributed (gloo, on the CPU):
DistributedDataParallel over linmix's kernels, a DistributedSampler, AdamW; rank 0 writes a
checkpoint that `linmix generate --model OUT` samples from (and `linmix train --init` continues).

  # N processes on this machine (torch.multiprocessing; rendezvous on 127.0.0.1)
  /usr/bin/python3 examples/ddp_train.py --nproc 2 --steps 200 --out ddp.safetensors
  # or one process per rank started by torchrun / your launcher (env:// rendezvous:
  # MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE); Debian's Python 3.11 needs --redirects 1 --tee 1
  torchrun --nproc_per_node 2 --redirects 1 --tee 1 examples/ddp_train.py --steps 200

--batch is the global batch: each of the N processes takes batch / N sequences of every step,
and the union of their sequences is the batch one process would take (the sampler deals one
shuffled order of the corpus windows), so N processes and one follow the same run up to float
rounding (tests/ddp_test.py). Needs the package built (README "From PyTorch"): the script puts
the checkout's python/ on sys.path when linmix is not installed.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

try:
    import linmix.nn
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import linmix.nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class Windows(Dataset):
    """Non-overlapping windows of seq + 1 bytes of the first 90% of a file (linmix's train split)."""

    def __init__(self, path, seq):
        with open(path, "rb") as f:
            data = f.read()
        self.data = torch.tensor(list(data[: len(data) * 9 // 10]), dtype=torch.long)
        self.seq = seq
        if len(self.data) < seq + 1:
            raise SystemExit(f"ddp_train: {path} is shorter than one window of {seq + 1} bytes")

    def __len__(self):
        return (len(self.data) - 1) // self.seq

    def __getitem__(self, i):
        w = self.data[i * self.seq: i * self.seq + self.seq + 1]
        return w[:-1], w[1:]


def lr_at(a, step):  # linmix train's schedule: linear warm-up, cosine to lr x 0.1
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def run(rank, world, a):
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=a.init_method, rank=rank, world_size=world)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.batch % world:
        raise SystemExit(f"ddp_train: --batch {a.batch} is not a multiple of the {world} processes")
    model = linmix.nn.LanguageModel(json.loads(a.config), seed=a.seed)  # the same initial weights on every rank
    ddp = DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # as linmix train: matrices and embeddings
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    data = Windows(a.data, a.seq)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=a.seed, drop_last=True)
    loader = DataLoader(data, batch_size=a.batch // world, sampler=sampler, drop_last=True)
    log = open(a.log, "w") if (rank == 0 and a.log) else None
    step, epoch, t0 = 0, 0, time.time()
    while step < a.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if step >= a.steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(a, step)
            logits = ddp(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks (gloo allreduce, in buckets)
            if a.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # the global batch's loss, for the log
            mean = float(mean) / world
            step += 1
            if log:
                rec = {"step": step, "loss": mean, "tok_s": step * a.batch * a.seq / (time.time() - t0)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if rank == 0 and not a.quiet and (step % 10 == 0 or step == a.steps):
                print(f"step {step}/{a.steps} loss {mean:.4f} {step * a.batch * a.seq / (time.time() - t0):.0f} tok/s",
                      flush=True)
        epoch += 1
    if rank == 0:
        model.save_checkpoint(a.out)  # written to a temporary file, then renamed
        print(f"checkpoint: {a.out} (linmix generate --model {a.out})", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    p.add_argument("--config", default='{"mixer": "gla", "d_model": 128, "n_layer": 4, "n_head": 4, "ctx": 256}',
                   help="model config as `linmix train --config` (JSON text)")
    p.add_argument("--nproc", type=int, default=2, help="processes to start here (ignored under torchrun)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences per step, all ranks)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--port", type=int, default=29511, help="rendezvous port on 127.0.0.1 (--nproc)")
    p.add_argument("--out", default="ddp.safetensors")
    p.add_argument("--log", default="", help="JSON lines, one per step (rank 0)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    if a.steps < 1 or a.batch < 1 or a.seq < 2 or a.nproc < 1 or a.threads < 1:
        raise SystemExit("ddp_train: --steps, --batch, --nproc, --threads >= 1 and --seq >= 2")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun or another env:// launcher
        a.init_method = "env://"
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), a)
    else:
        a.init_method = f"tcp://127.0.0.1:{a.port}"
        mp.spawn(run, args=(a.nproc, a), nprocs=a.nproc, join=True)


if __name__ == "__main__":
    main()
