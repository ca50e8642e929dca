#!/usr/bin/python3
"""S4D's initialisations against numpy (issue 18 item 5): `linmix hippo --state N` (S4D-LegS:
HiPPO-LegS's normal part, its eigenvalues and B in its eigenbasis) against numpy.linalg.eig of
the LegS matrix built here from the HiPPO paper's formula, and the s4d layer's "init": "legs" /
"lin" parameters in a fresh checkpoint. Usage: hippo_test.py PATH/TO/linmix"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
import st  # noqa: E402

LINMIX = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build/release/linmix")
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


def legs_diagonal(N):
    """HiPPO-LegS (size 2N): A_nk = -sqrt(2n+1)sqrt(2k+1) below the diagonal, -(n+1) on it;
    B_n = sqrt(2n+1); normal part A + P P^T with P_n = sqrt(n+1/2). Its eigenvalues with positive
    imaginary part, ascending, and |V^-1 B| for them."""
    n = 2 * N
    i = np.arange(n)
    A = np.where(i[:, None] > i[None, :], -np.sqrt(np.outer(2 * i + 1, 2 * i + 1)), 0.0) - np.diag(i + 1.0)
    P = np.sqrt(i + 0.5)
    w, V = np.linalg.eig(A + np.outer(P, P))
    Bt = np.linalg.solve(V, np.sqrt(2 * i + 1.0))
    up = w.imag > 0
    order = np.argsort(w.imag[up])
    return w[up][order], np.abs(Bt[up][order])


for N in (1, 4, 32, 64):
    r = subprocess.run([LINMIX, "hippo", "--state", str(N)], capture_output=True, text=True)
    if r.returncode != 0:
        check(f"hippo --state {N}", False, r.stderr.strip())
        continue
    j = json.loads(r.stdout)
    w, bmag = legs_diagonal(N)
    err_w = np.max(np.abs(np.array(j["A_im"]) - w.imag) / np.maximum(1.0, np.abs(w.imag)))
    err_re = np.max(np.abs(w.real - j["A_re"]))
    err_b = np.max(np.abs(np.hypot(j["B_re"], j["B_im"]) - bmag) / np.maximum(1.0, bmag))
    check(f"hippo --state {N}: eigenvalues vs numpy", len(j["A_im"]) == N and err_w < 1e-9 and err_re < 1e-9,
          f"(rel err {err_w:.1e}, real parts {err_re:.1e})")
    check(f"hippo --state {N}: |V^* B| vs numpy", err_b < 1e-9, f"(rel err {err_b:.1e})")

# The layer's parameters in a fresh checkpoint (one step at lr 1e-9 moves them by ~1e-9).
C, N = 64, 16
w, bmag = legs_diagonal(N)
with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 40)
    for init in ("legs", "lin", None):
        cfg = {"d_model": C, "n_layer": 2, "n_head": 2, "ctx": 32, "state": N, "mixer": "s4d"}
        if init:
            cfg["params"] = {"init": init}
        cfg_path = os.path.join(tmp, "cfg.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        run = os.path.join(tmp, f"run-{init}")
        r = subprocess.run([LINMIX, "train", "--data", corpus, "--config", cfg_path, "--steps", "1", "--batch", "1",
                            "--seq", "16", "--lr", "1e-9", "--out", run], capture_output=True, text=True)
        if r.returncode != 0:
            check(f"s4d init {init}: train", False, r.stderr.strip())
            continue
        p = st.load(os.path.join(run, "ckpt.safetensors"))
        want_w = w.imag if init == "legs" else np.pi * np.arange(N)
        want_b = bmag if init == "legs" else np.ones(N)
        for layer in (0, 1):
            pre = f"blocks.{layer}.att."
            a_im = p[pre + "A_im"]
            a_re = -np.exp(p[pre + "log_A_re"])
            # C = C0 B with C0 ~ 0.5 (N(0,1) + i N(0,1)): E|C_n|^2 = 0.5 |B_n|^2, over C channels
            ratio = np.mean(p[pre + "C_re"] ** 2 + p[pre + "C_im"] ** 2, axis=0) / (0.5 * want_b ** 2)
            check(f"s4d init {init} layer {layer}: A = -1/2 + i w", a_im.shape == (C, N) and
                  np.max(np.abs(a_im - want_w[None, :])) < 1e-4 * max(1.0, want_w.max()) and
                  np.max(np.abs(a_re + 0.5)) < 1e-5)
            check(f"s4d init {init} layer {layer}: E|C_n|^2 = |B_n|^2 / 2", np.all(np.abs(ratio - 1) < 0.45),
                  f"(ratios {ratio.min():.2f}..{ratio.max():.2f})")
    for bad, mixer in (("legendre", "s4d"), ("legs", "mamba")):
        cfg = {"d_model": 16, "n_layer": 1, "n_head": 2, "ctx": 16, "layers": [{"mixer": mixer, "params": {"init": bad}}]}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        r = subprocess.run([LINMIX, "train", "--data", corpus, "--config", cfg_path, "--steps", "1",
                            "--out", os.path.join(tmp, "bad")], capture_output=True, text=True)
        check(f"init '{bad}' on {mixer} refused", r.returncode == 2 and "'init'" in r.stderr and
              r.stderr.count("\n") == 1, r.stderr.strip())

print(f"{len(failures)} failures" if failures else "all hippo checks passed")
sys.exit(1 if failures else 0)
