#!/usr/bin/python3
"""Writes the seed corpus of every fuzz harness (small valid inputs) into fuzz/corpus/<harness>/.
Deterministic; the files are committed, so this only runs again when a format changes.
Usage: fuzz/make_corpus.py PATH/TO/linmix"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import mamba2_ref  # noqa: E402
import mamba_ref  # noqa: E402
import rwkv4_ref  # noqa: E402
import rwkv_ref  # noqa: E402
import st  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
OUT = os.path.join(HERE, "corpus")


def d(name):
    p = os.path.join(OUT, name)
    os.makedirs(p, exist_ok=True)
    return p


def byte_level_chars():
    b2c, n = {}, 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            b2c[b] = chr(b)
        else:
            b2c[b] = chr(256 + n)
            n += 1
    return b2c


def rwkvx_and_mamba(d):
    """RWKV-5.1, 5.2, 6.0, 7.0 (BlinkDL names), Mamba and Mamba-2 (Hugging Face names; Mamba-2 with
    two groups), tiny."""
    for layout in ("5.1", "5.2", "6.0", "7.0"):
        w = rwkv_ref.random_rwkv(layout, 12, 8, 2, 2, seed=1, F_dim=16, loras=(2, 3) if layout == "6.0" else None)
        for h in ("checkpoint", "rwkv_import"):
            st.save(os.path.join(d(h), "rwkv" + layout), {n: t.numpy() for n, t in w.items()})
    w = mamba_ref.random_mamba(12, 8, 1, S=2, seed=1)
    for h in ("checkpoint", "rwkv_import"):
        st.save(os.path.join(d(h), "mamba_hf"), {n: t.numpy() for n, t in w.items()})
    w = mamba2_ref.random_mamba2(12, 8, 1, S=2, H=2, G=2, seed=1)
    for h in ("checkpoint", "rwkv_import"):
        st.save(os.path.join(d(h), "mamba2_hf"), {n: t.numpy() for n, t in w.items()}, metadata={"n_groups": "2"})


def main():
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp()
    # safetensors
    st.save(os.path.join(d("safetensors"), "f32"), {"x": np.arange(4, dtype=np.float32), "y": np.ones((2, 3))})
    st.save(os.path.join(d("safetensors"), "f16_meta"), {"a": np.ones(3)}, metadata={"k": "v"}, dtype="F16")
    st.save(os.path.join(d("safetensors"), "empty"), {})
    # RWKV-4 checkpoints: BlinkDL and Hugging Face names
    w = rwkv4_ref.random_rwkv4(12, 8, 2, seed=1, F_mult=2)
    for h in ("checkpoint", "rwkv_import"):
        st.save(os.path.join(d(h), "rwkv4_blink"), {n: t.numpy() for n, t in w.items()})
        st.save(os.path.join(d(h), "rwkv4_hf"), {n: t.numpy() for n, t in rwkv4_ref.to_hf(w).items()})
    rwkvx_and_mamba(d)
    # linmix checkpoints: tiny models of several layer kinds, trained one step on a synthetic task
    for name, cfg in (("linear", {"mixer": "linear"}), ("rwkv", {"mixer": "rwkv4", "channel_mix": "rwkv", "ln0": True}),
                      ("mamba", {"mixer": "mamba", "state": 2}), ("aft_conv", {"mixer": "aft_conv", "kernel": 3})):
        c = {"vocab": 16, "d_model": 8, "n_layer": 1, "n_head": 2, "ctx": 16, "ffn_mult": 2, **cfg}
        cp = os.path.join(tmp, name + ".json")
        json.dump(c, open(cp, "w"))
        run = os.path.join(tmp, name)
        subprocess.run([LINMIX, "train", "--task", "copy", "--config", cp, "--steps", "1", "--batch", "1", "--seq", "8",
                        "--out", run], check=True, capture_output=True)
        shutil.copy(os.path.join(run, "ckpt.safetensors"), os.path.join(d("checkpoint"), name))
        json.dump(c, open(os.path.join(d("model_config"), name + ".json"), "w"))
    json.dump({"d_model": 16, "n_layer": 2, "layers": [{"mixer": "block_softmax", "params": {"block": 4}},
                                                       {"mixer": "norm_linear"}]},
              open(os.path.join(d("model_config"), "layers.json"), "w"))
    # generation states of fuzz_state.cpp's model (C 8, H 2, D 4, N 2, S 4, e = Ei = 16)
    C, H, D, N, S, E = 8, 2, 4, 2, 4, 16
    L = 2
    z = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    state = {"pos": np.array([2], np.float32),
             "layer.0.state.k": z(1, L, H, D), "layer.0.state.v": z(1, L, H, D),
             "layer.1.state.num": z(1, C), "layer.1.state.den": np.abs(z(1, C)) + 1, "layer.1.state.max": z(1, C),
             "layer.1.state.k": z(1, L, C), "layer.1.state.v": z(1, L, C), "layer.1.state.pos": np.array([2], np.float32),
             "layer.2.att_prev": z(C), "layer.2.state.a": z(1, C), "layer.2.state.b": np.abs(z(1, C)) + 1,
             "layer.2.state.p": z(1, C),
             "layer.3.state.x_re": z(1, C, N), "layer.3.state.x_im": z(1, C, N),
             "layer.4.state.quad_k": z(1, L, S), "layer.4.state.lin_k": z(1, L, S), "layer.4.state.v": z(1, L, E),
             "layer.4.state.M": z(1, S, E),
             "layer.5.state.h": z(1, E, N), "layer.5.conv": z(3 * E)}
    for l in range(6):
        state[f"layer.{l}.ffn_prev"] = z(C)
    st.save(os.path.join(d("state"), "full"), state)
    st.save(os.path.join(d("state"), "zero"), {"pos": np.array([0], np.float32)})
    # tokenizer.json: every byte, a few merges, added tokens
    b2c = byte_level_chars()
    vocab = {b2c[b]: b for b in range(256)}
    merges = []
    for a, b in (("h", "e"), ("l", "l"), ("he", "ll"), ("o", ",")):
        vocab[a + b] = len(vocab)
        merges.append(f"{a} {b}")
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": merges},
           "added_tokens": [{"id": len(vocab), "content": "<|endoftext|>", "special": True}],
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
           "normalizer": {"type": "NFC"}}
    json.dump(tok, open(os.path.join(d("tokenizer_json"), "small.json"), "w"))
    tok["normalizer"] = None
    json.dump(tok, open(os.path.join(d("tokenizer_json"), "no_nfc.json"), "w"))
    # World vocabulary: every byte, a few longer tokens in both literal kinds
    lines = [f"{b + 1} b'\\x{b:02x}' 1" for b in range(256)]
    lines += ["257 'he' 2", "258 \"llo\" 3", "259 '\\u00e9t\\u00e9' 5", "260 b'\\xe2\\x80' 2"]
    open(os.path.join(d("world_vocab"), "small.txt"), "w").write("\n".join(lines) + "\n")
    shutil.rmtree(tmp)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[2] == "--imports-only":
    rwkvx_and_mamba(d)  # only the RWKV-5/6/7, Mamba and Mamba-2 seeds (added after the rest)
elif __name__ == "__main__":
    main()
