#!/usr/bin/python3
"""RWKV-4 checkpoints: random-weight models in BlinkDL names (through a .pth and
scripts/convert_rwkv.py) and in Hugging Face names load into linmix, whose logits in both
modes equal an independent float64 PyTorch RWKV-4 (python/rwkv4_ref.py) within 1e-4
relative; bad files are refused.  Usage: rwkv4_test.py PATH/TO/linmix"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import rwkv4_ref  # noqa: E402
import st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_checks  # noqa: E402  (tolerance: the engine's rounded types against the reference)

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-rwkv-")
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def linmix(*args):
    return subprocess.run([LINMIX, *args], capture_output=True, text=True)


def main():
    V, C, L = 53, 24, 3
    w = rwkv4_ref.random_rwkv4(V, C, L, seed=7)
    tokens = [int(x) for x in np.random.default_rng(1).integers(0, V, 150)]
    ref = rwkv4_ref.rwkv4_logits(w, tokens).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    # BlinkDL names: .pth -> convert_rwkv.py -> safetensors
    pth, blink = os.path.join(TMP, "m.pth"), os.path.join(TMP, "blink.safetensors")
    torch.save({n: t.float() for n, t in w.items()}, pth)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_rwkv.py"), pth, blink],
                       capture_output=True, text=True)
    check("convert_rwkv.py", r.returncode == 0, r.stderr.strip())
    hf = os.path.join(TMP, "hf.safetensors")
    st.save(hf, {n: t.numpy() for n, t in rwkv4_ref.to_hf(w).items()})
    # the training model's two forms, and the inference engine: sequence mode in chunks of
    # 1, 7, 64 (the state carried between calls) and decode (one token per call)
    modes = [("parallel", []), ("recurrent", []), ("sequence", ["--chunk", "1"]), ("sequence", ["--chunk", "7"]),
             ("sequence", ["--chunk", "64"]), ("decode", [])]
    for label, path in (("BlinkDL", blink), ("Hugging Face", hf)):
        for mode, extra in modes:
            out = os.path.join(TMP, "logits.safetensors")
            r = linmix("logits", "--model", path, "--tokens", ",".join(map(str, tokens)), "--mode", mode, *extra,
                       "--out", out)
            name = f"{label} names, {mode} mode {' '.join(extra)}"
            if r.returncode != 0:
                check(name, False, r.stderr.strip())
                continue
            got = st.load(out)["logits"]
            err = float(np.abs(got - ref).max()) / scale
            check(f"{name}: logits vs PyTorch float64", err <= 1e-4, f"max rel err {err:.2e}")
    # BF16 / INT8 / Q4 weights: the engine equals the float64 reference run on weights rounded the
    # same way here (bf16: round to nearest even; int8: per-row scale max|w|/127, round half even;
    # q4: groups of 32 with an fp16 step and offset)
    for dt in ("bf16", "int8", "q4"):
        wq = rwkv4_ref.quantize(w, dt)
        refq = rwkv4_ref.rwkv4_logits(wq, tokens).numpy()
        for mode, extra in (("sequence", ["--chunk", "7"]), ("decode", [])):
            out = os.path.join(TMP, "logits.safetensors")
            r = linmix("logits", "--model", blink, "--tokens", ",".join(map(str, tokens)), "--mode", mode, *extra,
                       "--dtype", dt, "--out", out)
            name = f"{dt} weights, {mode} mode {' '.join(extra)}"
            if r.returncode != 0:
                check(name, False, r.stderr.strip())
                continue
            got = st.load(out)["logits"]
            err = float(np.abs(got - refq).max()) / scale
            far = float(np.abs(refq - ref).max()) / scale
            check(f"{name}: logits vs PyTorch float64 of the {dt}-rounded weights", err <= checkpoint_checks.tolerance(dt, mode),
                  f"max rel err {err:.2e} (rounding itself moves them {far:.2e})")
    r = linmix("logits", "--model", blink, "--tokens", "1,2", "--mode", "decode", "--dtype", "fp8",
               "--out", os.path.join(TMP, "x.safetensors"))
    check("unknown --dtype refused", r.returncode == 2 and "fp8" in r.stderr, r.stderr.strip())
    # bad files: a missing tensor, a mis-shaped tensor, a truncated .pth
    bad = dict(w)
    del bad["blocks.1.att.key.weight"]
    p = os.path.join(TMP, "bad.safetensors")
    st.save(p, {n: t.numpy() for n, t in bad.items()})
    r = linmix("logits", "--model", p, "--tokens", "1", "--out", os.path.join(TMP, "x.safetensors"))
    check("missing tensor refused", r.returncode == 2 and "blocks.1.att.key.weight" in r.stderr, r.stderr.strip())
    bad = dict(w)
    bad["blocks.0.ffn.value.weight"] = bad["blocks.0.ffn.value.weight"][:, :5]
    st.save(p, {n: t.numpy() for n, t in bad.items()})
    r = linmix("logits", "--model", p, "--tokens", "1", "--out", os.path.join(TMP, "x.safetensors"))
    check("mis-shaped tensor refused", r.returncode == 2 and "blocks.0.ffn.value.weight" in r.stderr, r.stderr.strip())
    with open(pth, "rb") as f:
        head = f.read(1000)
    with open(pth + ".cut", "wb") as f:
        f.write(head)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_rwkv.py"), pth + ".cut", p],
                       capture_output=True, text=True)
    check("truncated .pth refused by the converter", r.returncode == 2 and "cannot load" in r.stderr, r.stderr.strip())
    generate_with_bpe()
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def generate_with_bpe():
    """End to end with the real GPT-NeoX tokenizer: a random RWKV-4 with the Pile vocabulary
    (V = 50277) generates greedily; the text equals greedy decoding of the float64 reference
    with the Python BPE (python/bpe_tokenizer.py), for f32 weights, and for int8 weights against
    the reference run on the int8-rounded weights."""
    tok_path = os.path.join(ROOT, "data", "20B_tokenizer.json")
    if not os.path.exists(tok_path):
        check("generate with 20B_tokenizer.json", False, "(data/ is missing from the checkout)")
        return
    import bpe_tokenizer
    bpe = bpe_tokenizer.Bpe(tok_path)
    w = rwkv4_ref.random_rwkv4(50277, 16, 2, seed=3)
    path = os.path.join(TMP, "pile.safetensors")
    st.save(path, {n: t.float().numpy() for n, t in w.items()})
    prompt, n = "The quick brown fox", 12
    for dt, wref in (("f32", w), ("int8", rwkv4_ref.quantize(w, "int8"))):
        ids = bpe.encode(prompt)
        for _ in range(n):
            ids.append(int(rwkv4_ref.rwkv4_logits(wref, ids)[-1].argmax()))
        want = bpe.decode(ids)
        r = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", tok_path, "--prompt", prompt,
                            "--tokens", str(n), "--temperature", "0", "--dtype", dt], capture_output=True)
        got = r.stdout.rstrip(b"\n")
        check(f"generate --tokenizer 20B_tokenizer.json --dtype {dt}: greedy text equals the reference's",
              r.returncode == 0 and got == want, repr(got[:80]) + (" vs " + repr(want[:80]) if got != want else ""))


if __name__ == "__main__":
    sys.exit(main())
