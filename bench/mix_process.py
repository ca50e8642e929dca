#!/usr/bin/python3
"""`linmix mix` as a whole process against the PyTorch peer computing from memory (issue 19).

For every chunked and scan mechanism (not the quadratic softmax, aft_full, aft_local,
block_softmax, nor fnet's FFT), at T = 4096 (`linmix bench`'s shapes and params), 2 threads:
  - kernel: the parallel forward alone, as `linmix bench` times it (best of up to 5);
  - process: `linmix mix --mode parallel --no-state` (y alone, as the peer and the kernel compute it)
    from its input file to its output file, the wall time of
    the whole process as a user's script sees it (start, read, validate, kernel, write), median of
    5 runs after one warm-up (the input file in the page cache);
  - peer: bench/peer.py's plain-PyTorch forward on tensors already in memory (best of up to 5).
Targets: the process faster than the peer; everything but the kernel (process - kernel) <= 15 ms.

Usage: bench/mix_process.py --bin build/release/linmix [--T 4096] [--mixers a,b] --out R.json [--md M.md]"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import blas_env  # noqa: F401  (before torch: its OpenBLAS on the kernels linmix runs)
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer  # noqa: E402


def process_time(binary, spec, path, out, threads, runs=5):
    cmd = [binary, "mix", "--mixer", spec["name"], "--mode", "parallel", "--no-state", "--in", path, "--out", out,
           "--threads", str(threads)] + (["--causal"] if spec["causal"] else [])
    for k, v in spec["bench_params"].items():
        cmd += ["--param", f"{k}={v}"]
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up: the file cached, the binary paged in
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def write_md(rep, path):
    lines = ["# `linmix mix` as a whole process against PyTorch from memory", "",
             f"T = {rep['T']}, d_model 512 (`linmix bench`'s shapes and params), {rep['threads']} threads, "
             f"torch {rep['torch']}. Produced by `bench/mix_process.py`.",
             "kernel: the parallel forward as `linmix bench` times it; process: `linmix mix --no-state` (y alone, "
             "as the kernel and the peer compute it) from file to file, "
             "wall time of the whole process (median of 5); peer: bench/peer.py's PyTorch forward on tensors "
             "in memory. Targets: process faster than the peer; process - kernel <= 15 ms.", "",
             "| mechanism | kernel ms | process ms | process - kernel ms | peer ms | peer / process | targets |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        rest = r["process"] - r["kernel"]
        ok = r["process"] < r["peer"] and rest <= 0.015
        lines.append(f"| {r['mixer']} | {r['kernel'] * 1e3:.1f} | {r['process'] * 1e3:.1f} | {rest * 1e3:.1f} | "
                     f"{r['peer'] * 1e3:.1f} | {r['peer'] / r['process']:.2f}x | {'met' if ok else 'NOT met'} |")
    faster = sum(r["process"] < r["peer"] for r in rep["rows"])
    lines += ["", f"The process is faster than the peer for {faster} of {len(rep['rows'])} mechanisms."]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixers", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--md", default="")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    specs = peer.registry(binary)
    names = a.mixers.split(",") if a.mixers else sorted(n for n in specs if n not in peer.NOT_CHUNKED)
    for n in names:
        if n not in specs or n not in peer.FWD:
            sys.exit(f"mix_process.py: unknown mixer or no peer: '{n}'")
    torch.set_num_threads(a.threads)
    kern = peer.kernel_times(binary, names, a.T, a.threads, backward=False)
    work = tempfile.mkdtemp(prefix="linmix-mixp-")
    rows = []
    for name in names:
        spec = specs[name]
        path, out = os.path.join(work, "in.safetensors"), os.path.join(work, "out.safetensors")
        subprocess.run([binary, "example", "--mixer", name, "--scale", "bench", "--T", str(a.T), "--seed", "1",
                        "--out", path] + (["--causal"] if spec["causal"] else []), check=True, capture_output=True)
        x = peer.inputs(binary, spec, a.T)

        def run():
            with torch.no_grad():
                peer.FWD[name](**x)
        row = {"mixer": name, "kernel": kern[name]["fwd"], "process": process_time(binary, spec, path, out, a.threads),
               "peer": peer.time_best(run)}
        rows.append(row)
        print(f"{name:14s} kernel {row['kernel'] * 1e3:8.2f} ms | process {row['process'] * 1e3:8.2f} ms | "
              f"peer {row['peer'] * 1e3:8.2f} ms", flush=True)
    rep = {"T": a.T, "threads": a.threads, "torch": torch.__version__, "rows": rows}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=1)
    os.replace(tmp, a.out)
    if a.md:
        write_md(rep, a.md)


if __name__ == "__main__":
    main()
