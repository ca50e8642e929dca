#!/usr/bin/python3
"""The whole model's gradient: the language model for every causal token mixer of the registry
and the encoder classifier for every non-causal one (`linmix mixers --json`; one missing from
python/model_ref.py fails by name), plus the cls pooling and the causal classifier: `linmix grad`
(the hand-written backward, float32) against torch.autograd of an independent float64 PyTorch
implementation of the model (python/model_ref.py). Per parameter tensor, relative RMS error
<= 1e-3 (MIXERS.md's gradient tolerance) against its own RMS; the losses agree to 1e-5.  Usage: model_grad_test.py PATH/TO/linmix"""
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import model_ref  # noqa: E402
import st  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-mgrad-")
passed = failed = 0

SPECS = json.loads(subprocess.run([LINMIX, "mixers", "--json"], capture_output=True, text=True, check=True).stdout)
# every causal mechanism as a layer with the MLP channel mix, with its small-size params (several
# blocks / groups / windows in T = 11), and the RWKV channel mix with three of them
CASES = [(s["name"], "mlp", {**s["example_params"], **s["small_params"]}) for s in SPECS if s["causal"]]
CASES += [("softmax", "rwkv", {"window": 5}), ("aft_conv", "rwkv", {}), ("rwkv4", "rwkv", {})]
# the RWKV-5/6/7 blocks as BlinkDL's (their channel mixes; the gateless v5.1 layout; small LoRAs);
# Mamba and Mamba-2 as their published models (no channel mix; Mamba-2 with one and two groups)
CASES += [("rwkv5", "rwkv", {}), ("rwkv5", "rwkv", {"gate": 0}), ("rwkv6", "rwkv6", {"d_mix": 4, "d_decay": 6}),
          ("rwkv7", "rwkv7", {"d_w": 4, "d_a": 5, "d_v": 6, "d_g": 7}), ("mamba", "none", {"dt_rank": 3}),
          ("mamba2", "none", {}), ("mamba2", "none", {"groups": 2})]
# the encoder classifier (2 classes, non-causal, mean pooling) around every non-causal mechanism;
# the cls pooling; the causal classifier around causal-only mechanisms
ENC = {"causal": False, "classes": 2}  # one training step on the order task (2 classes) makes the checkpoint
CASES += [(s["name"], "mlp", {**s["example_params"], **s["small_params"]}, ENC) for s in SPECS if s["noncausal"]]
CASES += [("softmax", "mlp", {}, {**ENC, "pool": "cls"}), ("fnet", "mlp", {}, {**ENC, "pool": "cls"}),
          ("aft_full", "mlp", {}, {**ENC, "pool": "cls"}), ("rwkv4", "rwkv", {}, {"causal": True, "classes": 2}),
          ("mamba2", "none", {}, {"causal": True, "classes": 2, "pool": "cls"})]
# one stack of every layer kind, knobs per layer (test_model.cpp's mixed model)
MIXED = [{"mixer": "softmax", "params": {"window": 4}}, {"mixer": "rwkv4"},
         {"mixer": "mamba", "params": {"state": 3, "expand": 1}}, {"mixer": "aft_conv", "params": {"kernel": 2}},
         {"mixer": "flash", "params": {"group": 4, "qk_dim": 4}}, {"mixer": "s4d", "params": {"state": 2}},
         {"mixer": "performer", "params": {"features": 5}}]
CASES += [("mixed", "rwkv", {}), ("mixed", "mlp", {})]
CASES = [c if len(c) == 4 else (*c, {}) for c in CASES]
if os.environ.get("LINMIX_ONLY"):  # a comma-separated list of mixers to check (debugging)
    CASES = [c for c in CASES if c[0] in os.environ["LINMIX_ONLY"].split(",")]


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def main():
    corpus = os.path.join(TMP, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 200)
    rng = np.random.default_rng(int(os.environ.get("LINMIX_SEED", "3")))
    B, T = 2, 11
    inputs = rng.integers(0, 64, (B, T))
    targets = rng.integers(0, 64, (B, T))
    targets[0, 4] = -1
    lengths = np.array([T, 7])  # the classifier's second sequence: 7 tokens and padding
    labels = np.array([1, 0])
    for mixer, cm, params, head in CASES:
        name = f"{mixer}/{cm}{'' if not params else ' ' + json.dumps(params)}{'' if not head else ' ' + json.dumps(head)}"
        if mixer not in model_ref.LAYERS and mixer != "mixed":
            check(name, False, "no layer in python/model_ref.py LAYERS (every causal mechanism needs one)")
            continue
        cfg = {"vocab": 128, "d_model": 16, "n_layer": 2, "n_head": 2, "ctx": 16, "features": 8, "kernel": 3,
               "ffn_mult": 2, "state": 4, "qk_dim": 8, "mixer": mixer, "channel_mix": cm, "params": params,
               "ln0": mixer in ("rwkv4", "rwkv5", "rwkv6", "rwkv7"), **head}
        if mixer == "mixed":
            del cfg["mixer"], cfg["params"]
            cfg["layers"], cfg["n_layer"] = MIXED, len(MIXED)
        if cm == "none":  # Mamba as Hugging Face's: RMSNorm, no channel mix
            cfg["norm"] = "rmsnorm"
        run = os.path.join(TMP, f"{mixer}-{cm}-{len(os.listdir(TMP))}")
        cfg_path = os.path.join(TMP, "cfg.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        data = ["--task", "order", "--seq", "12"] if head else ["--data", corpus, "--seq", "8"]
        r = subprocess.run([LINMIX, "train", *data, "--config", cfg_path, "--steps", "1", "--batch", "2",
                            "--out", run], capture_output=True, text=True)
        if r.returncode != 0:
            check(name, False, r.stderr.strip())
            continue
        ck = os.path.join(run, "ckpt.safetensors")
        meta = header(ck)["__metadata__"]
        w = st.load(ck)
        model_ref.alive_weights(w)
        big = os.path.join(run, "big.safetensors")
        st.save(big, {n: t for n, t in w.items() if not n.startswith("opt.")}, metadata=meta)
        out = os.path.join(run, "grads.safetensors")
        csv = lambda a: ",".join(map(str, a.ravel()))  # noqa: E731
        what = ["--labels", csv(labels), "--lengths", csv(lengths)] if head else \
            ["--targets", csv(targets)]
        r = subprocess.run([LINMIX, "grad", "--model", big, "--tokens", csv(inputs), *what, "--batch", str(B),
                            "--out", out], capture_output=True, text=True)
        if r.returncode != 0:
            check(name, False, r.stderr.strip())
            continue
        got = st.load(out)
        got_loss = float(header(out)["__metadata__"]["loss"])
        p = {n: torch.tensor(t.astype(np.float64), requires_grad=not n.endswith("att.proj"))
             for n, t in w.items() if not n.startswith("opt.")}
        config = json.loads(meta["config"])
        if head:
            loss = model_ref.classify_loss(config, p, torch.tensor(inputs), torch.tensor(lengths),
                                           torch.tensor(labels))
        else:
            loss = model_ref.loss(config, p, torch.tensor(inputs), torch.tensor(targets))
        loss.backward()
        check(f"{name}: loss", abs(got_loss - loss.item()) <= 1e-5 * max(1, abs(loss.item())),
              f"{got_loss:.7f} vs {loss.item():.7f}")
        want = {n: t.grad.numpy() for n, t in p.items() if t.requires_grad}
        # each tensor against its own RMS (a floor of 1e-7 of the largest only for exact zeros)
        floor = 1e-7 * max(float(np.sqrt(np.mean(v ** 2))) for v in want.values())
        worst, worst_name = 0.0, ""
        for n, v in want.items():
            gv = got.get("d" + n)
            if gv is None:
                check(f"{name}: d{n}", False, "missing")
                continue
            err = float(np.sqrt(np.mean((gv.astype(np.float64) - v) ** 2)))
            rel = err / max(float(np.sqrt(np.mean(v ** 2))), floor, 1e-30)
            if rel > worst:
                worst, worst_name = rel, n
        check(f"{name}: every parameter gradient vs torch.autograd (float64)", worst <= 1e-3,
              f"worst rel-rms {worst:.2e} ({worst_name})")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
