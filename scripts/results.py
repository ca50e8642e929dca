#!/usr/bin/python3
"""Every causal token mixer of the language model on tiny Shakespeare, same shape, same
wall-clock budget: writes docs/results.md (validation bpc, tokens/s, peak memory,
recurrent-mode ms/token) and docs/loss_curves.png.

Usage: scripts/results.py [--budget SECONDS] [--linmix build/release/linmix] [--data FILE]
Byte-level (= char-level for this ASCII text); first 90% train, last 10% validation.
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The experiment's settings where a mechanism's registry example does not fit a 128-token context
# (every other causal mechanism of `linmix mixers --json` runs with its example params), and
# the TransNormer stack (2 block_softmax + 2 norm_linear layers) as an extra row.
SETTINGS = {
    "performer": {"features": 32},
    "block_softmax": {"params": {"block": 32}},
    "aft_local": {"params": {"window": 32}},
    "flash": {"params": {"group": 32}, "qk_dim": 32, "expand": 2},
    "s4d": {"state": 32},
    "mamba": {"state": 16, "expand": 2},
}
EXTRA = [("transnormer", {"layers": [{"mixer": "block_softmax", "params": {"block": 32}}] * 2 +
                          [{"mixer": "norm_linear"}] * 2})]


def mixers(linmix):
    specs = json.loads(subprocess.run([linmix, "mixers", "--json"], capture_output=True, text=True, check=True).stdout)
    out = [(m["name"], {"mixer": m["name"], **SETTINGS.get(m["name"], {"params": m["example_params"]})})
           for m in specs if m["causal"]]
    return out + EXTRA


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60.0, help="training seconds per mechanism")
    ap.add_argument("--linmix", default=os.path.join(ROOT, "build/release/linmix"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--only", default="", help="comma-separated subset")
    ap.add_argument("--plot-only", action="store_true", help="rebuild the table and plot from finished runs")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    runs_dir = os.path.join(ROOT, "build", "results")
    MIXERS = mixers(a.linmix)
    for name, cfg in MIXERS:
        if a.plot_only or (a.only and name not in a.only.split(",")):
            continue
        base = {"d_model": 128, "n_layer": 4, "n_head": 4, "ctx": 128, "channel_mix": "mlp", "kernel": 7}
        base.update(cfg)
        if "layers" in base:
            base["n_layer"] = len(base["layers"])
        run = os.path.join(runs_dir, name)
        os.makedirs(run, exist_ok=True)
        cfg_path = os.path.join(run, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(base, f)
        cmd = [a.linmix, "train", "--data", a.data, "--config", cfg_path, "--out", run, "--steps", "100000",
               "--time-budget", str(a.budget), "--batch", "16", "--seq", "128", "--lr", "3e-3", "--warmup", "30",
               "--eval-every", "0", "--ckpt-every", "0"]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            if os.path.exists(os.path.join(run, "row.json")):
                os.remove(os.path.join(run, "row.json"))
            continue
        params = int(re.search(r"linmix train: (\d+) parameters", r.stderr).group(1))
        mem = float(re.search(r"peak memory ([\d.]+) MiB", r.stdout).group(1))
        log = [json.loads(l) for l in open(os.path.join(run, "log.jsonl"))]
        final = log[-1]
        g = subprocess.run([a.linmix, "generate", "--model", os.path.join(run, "ckpt.safetensors"), "--prompt",
                            "ROMEO:", "--tokens", "120", "--temperature", "0.8", "--stats"],
                           capture_output=True, text=True)  # 6 + 120 < ctx 128 (learned positions)
        if g.returncode != 0:
            print(g.stderr, file=sys.stderr)
        ms = float(re.search(r"ms_per_token=([\d.]+)", g.stderr).group(1))
        row = dict(params=params, steps=final["step"], bpc=final["val_bpc"], tok_s=final["tok_s"], mem=mem, ms=ms,
                   sample=g.stdout.strip()[:160])
        with open(os.path.join(run, "row.json"), "w") as f:
            json.dump(row, f)
        print(f"   bpc {final['val_bpc']:.4f}  {final['tok_s']:.0f} tok/s  {mem:.0f} MiB  {ms:.3f} ms/token",
              flush=True)

    # The table holds every mechanism with a finished run (so --only refreshes some rows).
    rows, curves = [], {}
    for name, _ in MIXERS:
        run = os.path.join(runs_dir, name)
        if os.path.exists(os.path.join(run, "row.json")):
            rows.append((name, json.load(open(os.path.join(run, "row.json")))))
            log = [json.loads(l) for l in open(os.path.join(run, "log.jsonl"))]
            curves[name] = [(x["time_s"], x["loss"]) for x in log]
        else:
            rows.append((name, None))
    lines = [
        "# Results: every causal token mixer on tiny Shakespeare",
        "",
        f"Command: `python3 scripts/results.py --budget {a.budget:g}` (2 threads on this machine's 2 cores).",
        "Byte-level language model, 4 layers, d_model 128, 4 heads, GELU MLP channel mix (x4), context 128,",
        f"batch 16 x 128, AdamW lr 3e-3 (warm-up 30, cosine), {a.budget:g} s of training each. Validation bpc on",
        "128 windows of 128 characters spread over the last 10% of the file (first 90% trains).",
        "ms/token: recurrent-mode generation (one token at a time, O(1) state except softmax's KV cache).",
        "",
        "Reading it: 150 s is 200-500 steps here (0.4-1M characters), early in training. The mixers whose",
        "layer carries local order by construction (RWKV-4's token shift and decay, Mamba's convolution,",
        "S4D's kernel, TransNormer/block_softmax's local blocks) leave the ~2.4-nat bigram plateau first; the",
        "global attention-like mixers (learned absolute positions) are still on it. aft_full and mamba are",
        "the slowest per token (O(T^2 C) bias sweep; the Mamba block's 2x-wide scan), so they take the fewest",
        "steps. Throughput is the unoptimised state of linmix (issue 7 is the speed work).",
        "",
        "| mixer | parameters | steps | validation bpc | train tokens/s | peak memory (MiB) | recurrent ms/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        lines.append(f"| {name} | {r['params']:,} | {r['steps']} | {r['bpc']:.4f} | {r['tok_s']:.0f} | "
                     f"{r['mem']:.0f} | {r['ms']:.3f} |")
    lines += ["", "Loss curves (training loss against wall-clock time): `loss_curves.png`.", "", "Samples:", ""]
    for name, r in rows:
        if r:
            lines.append(f"- **{name}**: `{r['sample'].replace(chr(10), ' ').replace('`', chr(39))}`")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 5.5))
        colors = plt.cm.tab20.colors
        for i, (name, pts) in enumerate(curves.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.1,
                    color=colors[(2 * i) % 20 if i < 10 else (2 * (i - 10) + 1) % 20],
                    linestyle="-" if i < 10 else "--")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("training loss (nats/char)")
        ax.set_ylim(1.2, 3.5)
        ax.set_title("tiny Shakespeare, same shape and time budget")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "loss_curves.png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no plot (apt-get install python3-matplotlib)", file=sys.stderr)
    print(open(os.path.join(a.out, "results.md")).read())


if __name__ == "__main__":
    main()
