#!/usr/bin/python3
"""How far each layer looks back, for trained models: runs `linmix viz` on each checkpoint (the
effective attention of every layer from its mechanism, on a window of the validation text) and
writes docs/viz.md, docs/viz_<name>.png (every layer and head) and docs/viz_lookback.png (mean
look-back distance per layer, one line per model).

Usage: scripts/viz.py [--models softmax,linear,rwkv4,mamba] [--runs build/results] [--tokens 128]
The checkpoints are scripts/results.py's (build/results/<name>/ckpt.safetensors): run it first.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
import st  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="softmax,linear,rwkv4,mamba")
    ap.add_argument("--runs", default=os.path.join(ROOT, "build", "results"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--linmix", default=os.path.join(ROOT, "build/release/linmix"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = {}
    for name in a.models.split(","):
        ck = os.path.join(a.runs, name, "ckpt.safetensors")
        if not os.path.exists(ck):
            sys.exit(f"viz.py: {ck} missing: train it first (scripts/results.py --only {name})")
        out = os.path.join(ROOT, "build", "viz", name)
        cmd = [a.linmix, "viz", "--model", ck, "--data", a.data, "--tokens", str(a.tokens), "--out", out, "--force"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        print(r.stdout, flush=True)
        # the same model at its initialisation (one step at lr 1e-9): what training changed
        init_run = out + "-init"
        r = subprocess.run([a.linmix, "train", "--data", a.data, "--config", os.path.join(a.runs, name, "config.json"),
                            "--steps", "1", "--lr", "1e-9", "--batch", "1", "--seq", "16", "--eval-every", "0",
                            "--out", init_run, "--force"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        r = subprocess.run([a.linmix, "viz", "--model", os.path.join(init_run, "ckpt.safetensors"), "--data", a.data,
                            "--tokens", str(a.tokens), "--out", init_run + "-viz", "--force"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        at_init = [l["mean_lookback"] for l in json.load(open(os.path.join(init_run + "-viz", "viz.json")))["layers"]]
        j = json.load(open(os.path.join(out, "viz.json")))
        j["at_init"] = at_init
        w = st.load(os.path.join(out, "weights.safetensors"))
        row = json.load(open(os.path.join(a.runs, name, "row.json"))) if os.path.exists(
            os.path.join(a.runs, name, "row.json")) else {}
        results[name] = (j, w, row)
        L = len(j["layers"])
        G = max(l["groups"] for l in j["layers"])
        fig, axes = plt.subplots(L, G, figsize=(2.3 * G, 2.3 * L), squeeze=False)
        for li, layer in enumerate(j["layers"]):
            m = w[f"layer.{li}"]
            for g in range(G):
                ax = axes[li][g]
                ax.set_xticks([])
                ax.set_yticks([])
                if g >= layer["groups"]:
                    ax.axis("off")
                    continue
                img = np.log10(np.maximum(m[g], 1e-6))
                img[np.triu_indices(m.shape[1], 1)] = np.nan
                ax.imshow(img, vmin=-4, vmax=0, cmap="magma", interpolation="nearest")
                ax.set_title(f"L{li} {'head' if layer['unit'] == 'head' else 'group'} {g}: {layer['lookback'][g]:.1f}", fontsize=7)
        fig.suptitle(f"{name}: share of position t's output from position s (rows t, columns s; log10, -4 .. 0); "
                     "title: mean look-back in tokens", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, f"viz_{name}.png"), dpi=80)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = ["# How far each layer looks back", "",
             f"Produced by `/usr/bin/python3 scripts/viz.py` (`linmix viz` on each model; {a.tokens} tokens from the "
             "start of the validation split of tiny Shakespeare). The models are `scripts/results.py`'s: the same "
             "shape (4 layers, d_model 128, 4 heads), the same training budget (docs/results.md).", "",
             "**What is drawn.** For every layer, `linmix viz` captures its mixer's inputs in the model's forward and "
             "runs the mechanism's float64 reference on them with the value input replaced by a unit impulse at "
             "position s: the response at t is the mechanism's own weight W_ts (its output is linear in the values "
             "once the other inputs are fixed; `tests/test_viz.cpp` checks that the weights reproduce every causal "
             "mechanism's output for random values, and that softmax's are its attention probabilities). That is the "
             "T x T attention matrix for softmax and linear attention, the decayed weights exp(w (t-s) + k_s) / "
             "normaliser for RWKV-4, and the input-dependent kernel C_t (prod dA) B_s dt_s of Mamba's selective SSM "
             "(plus D on the diagonal, after the convolution). Each row is turned into shares |W_ts| / sum_s |W_ts| "
             "per value unit and averaged over the head (attention-like) or over a group of C/H channels (RWKV-4, "
             "Mamba: one decay per channel; channel groups in channel order). **Mean look-back** of a head: "
             "sum_s share_ts (t - s), averaged over t.", ""]
    verdicts = []
    for name, (j, w, row) in results.items():
        lb = [l["mean_lookback"] for l in j["layers"]]
        x = np.arange(len(lb))
        p = ax.plot(x, lb, marker="o", label=name)
        ax.plot(x, j["at_init"], ls=":", color=p[0].get_color(), alpha=0.8)
        for li, l in enumerate(j["layers"]):
            ax.scatter([li] * len(l["lookback"]), l["lookback"], s=8, color=p[0].get_color(), alpha=0.5)
        rho = float(np.corrcoef(np.argsort(np.argsort(lb)), x)[0, 1]) if len(lb) > 1 else 0.0
        inc = all(b >= a_ for a_, b in zip(lb, lb[1:]))
        verdicts.append((name, lb, rho, inc, j["at_init"]))
        bpc = f", {row['bpc']:.3f} validation bpc" if row else ""
        lines += [f"## {name}{bpc}", "", f"![{name}](viz_{name}.png)", "",
                  "| layer | mixer | mean look-back (tokens) | per " + j["layers"][0]["unit"] + " |", "|---|---|---|---|"]
        for l in j["layers"]:
            lines.append(f"| {l['layer']} | {l['mixer']} | {l['mean_lookback']:.2f} | " +
                         ", ".join(f"{v:.2f}" for v in l["lookback"]) + " |")
        lines.append("")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean look-back (tokens)")
    ax.set_title(f"mean look-back per layer ({a.tokens} tokens; dots: heads / groups; dotted: at init)", fontsize=9)
    ax.set_xticks(range(max(len(v[1]) for v in verdicts)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "viz_lookback.png"), dpi=100)
    summary = ["## Do higher layers look further back?", "", "![mean look-back per layer](viz_lookback.png)", "",
               "| model | mean look-back, layer 0 .. last | at initialisation | rank correlation with depth | "
               "increasing at every layer |", "|---|---|---|---|---|"]
    for name, lb, rho, inc, init in verdicts:
        summary.append(f"| {name} | {' / '.join(f'{v:.1f}' for v in lb)} | {' / '.join(f'{v:.1f}' for v in init)} | "
                       f"{rho:+.2f} | {'yes' if inc else 'no'} |")
    ups = [v[0] for v in verdicts if v[3]]
    summary += ["", f"Every layer looks further back than the one below in: {', '.join(ups) or 'none'}; "
                "the rank correlation says how close the others come. The 'at initialisation' column is the same "
                "model before training (one step at lr 1e-9): where the trained profile differs from it, training "
                "made the difference; where they agree (a mechanism whose init already spreads its decays by "
                "depth, as RWKV-4's does: slower decays in deeper layers), the shape comes from the init.", ""]
    head_end = 6  # after the method paragraphs
    lines = lines[:head_end] + summary + lines[head_end:]
    with open(os.path.join(a.out, "viz.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
