#!/usr/bin/python3
"""Every causal token mixer of the language model on tiny Shakespeare, same shape, same
wall-clock budget: writes docs/results.md (validation bpc, steps, tokens/s, peak memory,
recurrent-mode ms/token, recurrent state size) and docs/loss_curves.png.

Each run first measures its own seconds per step (a short calibration run with the same
settings), then trains the steps that fit the budget, so every mechanism finishes its cosine
schedule; the budget (x 1.15) stays as a cap. A finished run leaves build/results/NAME/row.json:
`--only a,b` refreshes those rows and the table is rebuilt from every finished row.

Usage: scripts/results.py [--budget 300] [--only softmax,rwkv4] [--target] [--plot-only]
  --target: the 10-minute run (TARGET below: 600 s, a byte-level BPE tokenizer) for the <= 2.0 bpc goal
Byte-level (= char-level for this ASCII text) but for --target; first 90% train, last 10%
validation; bpc is bits per byte of the validation text whatever the tokenizer.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exp_common import causal_rows, fresh_run, selected, state_floats  # noqa: E402
BASE = {"d_model": 128, "n_layer": 4, "n_head": 4, "ctx": 128, "channel_mix": "mlp", "kernel": 7}
TRAIN = {"batch": 16, "seq": 128, "lr": 3e-3, "warmup": 30, "eval-every": 250}
# Extra rows: the TransNormer stack (2 block_softmax + 2 norm_linear layers) and S4D with the
# S4D-LegS initialisation (the diagonal of HiPPO-LegS's normal part) beside S4D-Lin.
EXTRA = [("transnormer", {"layers": [{"mixer": "block_softmax", "params": {"block": 32}}] * 2 +
                          [{"mixer": "norm_linear"}] * 2}),
         ("s4d_legs", {"mixer": "s4d", "state": 32, "params": {"init": "legs"}})]
# The 10-minute target (--target): RWKV-4, the best per second at 300 s, at `linmix train`'s
# default width and depth (d_model 128, 4 layers; context 512, below), on the ids of a 1024-token byte-level BPE
# learned on the training split (scripts/bpe_train.py): a token is 2.4 bytes of this text, so a
# step reads 2.4x the text of a byte-level step for ~15% more time (the larger embedding and
# head). 180 s, weight decay 1.0, dropout 0.1: the training split is only ~414k such tokens, and
# longer runs overfit (measured, docs/results.md), so the budget is less than the 10 minutes allowed.
# Sequences of 512 tokens (batch 4: the same tokens a step): validation windows are the training
# sequence length, so a token is scored with more context (2.0652 at 16 x 128, 2.0509 at 8 x 256).
TARGET = ("rwkv4_target", {"mixer": "rwkv4", "d_model": 128, "n_layer": 4, "n_head": 4, "ctx": 512,
                           "channel_mix": "rwkv", "dropout": 0.1},
          {"budget": 180, "seq": 512, "batch": 4, "lr": 3e-3, "weight-decay": 1.0, "bpe": 1024})


def mixers(linmix):
    return causal_rows(linmix) + EXTRA


def train(a, cfg_path, out, steps, budget, train_args):
    cmd = [a.linmix, "train", "--data", a.data, "--config", cfg_path, "--out", out, "--steps", str(steps),
           "--time-budget", f"{budget:.1f}", "--ckpt-every", "0", "--threads", str(a.threads), "--force"]
    for k, v in train_args.items():
        if k not in ("budget", "bpe"):
            cmd += ["--" + k, str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(" ".join(cmd) + "\n" + r.stderr[-600:])
    m = re.search(r"trained (\d+) steps in ([\d.]+) s \((\d+) tok/s\)", r.stdout)
    return cmd, r, int(m.group(1)), float(m.group(2)), float(m.group(3))


def run_row(a, name, cfg, runs_dir, overrides=None):
    overrides = overrides or {}
    base = dict(BASE)
    base.update(cfg)
    for k in ("d_model", "n_layer", "n_head", "ctx", "channel_mix"):
        if k in overrides:
            base[k] = overrides[k]
    if "layers" in base:
        base["n_layer"] = len(base["layers"])
    train_args = dict(TRAIN)
    train_args.update({k: v for k, v in overrides.items() if k in ("batch", "seq", "lr", "warmup", "budget", "bpe", "weight-decay")})
    budget = float(train_args.get("budget", a.budget))
    if "bpe" in train_args:  # a byte-level BPE of that vocabulary, learned on the training split
        os.makedirs(runs_dir, exist_ok=True)
        tok = os.path.join(runs_dir, f"bpe{train_args['bpe']}.json")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bpe_train.py"), "--data", a.data,
                        "--vocab", str(train_args["bpe"]), "--out", tok], check=True, capture_output=True)
        base["vocab"], train_args["tokenizer"] = train_args["bpe"], tok
    run, cfg_path = fresh_run(runs_dir, name, base)
    # calibration: seconds per step at these settings, then the steps that fit the budget
    _, _, s_steps, s_secs, _ = train(a, cfg_path, run + "-calib", 100000, a.calibrate, dict(train_args, **{"eval-every": 0}))
    steps = max(50, int(budget * s_steps / s_secs))
    cmd, r, done, secs, tok_s = train(a, cfg_path, run, steps, budget * 1.15, train_args)
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    params = int(re.search(r"linmix train: (\d+) parameters", r.stderr).group(1))
    mem = float(re.search(r"peak memory ([\d.]+) MiB", r.stdout).group(1))
    log = [json.loads(l) for l in open(os.path.join(run, "log.jsonl"))]
    bpc = [x["val_bpc"] for x in log if "val_bpc" in x][-1]
    state_path = os.path.join(run, "state.safetensors")
    g = subprocess.run([a.linmix, "generate", "--model", os.path.join(run, "ckpt.safetensors"), "--prompt",
                        "ROMEO:", "--tokens", "120", "--temperature", "0.8", "--seed", "1", "--stats",
                        "--state-out", state_path, "--threads", "1"],
                       capture_output=True, text=True, errors="replace")  # 6 + 120 < ctx (learned positions)
    if g.returncode != 0:
        raise RuntimeError(g.stderr[-600:])
    ms = float(re.search(r"ms_per_token=([\d.]+)", g.stderr).group(1))
    row = dict(params=params, steps=done, planned=steps, seconds=secs, bpc=bpc, tok_s=tok_s, mem=mem, ms=ms,
               state=state_floats(state_path), budget=budget, sample=g.stdout.strip()[:160],
               config=base, train=train_args)
    with open(os.path.join(run, "row.json"), "w") as f:
        json.dump(row, f)
    print(f"   {done} steps in {secs:.0f} s: {bpc:.4f} bpc  {tok_s:.0f} tok/s  {mem:.0f} MiB  {ms:.3f} ms/token "
          f"state {row['state']} floats", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per mechanism")
    ap.add_argument("--calibrate", type=float, default=12.0, help="seconds of the calibration run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--linmix", default=os.path.join(ROOT, "build/release/linmix"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "tinyshakespeare.txt"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--runs", default=os.path.join(ROOT, "build", "results"))
    ap.add_argument("--only", default="", help="comma-separated subset of rows to (re)run")
    ap.add_argument("--target", action="store_true", help="(re)run the 10-minute target row")
    ap.add_argument("--plot-only", action="store_true", help="rebuild the table and plot from finished runs")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows_def = mixers(a.linmix)
    only = selected("results.py", rows_def, a.only)
    if not a.plot_only:
        for name, cfg in rows_def:
            if (only and name not in only) or (a.target and not only):
                continue
            try:
                run_row(a, name, cfg, a.runs)
            except RuntimeError as e:
                print(f"== {name} failed: {e}", file=sys.stderr, flush=True)
        if a.target:
            run_row(a, TARGET[0], TARGET[1], a.runs, TARGET[2])
    report(a, rows_def)


def load(runs, name):
    p = os.path.join(runs, name, "row.json")
    if not os.path.exists(p):
        return None, []
    row = json.load(open(p))
    log = [json.loads(l) for l in open(os.path.join(runs, name, "log.jsonl"))]
    return row, [(x["time_s"], x["val_bpc"]) for x in log if "val_bpc" in x]


def ngram_bits(path):
    """Validation bits per byte of the unigram and the bigram model counted on the training split
    (the first 90% of the bytes, as linmix train splits; add-1/256 smoothing): the plateaus a
    language model passes on its way to using context."""
    data = open(path, "rb").read()
    cut = len(data) * 9 // 10
    train, val = data[:cut], data[cut:]
    uni = [0.0] * 256
    for b in train:
        uni[b] += 1
    big = {}
    for x, y in zip(train, train[1:]):
        big[(x, y)] = big.get((x, y), 0) + 1
    n, al = len(train), 1.0 / 256
    u_bits = -sum(math.log2((uni[b] + al) / (n + 1)) for b in val) / len(val)
    b_bits = -sum(math.log2((big.get((x, y), 0) + al) / (uni[x] + 1)) for x, y in zip(val, val[1:])) / (len(val) - 1)
    return u_bits, b_bits


def reading(a, done):
    """The section that reads the table: numbers computed from the rows, nothing typed in."""
    if len(done) < 3:
        return []
    got = dict(done)
    uni, big = ngram_bits(a.data)
    by_time = sorted(done, key=lambda x: x[1]["bpc"])
    at = {}
    for name, _ in done:  # validation bpc at step 500 (every row's first evaluations): quality per step
        log = [json.loads(l) for l in open(os.path.join(a.runs, name, "log.jsonl"))]
        pts = [x["val_bpc"] for x in log if "val_bpc" in x and x["step"] == 500]
        if pts:
            at[name] = pts[0]
    by_step = sorted(at.items(), key=lambda x: x[1])
    below = [n for n, r in done if r["bpc"] < big]
    soft = got.get("softmax")
    lines = ["", "## Reading the table", "",
             f"- Plateaus (counted on the same split, `ngram_bits` in the script): a unigram model scores "
             f"{uni:.3f} bits per byte, a bigram model {big:.3f}. {len(below)} of {len(done)} mechanisms end "
             f"below the bigram plateau within the budget; "
             + (", ".join(f"{n} ({got[n]['bpc']:.3f})" for n, r in done if r['bpc'] >= big) or "none")
             + (" do not." if any(r['bpc'] >= big for _, r in done) else " stay above it.")]
    if by_step:
        lines.append("- Per step (validation bpc after 500 steps: the same batches seen by all, though each "
                     "row's cosine schedule spans its own step count, so the rows with fewer steps have decayed "
                     "their learning rate further by then): best "
                     + ", ".join(f"{n} {v:.3f}" for n, v in by_step[:4]) + "; worst "
                     + ", ".join(f"{n} {v:.3f}" for n, v in by_step[-3:]) + ".")
    lines.append("- Per second (the table, equal wall-clock): best "
                 + ", ".join(f"{n} {r['bpc']:.3f} ({r['steps']} steps)" for n, r in by_time[:4]) + ".")
    if by_step:
        rank_s = {n: i for i, (n, _) in enumerate(by_step)}
        rank_t = {n: i for i, (n, _) in enumerate(by_time)}
        moved = sorted((rank_t[n] - rank_s[n], n) for n in rank_s)
        lines.append("- Speed decides much of the ranking: falling most from per-step to per-second rank "
                     + ", ".join(f"{n} ({rank_s[n] + 1} -> {rank_t[n] + 1}, {got[n]['tok_s']:.0f} tok/s)"
                                 for d, n in moved[::-1][:3] if d > 0)
                     + "; rising most " + ", ".join(f"{n} ({rank_s[n] + 1} -> {rank_t[n] + 1}, "
                                                     f"{got[n]['tok_s']:.0f} tok/s)" for d, n in moved[:3] if d < 0)
                     + ".")
    if soft:
        beat = [n for n, r in by_time if r["bpc"] < soft["bpc"] and n != "softmax"]
        lines.append(f"- Against softmax attention ({soft['bpc']:.3f} at equal time): {len(beat)} linear-time "
                     f"mechanisms reach a lower bpc (" + ", ".join(beat) + ").")
    return lines


def report(a, rows_def):
    rows, curves = [], {}
    for name, _ in rows_def:
        r, c = load(a.runs, name)
        rows.append((name, r))
        if r:
            curves[name] = c
    budgets = sorted({r["budget"] for _, r in rows if r})
    done = [(n, r) for n, r in rows if r]
    lines = [
        "# Results: every causal token mixer on tiny Shakespeare",
        "",
        f"Command: `/usr/bin/python3 scripts/results.py --budget {a.budget:g}` (one row: `--only NAME`; "
        "the 10-minute row: `--target`), 2 threads on this machine's 2 cores (AVX-512, shared).",
        "Byte-level language model, 4 layers, d_model 128, 4 heads, GELU MLP channel mix (x4), context 128,",
        f"batch {TRAIN['batch']} x {TRAIN['seq']}, AdamW (0.9, 0.95, weight decay 0.1) lr {TRAIN['lr']:g} "
        f"(warm-up {TRAIN['warmup']}, cosine to 0.1), **{', '.join(f'{b:g}' for b in budgets) or a.budget} s of "
        "training each**: a calibration run measures each mechanism's seconds per step, then it trains the "
        "steps that fit (its schedule completes). Validation bpc on 128 windows of 128 characters spread over "
        "the last 10% of the file (the first 90% trains).",
        "ms/token: recurrent-mode generation, one token at a time, 1 thread. State: the whole model's "
        "recurrent state after the 126 tokens of the sample, in floats (constant in the sequence length "
        "except softmax's KV cache and aft_full's stored k, v, which grow with every token).",
        "",
        "| mixer | parameters | steps | validation bpc | train tokens/s | peak memory (MiB) | recurrent ms/token | state (floats) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        lines.append(f"| {name} | {r['params']:,} | {r['steps']} | {r['bpc']:.4f} | {r['tok_s']:.0f} | "
                     f"{r['mem']:.0f} | {r['ms']:.3f} | {r['state']:,} |")
    if done:
        best = min(done, key=lambda x: x[1]["bpc"])
        soft = dict(done).get("softmax")
        lines += ["", f"Best at this budget: **{best[0]}**, {best[1]['bpc']:.4f} bpc" +
                  (f" (softmax: {soft['bpc']:.4f})." if soft else ".")]
    missing = [n for n, r in rows if r is None]
    if missing:
        lines += ["", f"Not run at this budget yet: {', '.join(missing)} (`scripts/results.py --only "
                  f"{','.join(missing)}`)."]
    lines += reading(a, done)
    got = dict(done)
    if "s4d" in got and "s4d_legs" in got:
        lines += ["", f"S4D's initialisation (docs/hippo.md): S4D-Lin {got['s4d']['bpc']:.4f} bpc, S4D-LegS "
                  f"{got['s4d_legs']['bpc']:.4f} bpc at the same shape, state size N = 32 and budget."]
    t, _ = load(a.runs, TARGET[0])
    lines += ["", "## The 10-minute target (<= 2.0 bpc on 2 cores)", ""]
    if t:
        c = t["config"]
        tk = t["train"].get("bpe")
        lines += [f"`scripts/results.py --target`: {TARGET[1]['mixer']}, d_model {c['d_model']}, {c['n_layer']} "
                     f"layers, context {c['ctx']}, "
                     f"{'a %d-token byte-level BPE (scripts/bpe_train.py, learned on the training split), ' % tk if tk else 'bytes, '}"
                     f"{t['params']:,} parameters, batch {t['train']['batch']} x "
                     f"{t['train']['seq']}, lr {t['train']['lr']:g}, weight decay {t['train'].get('weight-decay', 0.1):g}, "
                     f"dropout {c.get('dropout', 0):g}, "
                     f"{t['budget']:g} s: {t['steps']} steps at "
                     f"{t['tok_s']:.0f} tok/s, **{t['bpc']:.4f} bpc** "
                     f"({'met' if t['bpc'] <= 2.0 else 'not met: %.3f bpc short' % (t['bpc'] - 2.0)}).",
                     "What moved it is the tokenizer: a BPE token is 2.4 bytes of this text, so a step of "
                     "16 x 128 tokens reads 2.4x the text of a byte-level step for ~15% more time (the "
                     "1024-row embedding and head); the same model on bytes reached 2.1646 bpc in 600 s (3428 "
                     "steps, 12084 tok/s). What stops it is the data, not the 10 minutes: the training split is "
                     "~414k BPE tokens, one epoch every ~23 s at this speed, and longer runs overfit (measured "
                     "on 2026-12-04, same model and tokenizer, validation bpc best / at the end): 600 s at "
                     "weight decay 0.1, 2.193 at step 500 / 2.84 at step 3750 (train loss 1.5 nats); 3000 steps "
                     "at weight decay 1.0, 2.140 / 2.222; 3000 steps at 3.0, 2.107 / 2.112; 1500 steps at 1.0, "
                     "2.098; 1500 steps of a 512-token BPE, 2.158. With dropout (`\"dropout\"` in the config, on the "
                     "residual branches): 0.2 at weight decay 0.1, 2000 steps, 2.138 (flat from step 1250); 0.1 "
                     "at 1.0, 1500 steps, 2.066 (steps-bound runs, measured beside other work). Longer sequences at the "
                     "same tokens a step (validation windows are the training length, so a token is scored with "
                     "more context), 1400 steps: 16 x 128, 2.0652; 8 x 256, 2.0509; 4 x 512, 2.0471, differences "
                     "within the spread between runs of one setting (~0.02: 4 x 512 gave 2.0471 at 1400 steps "
                     "and 2.0618 / 2.0670 at step 1500 / 1512 of the 1512-step run of this row). A larger "
                     "model overfits sooner: d_model 192, dropout 0.2, 8 x 256, 2000 steps (403 s), 2.087 at step "
                     "1500, 2.0885 at the end (train loss 2.29 nats, validation 3.29). A 2048-token BPE (this row's "
                     "setting otherwise, 1500 steps): 2.1052, so 1024 is the best of 512 / 1024 / 2048. Every knob "
                     "measured has its best near this row's setting and moves the result up on either side "
                     "(tokenizer size, weight decay 0.1 / 1.0 / 3.0, dropout, width, steps), and the best of them "
                     "land at 2.047-2.067: the gap to 2.0 is the data's (one epoch of the split every ~23 s), "
                     "not the time. (nanoGPT's 10.7M-parameter character model, dropout 0.2: 2.12 bpc after 3 "
                     "minutes on a GPU.)"]
    else:
        lines.append("Not run yet (`scripts/results.py --target`).")
    lines += ["", "Validation bpc against training time: `loss_curves.png`.", "", "Samples (temperature 0.8):", ""]
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
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.1, marker=".",
                    color=colors[(2 * i) % 20 if i < 10 else (2 * (i - 10) + 1) % 20],
                    linestyle="-" if i < 10 else ("--" if i < 20 else ":"))
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("validation bpc")
        ax.set_ylim(1.8, 3.6)
        ax.set_title("tiny Shakespeare, same shape and time budget")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "loss_curves.png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no plot (apt-get install python3-matplotlib)", file=sys.stderr)
    print(open(os.path.join(a.out, "results.md")).read())


if __name__ == "__main__":
    main()
