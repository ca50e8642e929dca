#!/usr/bin/python3
"""Quality and speed at equal wall-clock: `linmix train` against its PyTorch twin
(bench/torch_lm.py, what a user would otherwise run), on tiny Shakespeare, per mixer: the same
model, starting weights (the twin reads linmix's initialised checkpoint), optimizer, schedule,
batch and threads, run in alternation on this machine (the twin, then linmix, mixer by mixer).
Each run first measures its own seconds per step (a short calibration run), then takes the steps
that fit the budget (so each finishes its cosine schedule) with the budget as a cap. Writes
docs/lm_peer.md and docs/lm_peer.png (validation bpc against time). Mixers without a twin
(--linmix-only) run linmix alone, for the quality column.

Usage: bench/lm_peer.py [--budget 120] [--mixers softmax,linear,rwkv4,mamba] [--linmix-only gla]
       [--threads 2]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ("d_model 128, 4 layers, 4 heads, ctx 256, GELU MLP x4 (RWKV-4: its channel mix; Mamba: expand 2, "
         "state 16, with the MLP)")
COMMON = {"batch": 16, "seq": 128, "lr": 3e-3, "warmup": 30}


def linmix_run(a, mixer, steps, budget, out):
    cmd = [a.linmix, "train", "--data", a.data, "--mixer", mixer, "--steps", str(steps), "--time-budget", str(budget),
           "--threads", str(a.threads), "--eval-every", "100", "--out", out, "--force"]
    for k, v in COMMON.items():
        cmd += ["--" + k, str(v)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-400:])
    m = re.search(r"trained (\d+) steps in ([\d.]+) s \((\d+) tok/s\).*?= ([\d.]+) bpc", r.stdout)
    with open(os.path.join(out, "log.jsonl")) as f:
        curve = [(j["time_s"], j["val_bpc"]) for j in map(json.loads, f) if "val_bpc" in j]
    return {"engine": "linmix", "mixer": mixer, "steps": int(m.group(1)), "seconds": float(m.group(2)),
            "tok_s": float(m.group(3)), "val_bpc": float(m.group(4)), "curve": curve, "wall": wall}


def linmix_init(a, mixer, out):
    """The initialised model of `linmix train --mixer M` (the run's default seed): one step at a
    learning rate of 1e-30 moves no weight (AdamW's step is lr times a number of order 1)."""
    cmd = [a.linmix, "train", "--data", a.data, "--mixer", mixer, "--steps", "1", "--lr", "1e-30", "--batch", "1",
           "--seq", "8", "--eval-every", "0", "--out", out, "--force"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-400:])
    return os.path.join(out, "ckpt.safetensors")


def torch_run(a, mixer, init, steps, budget):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "torch_lm.py"), "--init", init, "--data", a.data,
           "--steps", str(steps),
           "--time-budget", str(budget), "--threads", str(a.threads), "--lr", str(COMMON["lr"]),
           "--warmup", str(COMMON["warmup"]), "--batch", str(COMMON["batch"]), "--seq", str(COMMON["seq"])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-400:])
    j = json.loads(r.stdout.strip().split("\n")[-1])
    j["mixer"] = mixer
    return j


def fit(run, calib_s, budget):
    """The steps that fit the budget, from a calibration run of calib_s seconds."""
    c = run(100000, calib_s)
    return max(50, int(budget * c["steps"] / c["seconds"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--calibrate", type=float, default=10.0)
    ap.add_argument("--mixers", default="softmax,linear,rwkv4,mamba", help="each with its PyTorch twin")
    ap.add_argument("--linmix-only", default="gla", help="linmix alone (no twin); '' for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--linmix", default=os.path.join(ROOT, "build/release/linmix"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    ap.add_argument("--runs", default=os.path.join(ROOT, "build", "lm_peer"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    a = ap.parse_args()
    os.makedirs(a.runs, exist_ok=True)
    results = []
    # alternation: per mixer, the PyTorch twin then linmix
    order = [(e, m) for m in a.mixers.split(",") for e in ("pytorch", "linmix")]
    order += [("linmix", m) for m in a.linmix_only.split(",") if m]
    for engine, mixer in order:
        out = os.path.join(a.runs, mixer)
        if engine == "pytorch":
            init = linmix_init(a, mixer, out + "-init")
            steps = fit(lambda s, b: torch_run(a, mixer, init, s, b), a.calibrate, a.budget)
            r = torch_run(a, mixer, init, steps, a.budget * 1.1)
        else:
            steps = fit(lambda s, b: linmix_run(a, mixer, s, b, out + "-calib"), a.calibrate, a.budget)
            r = linmix_run(a, mixer, steps, a.budget * 1.1, out)
        r["planned_steps"] = steps
        results.append(r)
        print(f"{engine:8s} {mixer:10s} steps {r['steps']:5d} in {r['seconds']:6.1f} s {r['tok_s']:8.0f} tok/s "
              f"val {r['val_bpc']:.4f} bpc", flush=True)
    with open(os.path.join(a.runs, "results.json"), "w") as f:
        json.dump(results, f)
    report(a, results)
    return 0


def report(a, results):
    twin = {r["mixer"]: r for r in results if r["engine"] == "pytorch"}
    lin = {r["mixer"]: r for r in results if r["engine"] == "linmix"}
    tv = next(iter(twin.values()), {}).get("torch", "?")
    lines = ["# linmix train against its PyTorch twin, at equal wall-clock", "",
             "Produced by `bench/lm_peer.py` (one run on this machine, 2 cores AVX-512, shared; per mixer the twin "
             "then linmix, in alternation). Tiny Shakespeare, byte level (bpc = bits per character), first 90% "
             f"train, last 10% validation. Model: {SHAPE}; AdamW (0.9, 0.95, weight decay 0.1 on matrices), peak "
             f"lr {COMMON['lr']}, warm-up {COMMON['warmup']}, cosine to 0.1, clip 1, batch {COMMON['batch']} x "
             f"{COMMON['seq']} tokens, {a.threads} threads. **{a.budget:.0f} s per run**: each engine first "
             f"measures its seconds per step ({a.calibrate:.0f} s), then takes the steps that fit (so it finishes "
             "its schedule). The PyTorch twin (`bench/torch_lm.py`) is the same model from the same initial "
             "weights (linmix's initialised checkpoint) in PyTorch " + tv + " on the CPU: python/model_ref.py's "
             "forward in float32 with the mechanisms as a PyTorch user writes them (softmax: masked scores; "
             "linear: chunks of 64; RWKV-4: ChatRWKV's token loop; Mamba: selective_scan_ref's loop), checked "
             "against the float64 model by tests/lm_twin_test.py.", "",
             "| mixer | engine | steps | seconds | train tokens/s | linmix / twin tokens/s | validation bpc |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        t = twin.get(r["mixer"])
        ratio = f"{r['tok_s'] / t['tok_s']:.2f}x" if t and r["engine"] == "linmix" else "—"
        lines.append(f"| `{r['mixer']}` | {r['engine']} | {r['steps']} | {r['seconds']:.1f} | {r['tok_s']:.0f} | "
                     f"{ratio} | {r['val_bpc']:.4f} |")
    lines += [""]
    for m, t in twin.items():
        if m in lin:
            x = lin[m]["tok_s"] / t["tok_s"]
            lines.append(f"- `{m}`: linmix trains at **{x:.2f}x** its twin's tokens/s (target >= 2x: "
                         f"{'met' if x >= 2 else 'NOT met'}); {lin[m]['val_bpc']:.4f} bpc against the twin's "
                         f"{t['val_bpc']:.4f} in the same time.")
    best = min((r for r in lin.values() if r["mixer"] != "softmax"), key=lambda r: r["val_bpc"], default=None)
    if best and "softmax" in lin:
        lines.append(f"- the best linear-time mechanism here, `{best['mixer']}`, reaches {best['val_bpc']:.4f} bpc "
                     f"against linmix softmax's {lin['softmax']['val_bpc']:.4f} at equal time (target: lower).")
    lines += ["", "![validation bpc against training time](lm_peer.png)", "",
              f"Reproduce: `bash scripts/build.sh && /usr/bin/python3 bench/lm_peer.py --budget {a.budget:.0f}`."]
    with open(os.path.join(a.out, "lm_peer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    color = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["mixer"] for r in results))}
    for r in results:  # a mixer's twin dashed, in its linmix run's colour
        ts, bs = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(ts, bs, marker=".", label=f"{r['engine']} {r['mixer']}", color=color[r["mixer"]],
                ls="--" if r["engine"] == "pytorch" else "-")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation bpc")
    ax.set_title(f"tiny Shakespeare, {a.budget:.0f} s each, {a.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "lm_peer.png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
