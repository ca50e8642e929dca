#!/usr/bin/python3
"""linmix.ops measured, in one run on this machine: for every mechanism at T = 4096 (d_model 512,
`linmix bench`'s shapes and params), forward and forward + backward
  - of the same kernels timed by `linmix bench` (the C++ call, no Python),
  - through linmix.ops (torch tensors in and out, autograd): the binding's overhead, target <= 10%
    (forward+backward against the kernels it runs: the forward keeping its chunk states, then the
    hand-written backward on them; the forms that keep nothing: the forward, then the backward that
    recomputes what it needs),
  - of the plain-PyTorch implementation a user would write (bench/peer.py's, checked there against
    the float64 oracle): linmix.ops' speed-up, target >= 3x for the chunked and scan mechanisms
    (every one but the quadratic softmax, aft_full, aft_local, block_softmax and fnet's FFT).
The kernels (linmix._C.kernel_seconds: the call `linmix bench` times) and linmix.ops run alternated in
this process, best of --rounds each after a warm-up; the peer's times are peer.py's (best of up to 5 runs,
at most ~1 s of repeats). 2 threads for all three.

Usage: bench/torch_ops.py [--T 4096] [--threads 2] [--mixers a,b] [--rounds 7]
                          --out build/bench/torch_ops.json [--md docs/torch_ops.md]"""
import argparse
import json
import os
import sys
import time

import blas_env  # noqa: F401  (before torch: its OpenBLAS on the kernels linmix runs)
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linmix  # noqa: E402
import peer  # noqa: E402

OPS = linmix.ops
_C = linmix._C


def alternated(forms, rounds, budget):
    """{name: seconds of one call} -> {name: best seconds}: one warm-up each, then rounds in which
    every form runs once in turn (stopping early once a round's total exceeds budget / rounds).
    Fast forms get more rounds (up to 40, ~3 s in all): a best of 7 of a 2 ms call read +/- 20%
    on this shared machine, and a best of 11 of the ~20 ms forward+backward of the gated family
    +/- 10% (gla's overhead +11% in a full run, +0.8% as the best of 25 a minute later)."""
    warm = sum(t for t in (f() for f in forms.values()) if t)
    rounds = max(rounds, min(40, int(3.0 / max(warm, 1e-6))))
    best = {k: float("inf") for k in forms}
    for r in range(rounds):
        total = 0.0
        for k, f in forms.items():
            t = f()
            best[k] = min(best[k], t)
            total += t
        if r >= 2 and total * rounds > budget:
            break
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="", help="(unused: the kernels are timed in this process through linmix._C)")
    ap.add_argument("--rounds", type=int, default=7, help="alternated rounds of kernel and ops calls (best of each)")
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mixers", default="")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="skip a peer form slower than this")
    ap.add_argument("--out", required=True)
    ap.add_argument("--md", default="")
    ap.add_argument("--from-json", default="", help="only write --md from an earlier --out")
    a = ap.parse_args()
    if a.from_json:
        write_md(json.load(open(a.from_json)), a.md)
        return
    names = a.mixers.split(",") if a.mixers else sorted(OPS.SPECS)
    torch.set_num_threads(a.threads)
    rows = []
    for name in names:
        spec = OPS.SPECS[name]
        causal = spec["causal"]
        params = {k: float(v) for k, v in spec["bench_params"].items()}
        ptext = {k: repr(v) for k, v in params.items()}
        x = OPS.example(name, a.T, causal=causal, scale="bench", seed=1)
        row = {"mixer": name}

        def op(xs):
            out = OPS.call(name, xs, causal=causal, **params)
            return out[0] if isinstance(out, tuple) else out

        with torch.no_grad():
            dy = torch.randn_like(op(x))
        xg = {n: t.clone().requires_grad_(True) for n, t in x.items()}

        # one training step's worth: the gradients set to None first (optimizer.zero_grad's default
        # in torch 2), y.backward(dy) (no loss arithmetic of the harness's own in the time)
        def fb_ops():
            for t in xg.values():
                t.grad = None
            op(xg).backward(dy)

        def timed(f):
            def run():
                t0 = time.perf_counter()
                f()
                return time.perf_counter() - t0
            return run

        def ops_fwd():
            with torch.no_grad():
                op(x)

        def ops_fwd_unchecked():  # linmix.ops.set_check_values(False): the inputs' values not read first
            before = OPS.set_check_values(False)
            try:
                ops_fwd()
            finally:
                OPS.set_check_values(before)
        # the kernels linmix bench times (_C.kernel_seconds: the C++ call on a validated call) and
        # the same through linmix.ops, alternated in this process: the machine's drift between
        # runs falls on both alike
        forms = {"kernel_fwd": lambda: _C.kernel_seconds(name, causal, ptext, x, a.threads),
                 "ops_fwd": timed(ops_fwd), "ops_fwd_unchecked": timed(ops_fwd_unchecked)}
        row.update(alternated(forms, a.rounds, a.max_seconds))
        if spec.get("backward"):
            # the forward keeping what its backward reads, then that backward: what ops runs. The
            # pair alternated on its own, as a training loop runs it: with the forwards in the same
            # rotation, whose buffers come and go between the two, gla / norm_linear read +8% / +12%
            # against +4% / +3% (one process, 11 rounds of each)
            row.update(alternated({"kernel_fwdbwd": lambda: _C.kernel_seconds(name, causal, ptext, {**x, "dy": dy}, a.threads, True),
                                   "ops_fwdbwd": timed(fb_ops)}, a.rounds, a.max_seconds))
        row.setdefault("kernel_fwdbwd", None)
        row.setdefault("ops_fwdbwd", None)
        # the plain PyTorch peer (bench/peer.py), its forward timed once first: skipped when too slow
        px = {n: t.clone() for n, t in x.items()}
        t0 = time.perf_counter()
        with torch.no_grad():
            peer.FWD[name](**px)
        once = time.perf_counter() - t0
        if once < a.max_seconds:
            with torch.no_grad():
                row["peer_fwd"] = peer.time_best(lambda: peer.FWD[name](**px))
            pg = {n: t.clone().requires_grad_(n not in ("proj",)) for n, t in x.items()}

            def fb_peer():
                for t in pg.values():
                    t.grad = None
                peer.FWD[name](**pg).backward(dy)
            t0 = time.perf_counter()
            fb_peer()
            once_fb = time.perf_counter() - t0
            if once_fb < a.max_seconds / 3:
                row["peer_fwdbwd"] = min(once_fb, peer.time_best(fb_peer))
            elif once_fb < a.max_seconds:
                row["peer_fwdbwd"] = once_fb  # one run: the peer is that slow
            else:
                row["peer_fwdbwd_over"] = a.max_seconds  # one run took longer: not repeated
        # the kernels of an ops forward+backward are kernel_fwdbwd's: the forward (keeping its chunk
        # states where the form can), then the backward
        kf, kb = row["kernel_fwd"], row["kernel_fwdbwd"]
        if kf:
            row["overhead_fwd"] = row["ops_fwd"] / kf - 1
            row["overhead_fwd_unchecked"] = row["ops_fwd_unchecked"] / kf - 1
        if kf and kb:
            row["overhead_fwdbwd"] = row["ops_fwdbwd"] / kb - 1
        for f in ("fwd", "fwdbwd"):
            if row.get("peer_" + f):
                row["speedup_" + f] = row["peer_" + f] / row["ops_" + f]
            elif row.get("peer_%s_over" % f):  # a lower bound
                row["speedup_%s_over" % f] = row["peer_%s_over" % f] / row["ops_" + f]
        rows.append(row)
        fmt = lambda v: f"{v * 1e3:9.2f}" if v else "        -"  # noqa: E731
        print(f"{name:15s} kernel {fmt(row['kernel_fwd'])} {fmt(row['kernel_fwdbwd'])} ms | ops {fmt(row['ops_fwd'])} "
              f"{fmt(row['ops_fwdbwd'])} ms | peer {fmt(row.get('peer_fwd'))} {fmt(row.get('peer_fwdbwd'))} ms", flush=True)
    rep = {"T": a.T, "threads": a.threads, "rounds": a.rounds, "torch": torch.__version__, "blas": blas_env.describe(), "arch": getattr(_C, "ARCH", "?"), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    if a.md:
        write_md(rep, a.md)


def write_md(rep, path):
    pct = lambda v: "-" if v is None else f"{100 * v:+.0f}%"  # noqa: E731
    ms = lambda v: "-" if not v else f"{v * 1e3:.1f}"  # noqa: E731
    sx = lambda v: "-" if v is None else f"{v:.1f}x"  # noqa: E731
    lines = [f"# linmix.ops: the binding's overhead and its speed-up over plain PyTorch",
             "",
             f"T = {rep['T']}, d_model 512 (`linmix bench`'s shapes and params), {rep['threads']} threads, torch "
             f"{rep['torch']}. Produced by `bench/torch_ops.py` (`bash bench/run.sh` runs it). "
             f"{rep.get('blas', 'OpenBLAS: not recorded')}.",
             f"The extension's build: `-march={rep.get('arch', '?')}` (`linmix._C.ARCH`: `import linmix` loads the "
             "x86-64-v4 build `_C_v4` where the CPU has AVX-512, the x86-64-v3 one elsewhere or with "
             "`LINMIX_ARCH=x86-64-v3`).",
             "kernel: the C++ call timed by `linmix bench` (fwd+bwd: the forward keeping what its backward reads, then that",
             "backward, as linmix.ops and `linmix train` run them: the forms on the gated chunked kernels keep their chunk states",
             "and scores, fla's way (and y's rows where their epilogue reads them again); the others' backward recomputes the",
             "forward it needs),",
             "timed in the same process as ops (`linmix._C.kernel_seconds`) and alternated with it (the forwards in one",
             "rotation, the forward+backward pair in its own), best of at least "
             f"{rep.get('rounds', 7)} rounds (up to 40, ~3 s of them);",
             "ops: the same through `linmix.ops` (torch tensors, autograd); unchecked: the forward with",
             "`linmix.ops.set_check_values(False)` (the inputs' values not checked for NaN / infinity: for "
             f"{sum(1 for s in OPS.SPECS.values() if s.get('kernel_checks_values'))} mechanisms",
             "the check runs inside the kernel's reads, for the others it is one read of the inputs before it);",
             "peer: bench/peer.py's plain-PyTorch implementation. Targets: overhead <= 10%; speed-up >= 3x for the",
             "chunked and scan mechanisms (not softmax, aft_full, aft_local, block_softmax, fnet).",
             "",
             "| mechanism | kernel fwd ms | ops fwd ms | overhead | unchecked | kernel fwd+bwd ms | ops fwd+bwd ms | overhead | "
             "peer fwd ms | peer fwd+bwd ms | speed-up fwd | speed-up fwd+bwd | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        ok = []
        for f in ("fwd", "fwdbwd"):
            o = r.get("overhead_" + f)
            ok.append(o is not None and o <= 0.10)
            if r["mixer"] not in peer.NOT_CHUNKED:
                s = r.get("speedup_" + f, r.get("speedup_%s_over" % f))
                ok.append(s is not None and s >= 3)
            if r.get("peer_%s_over" % f):  # shown as lower bounds
                r["peer_" + f + "_txt"] = f"> {r['peer_%s_over' % f] * 1e3:.0f}"
                r["speedup_" + f + "_txt"] = f"> {r['speedup_%s_over' % f]:.0f}x"
        lines.append(f"| {r['mixer']} | {ms(r['kernel_fwd'])} | {ms(r['ops_fwd'])} | {pct(r.get('overhead_fwd'))} | "
                     f"{pct(r.get('overhead_fwd_unchecked'))} | {ms(r['kernel_fwdbwd'])} | {ms(r['ops_fwdbwd'])} | {pct(r.get('overhead_fwdbwd'))} | "
                     f"{r.get('peer_fwd_txt') or ms(r.get('peer_fwd'))} | {r.get('peer_fwdbwd_txt') or ms(r.get('peer_fwdbwd'))} | "
                     f"{r.get('speedup_fwd_txt') or sx(r.get('speedup_fwd'))} | "
                     f"{r.get('speedup_fwdbwd_txt') or sx(r.get('speedup_fwdbwd'))} | {'met' if all(ok) else 'NOT met'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
