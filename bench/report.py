#!/usr/bin/python3
"""Merges `linmix bench` and `bench/peer.py` reports into the benchmark table (markdown) and the
plot (time and extra memory against T, log-log, every mechanism), and checks the targets of
issue 7.  Usage: report.py --bin build/release/linmix --linmix A.json [B.json ...] --peer P.json [...] --md OUT.md --png OUT.png
Later files override earlier ones for the same (mixer, T, threads, form)."""
import argparse
import json
import math
import os

import subprocess
import sys

# The target classes come from the registry (`--bin`: `linmix mixers --json`) and the runs:
# linear-time = not quadratic; FLOP-bound = its forward reports GFLOP/s (the spec has a FLOP
# count) and is linear-time; bandwidth-bound = its forward reports GB/s.
CHUNKED, RECURRENCES, LINEAR_TIME = [], [], []
# The targets are the issues': a chunked form >= 2x its peer (issue 7) and forward+backward
# <= 3.5x the forward (issue 19); the eight mechanisms of issue 13 >= 3x their peer and
# forward+backward <= 4x. Every chunked form >= 50% of the sgemm rate of the same run.
PEER_X, FWDBWD_X = 2.0, 3.5
ISSUE13 = ("retention", "gla", "deltanet", "gated_deltanet", "rwkv5", "rwkv6", "rwkv7", "mamba2")


def peer_x(m):
    return 3.0 if m in ISSUE13 else PEER_X


BESIDE = " (kernel timed beside the peer)"


def fwdbwd_x(m):
    return 4.0 if m in ISSUE13 else FWDBWD_X


def speed_ratio(f, pf):
    """peer time / linmix time, and how it was read: from the kernel times taken just before and
    after the peer (peer.py --beside) when the peer run has them, else from linmix bench's run."""
    if pf and "kernel_seconds" in pf:
        return pf["seconds"] / min(pf["kernel_seconds"]), True
    if f and pf:
        return pf["seconds"] / f["seconds"], False
    return None, False


def classify(specs, L):
    for name, spec in specs.items():
        fwd = [x for (m, T, th, f), x in L.items() if m == name and f == "fwd"]
        if spec["quadratic"]:
            continue
        LINEAR_TIME.append(name)
        if any("gflops" in x for x in fwd):
            CHUNKED.append(name)
        elif any("gbs" in x for x in fwd):
            RECURRENCES.append(name)


def load(paths):
    runs, limits, extra = {}, {}, {}
    for p in paths:
        r = json.load(open(p))
        for x in r["runs"]:
            runs[(x["mixer"], x["T"], x["threads"], x["form"])] = x
        limits.update(r.get("limits", {}))
        for k in ("check", "torch", "blas"):
            if k in r:
                extra[k] = r[k]
    return runs, limits, extra


def fit(points):
    pts = [(math.log(t), math.log(s)) for t, s in points]
    if len(pts) < 2:
        return float("nan")
    n = len(pts)
    sx = sum(x for x, _ in pts)
    sy = sum(y for _, y in pts)
    sxx = sum(x * x for x, _ in pts)
    sxy = sum(x * y for x, y in pts)
    return (n * sxy - sx * sy) / (n * sxx - sx * sx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--linmix", nargs="+", required=True)
    ap.add_argument("--peer", nargs="*", default=[])
    ap.add_argument("--md", required=True)
    ap.add_argument("--png")
    ap.add_argument("--T", type=int, default=4096, help="the length the targets are read at")
    ap.add_argument("--bin", required=True, help="the linmix binary (its registry names the mechanisms)")
    ap.add_argument("--only", help="comma-separated mechanisms: a report of these alone (a partial run)")
    ap.add_argument("--produced-by", default="bash bench/run.sh", help="the command the report names")
    a = ap.parse_args()
    L, limits, _ = load(a.linmix)
    P, _, pinfo = load(a.peer) if a.peer else ({}, {}, {})
    out = subprocess.run([a.bin, "mixers", "--json"], capture_output=True, text=True, check=True).stdout
    specs = {m["name"]: m for m in json.loads(out)}
    if a.only:
        want = a.only.split(",")
        unknown = [m for m in want if m not in specs]
        if unknown:
            sys.exit("report.py: --only names unknown mechanisms: " + ", ".join(unknown))
        specs = {m: specs[m] for m in want}
    # every mechanism of the registry is in the report, with its peer: a missing one fails by name
    missing = [f"{m} (no linmix bench run)" for m in specs if not any(k[0] == m for k in L)]
    if a.peer:
        missing += [f"{m} (no PyTorch peer run)" for m in specs if not any(k[0] == m for k in P)]
    if missing:
        sys.exit("report.py: missing " + ", ".join(missing))
    classify(specs, L)
    mixers = sorted({k[0] for k in L}, key=lambda m: (m != "softmax", m))
    threads = sorted({k[2] for k in L})
    T0 = a.T
    out = ["# linmix bench", "",
           f"Produced by `{a.produced_by}` (`linmix bench`, `bench/peer.py`, `bench/report.py`): B = 1, "
           "d_model 512 (H = 8, D = E = 64; C = 512 per channel), causal. Peers: plain PyTorch "
           f"{pinfo.get('torch', '?')} on the CPU, same thread count, each checked against the float64 oracle first; "
           f"{pinfo.get('blas', 'OpenBLAS: not recorded')}. "
           "Times are the best of 5 to 50 runs after a warm-up (short runs are repeated until ~0.5 s), steps the best of 5 sequences of 256 tokens; `extra` is the peak resident memory a run added "
           "(VmHWM). The machine's limits are measured in the same run.", ""]
    for th in threads:
        lim = limits.get(str(th), {})
        out += [f"## {th} thread{'s' if th > 1 else ''}: sgemm {lim.get('sgemm_gflops', float('nan')):.0f} GFLOP/s, "
                f"triad {lim.get('triad_gbs', float('nan')):.1f} GB/s", "",
                f"At T = {T0}:", "",
                "| mixer | fwd ms | peer fwd ms | linmix / peer speed | fwd+bwd ms | fwd+bwd / fwd | peer fwd+bwd ms | "
                "GFLOP/s (of sgemm) | GB/s (of triad) | extra MiB (fwd) | step µs | peer step µs | step speed-up | "
                "exponent fwd (T ≥ 1024) | exponent fwd+bwd |",
                "|---|" + "---|" * 14]
        for m in mixers:
            g = lambda form, src=L, T=T0: src.get((m, T, th, form))  # noqa: E731
            f, fb, st = g("fwd"), g("fwdbwd"), None
            st = next((x for (mm, T, tt, form), x in L.items() if mm == m and tt == th and form == "step"), None)
            pf, pfb = g("fwd", P), g("fwdbwd", P)
            pst = next((x for (mm, T, tt, form), x in P.items() if mm == m and tt == th and form == "step"), None)
            cell = lambda x, k="seconds", s=1e3, fmt="{:.2f}": fmt.format(x[k] * s) if x and k in x else "—"  # noqa: E731
            r, bes = speed_ratio(f, pf)
            ratio = "—" if r is None else f"{r:.2f}x" + (" *" if bes else "")
            fbr = f"{fb['seconds'] / f['seconds']:.2f}" if f and fb else "—"
            gf = f"{f['gflops']:.0f} ({100 * f['of_sgemm']:.0f}%)" if f and "gflops" in f else "—"
            gb = f"{f['gbs']:.1f} ({100 * f['of_triad']:.0f}%)" if f and "gbs" in f else "—"
            sr = f"{pst['seconds'] / st['seconds']:.1f}x" if st and pst else "—"
            ex = lambda form: fit([(T, x["seconds"]) for (mm, T, tt, ff), x in L.items()  # noqa: E731
                                   if mm == m and tt == th and ff == form and T >= 1024])
            out.append(f"| {m} | {cell(f)} | {cell(pf)} | {ratio} | {cell(fb)} | {fbr} | {cell(pfb)} | {gf} | {gb} | "
                       f"{cell(f, 'extra_bytes', 1 / 2 ** 20, '{:.0f}')} | {cell(st, 'seconds', 1e6, '{:.1f}')} | "
                       f"{cell(pst, 'seconds', 1e6, '{:.1f}')} | {sr} | {ex('fwd'):.3f} | {ex('fwdbwd'):.3f} |")
        if any("kernel_seconds" in x for (mm, T, tt, ff), x in P.items() if T == T0 and tt == th):
            out += ["", "\\* the speed ratio of a mechanism whose C++ kernel was timed again just before and just after "
                    "its peer (`bench/peer.py --beside`): the faster of those two against the peer, one minute of the "
                    "machine (its target takes the share of sgemm from that run too); the fwd ms and GFLOP/s columns "
                    "are linmix bench's own run."]
        out.append("")
    # targets (2 threads when present)
    th = 2 if 2 in threads else threads[-1]
    g = lambda m, form, T=T0, src=L: src.get((m, T, th, form))  # noqa: E731
    lim = limits.get(str(th), {})
    res = []

    def target(name, ok, detail):
        res.append(f"| {name} | {'met' if ok else 'NOT met'} | {detail} |")

    for m in CHUNKED:
        f, pf = g(m, "fwd"), g(m, "fwd", src=P)
        if f and pf and "of_sgemm" in f:
            r, bes = speed_ratio(f, pf)
            # the sgemm share of the kernel run the ratio was read from (the faster one beside the
            # peer, against the sgemm its own process measured), else linmix bench's run
            sg = pf.get("kernel_of_sgemm", f["of_sgemm"]) if bes else f["of_sgemm"]
            target(f"{m}: ≥ {peer_x(m):g}x peer and ≥ 50% of sgemm at T={T0}", r >= peer_x(m) and sg >= 0.5,
                   f"{r:.2f}x peer{BESIDE if bes else ''}, {100 * sg:.0f}% of sgemm" +
                   ("" if bes else f" ({f['gflops']:.0f} GFLOP/s)"))
    for m in RECURRENCES:
        f, pf = g(m, "fwd"), g(m, "fwd", src=P)
        if f and pf:
            r, bes = speed_ratio(f, pf)
            bwf = f.get("of_triad", float("nan"))
            target(f"{m}: ≥ 10x peer, ≥ 50% of the bandwidth bound at T={T0}", r >= 10 and bwf >= 0.5,
                   f"{r:.1f}x peer{BESIDE if bes else ''}, {100 * bwf:.0f}% of triad")
    for m in LINEAR_TIME:
        pts = [(T, x["seconds"]) for (mm, T, tt, ff), x in L.items() if mm == m and tt == th and ff == "fwd" and T >= 1024]
        if len(pts) >= 2:
            e = fit(pts)
            target(f"{m}: exponent ≤ 1.10 (T = {min(p[0] for p in pts)}..{max(p[0] for p in pts)})", e <= 1.10, f"{e:.3f}")
    f, pf = g("softmax", "fwd", 1024), g("softmax", "fwd", 1024, P)
    if f and pf:
        target("tiled softmax ≥ 0.8x torch matmul+softmax at T=1024", pf["seconds"] / f["seconds"] >= 0.8,
               f"{pf['seconds'] / f['seconds']:.2f}x")
    big = max((T for (mm, T, tt, ff) in L if mm == "softmax" and tt == th and ff == "fwd"), default=0)
    if big:
        x = L[("softmax", big, th, "fwd")]
        target("tiled softmax runs T=65536 in O(T) memory", big >= 65536,
               f"largest T run: {big}, extra {x['extra_bytes'] / 2 ** 20:.0f} MiB (the T x T scores would be "
               f"{8 * big * big * 4 / 2 ** 30:.0f} GiB)")
    for T in (1024, 16384):
        sm = g("softmax", "fwd", T)
        best = min(((x["seconds"], m) for (m, TT, tt, ff), x in L.items() if TT == T and tt == th and ff == "fwd"
                    and m in LINEAR_TIME), default=None)
        if sm and best:
            r = sm["seconds"] / best[0]
            need = 8 if T == 16384 else 1
            target(f"fastest linear-time mechanism vs tiled softmax at T={T} (≥ {need}x)", r >= need,
                   f"{best[1]}: {r:.1f}x")
    for m in mixers:
        st = next((x for (mm, T, tt, ff), x in L.items() if mm == m and tt == th and ff == "step"), None)
        pst = next((x for (mm, T, tt, ff), x in P.items() if mm == m and tt == th and ff == "step"), None)
        if st and pst:
            r = pst["seconds"] / st["seconds"]
            target(f"{m}: recurrent step ≥ 20x a PyTorch step", r >= 20, f"{r:.1f}x ({st['seconds'] * 1e6:.1f} µs vs "
                   f"{pst['seconds'] * 1e6:.1f} µs)")
    for m in mixers:
        f, fb = g(m, "fwd"), g(m, "fwdbwd")
        if f and fb:
            r = fb["seconds"] / f["seconds"]
            target(f"{m}: fwd+bwd ≤ {fwdbwd_x(m):g}x fwd at T={T0}", r <= fwdbwd_x(m), f"{r:.2f}")
    out += [f"## Targets ({th} threads)", "", "| target | status | measured |", "|---|---|---|"] + res + [""]
    n_met = sum("| met |" in r for r in res)
    out.insert(2, f"Targets met: {n_met} of {len(res)} (see the end).")
    out.insert(3, "")
    tmp = a.md + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(out) + "\n")
    os.replace(tmp, a.md)
    print("\n".join(out))
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(14, 6))
        cmap = plt.get_cmap("tab20")
        for i, m in enumerate(mixers):
            for j, (key, scale) in enumerate((("seconds", 1e3), ("extra_bytes", 1 / 2 ** 20))):
                pts = sorted((T, x[key] * scale) for (mm, T, tt, ff), x in L.items()
                             if mm == m and tt == th and ff == "fwd" and key in x and x[key] > 0)
                if pts:
                    ax[j].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=cmap(i % 20),
                               lw=2.5 if m == "softmax" else 1.2, label=m)
        ppts = sorted((T, x["seconds"] * 1e3) for (mm, T, tt, ff), x in P.items() if mm == "softmax" and tt == th and ff == "fwd")
        if ppts:
            ax[0].plot([p[0] for p in ppts], [p[1] for p in ppts], "k--", lw=1.5, label="torch softmax (peer)")
        for j, yl in enumerate(("forward time (ms)", "peak extra memory, forward (MiB)")):
            ax[j].set_xscale("log", base=2)
            ax[j].set_yscale("log")
            ax[j].set_xlabel("T (tokens)")
            ax[j].set_ylabel(yl)
            ax[j].grid(True, which="both", alpha=0.3)
        ax[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"linmix bench: B=1, d_model 512, causal, {th} threads")
        fig.tight_layout()
        tmp = a.png + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, a.png)


if __name__ == "__main__":
    main()
