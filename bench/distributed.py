#!/usr/bin/python3
"""Data-parallel scaling of `linmix train` on this machine (docs/distributed.md): tokens/s of one
process with one thread, `mpirun -np 2` with one thread per rank, and one process with two
threads, run in alternation (rounds x each, the median kept), and the time each step spends in
the gradient allreduce; for the model shapes given. Not a test: it prints and writes markdown.

  /usr/bin/python3 bench/distributed.py --bin build/release/linmix --md docs/distributed_bench.md
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = {  # key: (label, config, batch, seq)
    "rwkv4": ("rwkv4 d128 L4 (the default, 0.9M)", {"mixer": "rwkv4", "channel_mix": "rwkv", "d_model": 128, "n_layer": 4,
                                           "n_head": 4, "ctx": 256}, 16, 128),
    "gla": ("gla d256 L6 (5.3M)", {"mixer": "gla", "channel_mix": "mlp", "d_model": 256, "n_layer": 6, "n_head": 4,
                            "ctx": 256}, 16, 128),
    "softmax": ("softmax d512 L8 (25.6M)", {"mixer": "softmax", "channel_mix": "mlp", "d_model": 512, "n_layer": 8, "n_head": 8,
                                 "ctx": 256}, 8, 128),
}
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def run(bin_, cfg, batch, seq, steps, ranks, threads, tmp):
    out = os.path.join(tmp, "run")
    shutil.rmtree(out, ignore_errors=True)
    cfgp = os.path.join(tmp, "cfg.json")
    with open(cfgp, "w") as f:
        json.dump(cfg, f)
    args = [bin_, "train", "--data", os.path.join(ROOT, "data", "tinyshakespeare.txt"), "--config", cfgp, "--steps",
            str(steps), "--batch", str(batch), "--seq", str(seq), "--eval-every", "0", "--ckpt-every", "0", "--out", out,
            "--threads", str(threads)]
    if ranks > 1:
        args = ["mpirun", "-np", str(ranks), "--bind-to", "core", *args]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV)
    if r.returncode:
        sys.exit(f"distributed.py: {' '.join(args)} failed:\n{r.stderr[-800:]}")
    recs = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    # tokens/s over the steps after the first (start-up and the first step's allocations left out)
    a, b = recs[0], recs[-2]  # the last record carries the final evaluation's time
    tok_s = (b["step"] - a["step"]) * batch * seq / (b["time_s"] - a["time_s"])
    ar = (b.get("allreduce_s", 0) - a.get("allreduce_s", 0)) / (b["step"] - a["step"])
    step_s = (b["time_s"] - a["time_s"]) / (b["step"] - a["step"])
    return tok_s, ar, step_s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=os.path.join(ROOT, "build", "release", "linmix"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated keys of SHAPES")
    p.add_argument("--md", default="")
    a = p.parse_args()
    if shutil.which("mpirun") is None:
        sys.exit("distributed.py: mpirun not found (scripts/setup.sh installs openmpi-bin)")
    tmp = tempfile.mkdtemp(prefix="linmix-distbench-")
    rows = []
    for name in a.shapes.split(","):
        if name not in SHAPES:
            sys.exit(f"distributed.py: unknown shape '{name}' (known: {', '.join(SHAPES)})")
        label, cfg, batch, seq = SHAPES[name]
        setups = (("1 process, 1 thread", 1, 1), ("mpirun -np 2, 1 thread each", 2, 1), ("1 process, 2 threads", 1, 2))
        got = {s[0]: [] for s in setups}
        for _ in range(a.rounds):  # in alternation: the machine's noise falls on all three alike
            for setup, ranks, threads in setups:
                got[setup].append(run(a.bin, cfg, batch, seq, a.steps, ranks, threads, tmp))
        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in got.items()}
        base = med["1 process, 1 thread"][0]
        for setup, _, _ in setups:
            tok_s, ar, step_s = med[setup]
            rows.append((label, setup, tok_s, tok_s / base, 1e3 * ar, 100 * ar / step_s))
            print(f"{label:36s} {setup:30s} {tok_s:9.0f} tok/s  {tok_s / base:4.2f}x  allreduce {1e3 * ar:6.2f} ms/step "
                  f"({100 * ar / step_s:4.1f}%)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if a.md:
        lines = ["# Data-parallel scaling on this machine (measured)", "",
                 f"`/usr/bin/python3 bench/distributed.py` ({a.steps} steps, batch x seq as listed in the script, "
                 f"median of {a.rounds} rounds run in alternation; tokens/s over steps 2..{a.steps - 1}; "
                 "allreduce: the time each step spends in `MPI_Allreduce` of the gradients, and its share of the step). "
                 "2 cores, shared and noisy: compare rows of one run, not runs.", "",
                 "| model | setup | tokens/s | vs 1 process, 1 thread | allreduce ms / step | share of the step |",
                 "|---|---|---|---|---|---|"]
        for label, setup, tok_s, ratio, ar, share in rows:
            lines.append(f"| {label} | {setup} | {tok_s:.0f} | {ratio:.2f}x | {ar:.2f} | {share:.1f}% |")
        tmpmd = a.md + ".tmp"
        with open(tmpmd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmpmd, a.md)


if __name__ == "__main__":
    main()
