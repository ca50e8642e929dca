#!/usr/bin/python3
"""Mamba and Mamba-2 checkpoints (Hugging Face MambaForCausalLM / Mamba2ForCausalLM and mamba_ssm
names, random weights, tied and separate lm_head; Mamba-2 with one and two groups): linmix's
logits in every mode (the training model's parallel and recurrent forms, the engine's sequence
mode in chunks of 1, 7, 100 and decode) and weight type equal an independent float64 PyTorch
Mamba / Mamba-2 (python/mamba_ref.py, python/mamba2_ref.py) within 1e-4 relative; generation
with the GPT-NeoX tokenizer equals the reference's greedy text, also continued from a saved
state; bad files are refused by name.  Usage: mamba_test.py PATH/TO/linmix"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import mamba2_ref  # noqa: E402
import mamba_ref  # noqa: E402
import rwkv4_ref  # noqa: E402  (quantize: the rounding of the engine's weight types)
import st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_checks  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-mamba-")
check = checkpoint_checks.Checks()
linmix = checkpoint_checks.Linmix(LINMIX, TMP)
save, logits = linmix.save, linmix.logits
QUANTIZED = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight", "lm_head.weight")
MODES = (("parallel", []), ("recurrent", []), ("sequence", ["--chunk", "1"]), ("sequence", ["--chunk", "7"]),
         ("sequence", ["--chunk", "100"]), ("decode", []))


def quantize(w, dtype):
    """The weights the engine's dtype stands for: every projection and the head rounded as
    python/rwkv4_ref.py rounds them; a tied head is the embedding rounded."""
    out = dict(w)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = w["backbone.embeddings.weight"]
    return rwkv4_ref.quantize(out, dtype, QUANTIZED)


def check_modes(label, path, w, tokens, forward):
    """Every mode and weight type of the file at path against forward(weights, tokens)."""
    ref = forward(w, tokens)[0].numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    for mode, extra in MODES:
        got, err = logits(path, tokens, mode, extra)
        e = float(np.abs(got - ref).max()) / scale if got is not None else 1.0
        check(f"{label}: {mode} {' '.join(extra)}: logits vs PyTorch float64", e <= 1e-4, err or f"max rel err {e:.2e}")
    for dt in ("bf16", "int8", "q4"):
        refq = forward(quantize(w, dt), tokens)[0].numpy()
        for mode, extra in (("sequence", ["--chunk", "7"]), ("decode", [])):
            got, err = logits(path, tokens, mode, [*extra, "--dtype", dt])
            e = float(np.abs(got - refq).max()) / scale if got is not None else 1.0
            far = float(np.abs(refq - ref).max()) / scale
            check(f"{label}: {dt} weights, {mode}: logits vs PyTorch float64 of the rounded weights", e <= checkpoint_checks.tolerance(dt, mode),
                  err or f"max rel err {e:.2e} (rounding itself moves them {far:.2e})")


def mamba_ssm_names(w):
    return {("backbone.embedding.weight" if n == "backbone.embeddings.weight" else n): t for n, t in w.items()}


def every_mode():
    tokens = [int(x) for x in np.random.default_rng(2).integers(0, 70, 120)]
    for tied, (C, L, S, R) in ((False, (32, 3, 8, 2)), (True, (48, 2, 16, 3))):
        w = mamba_ref.random_mamba(70, C, L, S=S, R=R, seed=4, tied=tied)
        path = save(mamba_ssm_names(w) if tied else w, "m.safetensors")  # tied: in mamba_ssm's own names
        label = f"Mamba C={C} N={S} R={R} {'tied head, mamba_ssm names' if tied else 'separate head, HF names'}"
        check_modes(label, path, w, tokens, mamba_ref.forward)
    # Mamba-2: H heads of P = 2C / H, G groups (the file's n_groups metadata), state S; the chunked
    # SSD's chunk is 64, so 120 tokens in chunks of 100 cross its boundary
    for tied, (C, L, S, H, G) in ((False, (32, 3, 8, 4, 1)), (True, (24, 2, 6, 6, 2))):
        w = mamba2_ref.random_mamba2(70, C, L, S=S, H=H, G=G, seed=5, tied=tied)
        path = save(mamba_ssm_names(w) if tied else w, "m2.safetensors", meta={"n_groups": str(G)} if G > 1 else None)
        label = f"Mamba-2 C={C} H={H} G={G} N={S} {'tied head, mamba_ssm names' if tied else 'separate head, HF names'}"
        check_modes(label, path, w, tokens, lambda w_, t_, G=G: mamba2_ref.forward(w_, t_, groups=G))
    r = linmix("info", path)
    check("info says what it was", r.returncode == 0 and "Mamba-2 checkpoint (imported)" in r.stdout, r.stdout[-300:])


def generate_neox():
    tok_path = os.path.join(ROOT, "data", "20B_tokenizer.json")
    import bpe_tokenizer
    bpe = bpe_tokenizer.Bpe(tok_path)
    for kind, w, ref in (("Mamba", mamba_ref.random_mamba(50280, 16, 2, S=4, seed=6, tied=True), mamba_ref),
                         ("Mamba-2", mamba2_ref.random_mamba2(50280, 16, 2, S=4, H=2, seed=6, tied=True), mamba2_ref)):
        path = save(w, "neox.safetensors")
        prompt, n = "The quick brown fox", 10
        ids = bpe.encode(prompt)
        want = bpe.decode(ids + ref.greedy(w, ids, n))
        r = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", tok_path, "--prompt", prompt, "--tokens",
                            str(n), "--temperature", "0"], capture_output=True)
        check(f"{kind}: generate with 20B_tokenizer.json equals the reference's greedy text",
              r.returncode == 0 and r.stdout.rstrip(b"\n") == want, repr(r.stdout[:80]) + " vs " + repr(want[:80]))
        sp = os.path.join(TMP, "state.safetensors")
        r1 = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", tok_path, "--prompt", "Once upon",
                             "--tokens", "0", "--state-out", sp], capture_output=True)
        r2 = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", tok_path, "--prompt", " a time",
                             "--tokens", str(n), "--temperature", "0", "--state-in", sp], capture_output=True)
        both = bpe.encode("Once upon") + bpe.encode(" a time")
        want2 = b" a time" + bpe.decode(ref.greedy(w, both, n))
        check(f"{kind}: --state-out then --state-in continues as the reference over both prompts",
              r1.returncode == 0 and r2.returncode == 0 and r2.stdout.rstrip(b"\n") == want2,
              repr(r2.stdout[:80]) + " vs " + repr(want2[:80]) + (r1.stderr + r2.stderr).decode()[-200:])


def refusals():
    w = mamba_ref.random_mamba(20, 16, 2, S=4, seed=1)

    def refused(name, bad, *needles):
        r = linmix("logits", "--model", save(bad, "bad.safetensors"), "--tokens", "1", "--out",
                   os.path.join(TMP, "x.safetensors"))
        check(f"refused: {name}", r.returncode == 2 and all(s in r.stderr for s in needles) and r.stderr.count("\n") == 1,
              r.stderr.strip())

    bad = dict(w)
    del bad["backbone.layers.1.mixer.x_proj.weight"]
    refused("missing tensor", bad, "Mamba", "blocks.1.att.x_proj.weight")
    bad = dict(w)
    bad["backbone.layers.0.mixer.in_proj.bias"] = torch.zeros(64, dtype=torch.float64)
    refused("a bias linmix's block has not", bad, "Mamba", "in_proj.bias")
    bad = dict(w)
    bad["backbone.layers.0.mixer.D"] = bad["backbone.layers.0.mixer.D"][:5]
    refused("mis-shaped tensor", bad, "Mamba", "att.D")
    bad = dict(w)
    bad["backbone.layers.0.mixer.A_log"] = torch.zeros(33, 4, dtype=torch.float64)
    refused("inner width not a multiple of C", bad, "Mamba", "inner width")
    w2 = mamba2_ref.random_mamba2(20, 16, 2, S=4, H=4, seed=1)
    p = "backbone.layers.1.mixer."
    bad = dict(w2)
    del bad[p + "dt_bias"]
    refused("Mamba-2: missing tensor", bad, "Mamba-2", "blocks.1.att.dt_bias")
    bad = dict(w2)
    bad[p + "in_proj.bias"] = torch.zeros(1, dtype=torch.float64)
    refused("Mamba-2: a bias linmix's block has not", bad, "Mamba-2", "in_proj.bias")
    bad = dict(w2)
    bad["backbone.layers.0.mixer.in_proj.weight"] = torch.zeros(2 * 16 + 32 + 32 + 8 + 4, 16, dtype=torch.float64)
    refused("Mamba-2: a gated MLP beside the SSM", bad, "Mamba-2", "in_proj.weight", "gated MLP")
    bad = dict(w2)
    bad["backbone.layers.0.mixer.D"] = torch.ones(32, dtype=torch.float64)
    refused("Mamba-2: D per channel", bad, "Mamba-2", "D_has_hdim")
    bad = dict(w2)
    bad["backbone.layers.0.mixer.conv1d.weight"] = torch.zeros(40, 1, 3, dtype=torch.float64)
    refused("Mamba-2: conv kernel 3", bad, "Mamba-2", "conv1d.weight", "kernel 4")
    bad = dict(w2)
    bad[p + "norm.weight"] = bad[p + "norm.weight"][:7]
    refused("Mamba-2: mis-shaped tensor", bad, "Mamba-2", "att.norm.weight")
    r = linmix("logits", "--model", save(w2, "g3.safetensors", meta={"n_groups": "3"}), "--tokens", "1", "--out",
               os.path.join(TMP, "x.safetensors"))
    check("refused: Mamba-2 groups that do not divide the heads", r.returncode == 2 and "3 groups" in r.stderr,
          r.stderr.strip())


def main():
    every_mode()
    generate_neox()
    refusals()
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
