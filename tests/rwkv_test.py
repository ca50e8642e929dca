#!/usr/bin/python3
"""RWKV-5/6/7 checkpoints: random-weight models of every version and v5 layout (BlinkDL names,
through a .pth and scripts/convert_rwkv.py for some, Hugging Face names for v5/v6) load into
linmix, whose logits in every mode (the training model's parallel and recurrent forms; the
engine's sequence mode in chunks of 1, 7, 100 and decode) and weight type equal an independent
float64 PyTorch implementation of docs/RWKV.md (python/rwkv_ref.py) within 1e-4 relative;
generation with the World tokenizer equals the reference's greedy text, also continued from a
saved state; rwkv.cpp's v5 eps through --gn-eps; bad files are refused by name with the version.
Usage: rwkv_test.py PATH/TO/linmix"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import rwkv4_ref  # noqa: E402  (quantize: the rounding of the engine's weight types)
import rwkv_ref  # noqa: E402
import st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checkpoint_checks  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-rwkvx-")
CONVERT = os.path.join(ROOT, "scripts", "convert_rwkv.py")
check = checkpoint_checks.Checks()
linmix = checkpoint_checks.Linmix(LINMIX, TMP)
save, logits = linmix.save, linmix.logits


def to_hf(w):
    """Hugging Face's RWKV-5/6 names (rwkv.blocks.N.attention.* / feed_forward.*)."""
    long = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance",
            "time_mix_g": "time_mix_gate"}
    out = {}
    for n, t in w.items():
        if n == "emb.weight":
            out["rwkv.embeddings.weight"] = t
        elif n.startswith("blocks.0.ln0."):
            out["rwkv.blocks.0.pre_ln." + n.split(".")[-1]] = t
        elif n.startswith("ln_out."):
            out["rwkv." + n] = t
        elif n == "head.weight":
            out[n] = t
        else:
            _, i, part, rest = n.split(".", 3)
            if part in ("ln1", "ln2"):
                out[f"rwkv.blocks.{i}.{part}.{rest}"] = t
            else:
                out[f"rwkv.blocks.{i}.{'attention' if part == 'att' else 'feed_forward'}.{long.get(rest, rest)}"] = t
    return out


# layout -> (V, C, L, H): head sizes 8, 16, 64 (one head), chunked sequence mode crosses the
# kernels' 64-token chunks and their 16-row sub-blocks
CASES = {"5.1": (61, 32, 3, 4), "5.1-faaaa": (61, 48, 2, 3), "5.2-head": (61, 32, 2, 2), "5.2-first": (61, 32, 2, 4),
         "5.2": (61, 64, 3, 1), "6.0": (61, 48, 3, 3), "7.0": (61, 64, 3, 4)}
MODES = [("parallel", []), ("recurrent", []), ("sequence", ["--chunk", "1"]), ("sequence", ["--chunk", "7"]),
         ("sequence", ["--chunk", "100"]), ("decode", [])]


def dequantize(path):
    """The matrices a `linmix convert` file holds converted, as float32, read from the layout
    src/model/packed.cpp documents: bf16 NAME (BF16); int8 NAME (I8) times NAME.scale (F32, a row's);
    q4 NAME (U8 [RB, G, 512], tiles of 16 rows by a group of 64: row n of a tile, value k of its
    group in byte 64 ((k % 32) / 4) + 4 n + k % 4, the low nibble for k < 32, the high one else)
    with NAME.q4_d and NAME.q4_m (F16 [RB, G, 16], the tile's rows'): w = d q + m."""
    h, t = st.header(path), st.load(path)
    kind = h["__metadata__"]["linmix_packed"]
    out = {}
    for n, e in h.items():
        if n == "__metadata__" or e["dtype"] not in ("BF16", "I8", "U8"):
            continue
        if kind == "bf16":
            out[n] = t[n]
        elif kind == "int8":
            out[n] = t[n].astype(np.float32) * t[n + ".scale"][:, None]
        else:
            b = t[n].reshape(t[n].shape[0], t[n].shape[1], 8, 16, 4)  # [RB, G, line i, row n, k % 4]
            q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float32)  # [RB, G, 16 (k // 4), 16, 4]
            q = q.transpose(0, 3, 1, 2, 4)  # [RB, row, G, k // 4, k % 4]
            d = t[n + ".q4_d"].astype(np.float32).transpose(0, 2, 1)[..., None, None]  # [RB, row, G, 1, 1]
            m = t[n + ".q4_m"].astype(np.float32).transpose(0, 2, 1)[..., None, None]
            RB, G = q.shape[0], q.shape[2]
            out[n] = (d * q + m).reshape(RB * 16, G * 64)  # padded rows and columns past the matrix
    return out


def every_mode():
    tokens = [int(x) for x in np.random.default_rng(1).integers(0, 61, 150)]
    for layout, (V, C, L, H) in CASES.items():
        w = rwkv_ref.random_rwkv(layout, V, C, L, H, seed=11, v7_layer0_v=True)  # v7 layer 0 v0/v1/v2: ignored
        ref = rwkv_ref.forward(w, tokens)[0].numpy()
        scale = max(1.0, float(np.abs(ref).max()))
        if layout in ("5.1", "6.0", "7.0"):  # through a .pth and the converter
            pth, path = os.path.join(TMP, "m.pth"), os.path.join(TMP, layout + ".safetensors")
            torch.save({n: t.float() for n, t in w.items()}, pth)
            r = subprocess.run([sys.executable, CONVERT, pth, path], capture_output=True, text=True)
            check(f"{layout}: convert_rwkv.py", r.returncode == 0 and f"RWKV-{layout}" in r.stdout, r.stderr.strip())
        else:
            path = save(w, layout + ".safetensors")
        for mode, extra in MODES:
            got, err = logits(path, tokens, mode, extra)
            name = f"{layout} (C={C}, H={H}): {mode} {' '.join(extra)}"
            if got is None:
                check(name, False, err)
                continue
            e = float(np.abs(got - ref).max()) / scale
            check(f"{name}: logits vs PyTorch float64", e <= 1e-4, f"max rel err {e:.2e}")
        for dt in ("bf16", "int8", "q4"):  # against the reference on the weights rounded the same way
            refq = rwkv_ref.forward(rwkv4_ref.quantize(w, dt), tokens)[0].numpy()
            for mode, extra in (("sequence", ["--chunk", "7"]), ("decode", [])):
                got, err = logits(path, tokens, mode, [*extra, "--dtype", dt])
                name = f"{layout}: {dt} weights, {mode} {' '.join(extra)}"
                if got is None:
                    check(name, False, err)
                    continue
                e = float(np.abs(got - refq).max()) / scale
                far = float(np.abs(refq - ref).max()) / scale
                check(f"{name}: logits vs PyTorch float64 of the {dt}-rounded weights", e <= checkpoint_checks.tolerance(dt, mode),
                      f"max rel err {e:.2e} (rounding itself moves them {far:.2e})")
            # linmix convert: the file holds exactly those rounded weights (read here from the
            # documented layout), and runs without --dtype
            conv = os.path.join(TMP, f"conv.{dt}.safetensors")
            r = subprocess.run([LINMIX, "convert", path, "--dtype", dt, "--out", conv, "--force"], capture_output=True, text=True)
            check(f"{layout}: linmix convert --dtype {dt}", r.returncode == 0, r.stderr.strip())
            if r.returncode == 0:
                held = dequantize(conv)
                want = {n: t.float().numpy() for n, t in rwkv4_ref.quantize(w, dt).items() if n in held}
                ok = len(held) > 0 and sorted(held) == sorted(n for n in w if n == "head.weight" or n.endswith(rwkv4_ref.QUANTIZED))
                diff = max(float(np.abs(held[n][:want[n].shape[0], :want[n].shape[1]] - want[n]).max()) for n in held) if ok else 1.0
                check(f"{layout}: the {dt} file's matrices (read by st.py) are the {dt}-rounded weights", ok and diff <= 1e-6,
                      f"{len(held)} matrices, max abs diff {diff:.1e}")
                got, err = logits(conv, tokens, "decode", [])
                e = float(np.abs(got - refq).max()) / scale if got is not None else 1.0
                check(f"{layout}: the {dt} file, decode: logits vs PyTorch float64 of the {dt}-rounded weights",
                      e <= checkpoint_checks.tolerance(dt, "decode"),
                      err or f"max rel err {e:.2e}")
        if layout in ("5.2", "6.0"):  # Hugging Face names
            got, err = logits(save(to_hf(w), "hf.safetensors"), tokens[:40], "sequence", ["--chunk", "16"])
            e = float(np.abs(got - ref[:40]).max()) / scale if got is not None else 1.0
            check(f"{layout}: Hugging Face names (rwkv.blocks.N.attention.*)", e <= 1e-4, err or f"max rel err {e:.2e}")


def gn_eps():
    """rwkv.cpp's v5 group-norm eps 1e-5, recorded by convert_rwkv.py --gn-eps: the logits move
    from the 64e-5 default's and equal the reference's with that eps."""
    w = rwkv_ref.random_rwkv("5.2", 61, 32, 2, 4, seed=5)
    for t in [n for n in w if n.endswith("att.output.weight") or n.endswith("att.value.weight")]:
        w[t] = w[t] * 0.05  # small WKV outputs: the eps matters (as in small trained v5 models)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    pth, path = os.path.join(TMP, "e.pth"), os.path.join(TMP, "eps.safetensors")
    torch.save({n: t.float() for n, t in w.items()}, pth)
    r = subprocess.run([sys.executable, CONVERT, pth, path, "--gn-eps", "1e-5"], capture_output=True, text=True)
    check("convert_rwkv.py --gn-eps 1e-5", r.returncode == 0, r.stderr.strip())
    ref, ref64 = rwkv_ref.forward(w, tokens, gn_eps=1e-5)[0].numpy(), rwkv_ref.forward(w, tokens)[0].numpy()
    scale = float(np.abs(ref).max())
    for mode in ("parallel", "decode"):
        got, err = logits(path, tokens, mode)
        e = float(np.abs(got - ref).max()) / scale if got is not None else 1.0
        check(f"gn_eps 1e-5, {mode}: logits vs PyTorch float64 with eps 1e-5", e <= 1e-4,
              err or f"max rel err {e:.2e} (the eps moves them {float(np.abs(ref - ref64).max()) / scale:.2e})")
    r = subprocess.run([sys.executable, CONVERT, pth, path, "--gn-eps", "-3"], capture_output=True, text=True)
    check("convert_rwkv.py --gn-eps -3 refused", r.returncode == 2 and "gn-eps" in r.stderr, r.stderr.strip())


def generate_world():
    """A random RWKV-7 and RWKV-6 with the World vocabulary (V = 65536) generate greedily through
    linmix's World tokenizer; the text equals greedy decoding of the float64 reference with the
    Python tokenizer (python/world_tokenizer.py); a state saved after one prompt and loaded with
    the next continues as the reference run over both."""
    vocab = os.path.join(ROOT, "data", "rwkv_vocab_v20230424.txt")
    import world_tokenizer
    tok = world_tokenizer.World(vocab)
    for layout in ("7.0", "6.0"):
        w = rwkv_ref.random_rwkv(layout, 65536, 32, 2, 2, seed=9)
        path = save(w, "world.safetensors")
        prompt, n = "The quick brown fox", 10
        ids = tok.encode(prompt.encode())
        want = list(ids) + rwkv_ref.greedy(w, ids, n)
        r = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", vocab, "--prompt", prompt, "--tokens",
                            str(n), "--temperature", "0"], capture_output=True)
        check(f"{layout}: generate with the World tokenizer equals the reference's greedy text",
              r.returncode == 0 and r.stdout.rstrip(b"\n") == tok.decode(want),
              repr(r.stdout[:80]) + " vs " + repr(tok.decode(want)[:80]) + r.stderr.decode()[-200:])
        # --state-out after a prompt, --state-in with the next one
        sp = os.path.join(TMP, "state.safetensors")
        r1 = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", vocab, "--prompt", "Once upon",
                             "--tokens", "0", "--state-out", sp], capture_output=True)
        r2 = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", vocab, "--prompt", " a time",
                             "--tokens", str(n), "--temperature", "0", "--state-in", sp], capture_output=True)
        both = tok.encode(b"Once upon") + tok.encode(b" a time")
        want2 = b" a time" + tok.decode(rwkv_ref.greedy(w, both, n))
        check(f"{layout}: --state-out then --state-in continues as the reference over both prompts",
              r1.returncode == 0 and r2.returncode == 0 and r2.stdout.rstrip(b"\n") == want2,
              repr(r2.stdout[:80]) + " vs " + repr(want2[:80]) + (r1.stderr + r2.stderr).decode()[-200:])
        # a state whose saved config predates the "norm" / "ffn_dim" fields is the same config
        import json
        import struct
        with open(sp, "rb") as f:
            (hn,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(hn))["__metadata__"]
        cfg = json.loads(meta["config"])
        cfg.pop("norm"), cfg.pop("ffn_dim")
        cfg["ffn_mult"] = 4  # (v7's F = 4C: the old field alone said it)
        meta["config"] = json.dumps(cfg)
        old = os.path.join(TMP, "old_state.safetensors")
        st.save(old, st.load(sp), metadata=meta)
        r3 = subprocess.run([LINMIX, "generate", "--model", path, "--tokenizer", vocab, "--prompt", " a time",
                             "--tokens", str(n), "--temperature", "0", "--state-in", old], capture_output=True)
        if layout == "7.0":
            check(f"{layout}: a state saved before the config's norm / ffn_dim fields loads",
                  r3.returncode == 0 and r3.stdout.rstrip(b"\n") == want2, r3.stderr.decode()[-200:])


def refusals():
    def refused(name, w, *needles):
        r = linmix("logits", "--model", save(w, "bad.safetensors"), "--tokens", "1", "--out",
                   os.path.join(TMP, "x.safetensors"))
        check(f"refused: {name}", r.returncode == 2 and all(s in r.stderr for s in needles) and r.stderr.count("\n") == 1,
              r.stderr.strip())

    for layout in ("5.2", "6.0", "7.0"):
        w = rwkv_ref.random_rwkv(layout, 17, 16, 2, 2, seed=1)
        ver = rwkv_ref.version(w)
        bad = dict(w)
        del bad["blocks.1.att.receptance.weight"]
        refused(f"{layout} missing tensor", bad, "RWKV-" + ver, "blocks.1.att.receptance.weight")
        bad = dict(w)
        bad["blocks.1.att.junk"] = torch.zeros(3)
        refused(f"{layout} extra tensor", bad, "RWKV-" + ver, "blocks.1.att.junk")
        bad = dict(w)
        bad["blocks.0.att.key.weight"] = bad["blocks.0.att.key.weight"][:, :5]
        refused(f"{layout} mis-shaped tensor", bad, "RWKV-" + ver, "blocks.0.att.key.weight")
    w = rwkv_ref.random_rwkv("6.0", 17, 16, 1, 2, seed=1)
    w["blocks.0.att.time_faaaa"] = torch.zeros(3, 5, dtype=torch.float64)
    refused("heads that do not divide C", w, "RWKV-6.0", "heads")
    w = rwkv_ref.random_rwkv("7.0", 17, 16, 1, 2, seed=1)
    w["blocks.0.att.r_k"] = w["blocks.0.att.r_k"].reshape(-1)
    refused("v7 r_k not [H,N]", w, "RWKV-7.0", "r_k")
    w = rwkv_ref.random_rwkv("5.2", 17, 16, 1, 2, seed=1)
    w["blocks.0.att.time_first"] = w["blocks.0.att.time_faaaa"]
    refused("two bonus tensors", w, "RWKV-5.2", "time_first")
    w = rwkv_ref.random_rwkv("7.0", 17, 16, 1, 2, seed=1)
    w["blocks.0.att.time_state"] = torch.zeros(2, 8, 8, dtype=torch.float64)
    refused("state-tuned v7 (att.time_state)", w, "RWKV-7.0", "time_state")
    w = rwkv_ref.random_rwkv("7.0", 17, 16, 1, 2, seed=1)
    w["blocks.0.att.w0"][0, 0, 0] = float("nan")
    refused("a NaN weight", w, "blocks.0.att.w0")


def train_and_finetune():
    """linmix train --mixer rwkv7 writes a model the engine runs (its decode equals the training
    model's parallel form); train --init fine-tunes a BlinkDL v6 checkpoint (its loss falls)."""
    corpus = os.path.join(TMP, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 300)
    run = os.path.join(TMP, "train7")
    r = linmix("train", "--mixer", "rwkv7", "--data", corpus, "--steps", "3", "--batch", "2", "--seq", "32",
               "--out", run)
    ck = os.path.join(run, "ckpt.safetensors")
    toks = [116, 104, 101, 32, 113, 117, 105, 99, 107] * 3
    a, ea = logits(ck, toks, "decode") if r.returncode == 0 else (None, r.stderr)
    b, eb = logits(ck, toks, "parallel") if r.returncode == 0 else (None, r.stderr)
    e = float(np.abs(a - b).max() / np.abs(b).max()) if a is not None and b is not None else 1.0
    check("train --mixer rwkv7: the engine's decode equals the model's parallel form", e <= 1e-4,
          (ea or eb or f"max rel err {e:.2e}").strip()[-300:])
    w = rwkv_ref.random_rwkv("6.0", 256, 32, 2, 2, seed=4)
    run = os.path.join(TMP, "finetune")
    r = linmix("train", "--init", save(w, "v6.safetensors"), "--data", corpus, "--steps", "30", "--batch", "4",
               "--seq", "32", "--lr", "3e-3", "--warmup", "3", "--eval-every", "30", "--out", run)
    import json
    with open(os.path.join(run, "log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    check("train --init a BlinkDL v6 checkpoint: fine-tunes (the loss falls)",
          r.returncode == 0 and len(losses) >= 10 and losses[-1] < 0.8 * losses[0],
          (r.stderr.strip()[-200:] + f" losses {losses[:1]} .. {losses[-1:]}"))
    r = linmix("train", "--init", os.path.join(TMP, "v6.safetensors"), "--mixer", "gla", "--data", corpus,
               "--out", os.path.join(TMP, "x"))
    check("train --init with --mixer refused", r.returncode == 2 and "--init" in r.stderr, r.stderr.strip())


def main():
    train_and_finetune()
    every_mode()
    gn_eps()
    generate_world()
    refusals()
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
