#!/usr/bin/python3
"""The backward of every linear-time mechanism uses memory linear in T.

For each mechanism, `linmix mix --grad --mode parallel` runs at T = 4096 and T = 16384 (and a
tiny T for the process baseline); linmix reports its own peak resident set (--stats). Linear memory grows the T-dependent part 4x; a single T x T float buffer at 16384
would add 1 GiB. The test asserts growth <= 5x, and prints the figures.

Usage: memory_test.py PATH/TO/linmix
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import st  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
TMP = tempfile.mkdtemp(prefix="linmix-mem-")
rng = np.random.default_rng(0)
H, D, E, C, N, M, S = 2, 32, 32, 64, 16, 32, 32


def inputs(mixer, T):
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    att = dict(q=r(1, T, H, D), k=r(1, T, H, D), v=r(1, T, H, E))
    ch = dict(q=r(1, T, C), k=r(1, T, C), v=r(1, T, C))
    x = {
        "linear": (att, {}), "norm_linear": (att, {}), "flow": (att, {}), "block_softmax": (att, {}),
        "performer": ({**att, "proj": r(M, D)}, {}),
        "aft_simple": (ch, {}),
        "aft_conv": ({**ch, "u": r(4, 7)}, {}),
        "rwkv4": (dict(k=r(1, T, C), v=r(1, T, C), w=np.exp(r(C)), u=r(C)), {}),
        "flash": (dict(quad_q=r(1, T, S), quad_k=r(1, T, S), lin_q=r(1, T, S), lin_k=r(1, T, S), v=r(1, T, E)), {}),
        "s4d": (dict(u=r(1, T, C), log_dt=np.full(C, -3, np.float32), A_re=-np.exp(r(C, N)), A_im=r(C, N),
                     C_re=r(C, N), C_im=r(C, N), D=r(C)), {}),
        "mamba": (dict(u=r(1, T, C), delta=r(1, T, C), A=-np.exp(r(C, N)), Bm=r(1, T, N), Cm=r(1, T, N), D=r(C)), {}),
        "fnet": (dict(x=r(1, T, C)), {}),
    }[mixer]
    return x


def peak_rss_mib(mixer, T):
    tensors, params = inputs(mixer, T)
    tensors = dict(tensors)
    causal = mixer != "fnet"
    y_shape = {"flash": (1, T, E), "fnet": (1, T, C)}.get(mixer)
    if y_shape is None:
        y_shape = (1, T, H, E) if "q" in tensors and tensors["q"].ndim == 4 else (1, T, C)
    tensors["dy"] = rng.standard_normal(y_shape).astype(np.float32)
    inp, out = os.path.join(TMP, "in.safetensors"), os.path.join(TMP, "out.safetensors")
    st.save(inp, tensors)
    cmd = [LINMIX, "mix", "--mixer", mixer, "--grad", "--stats", "--in", inp, "--out", out]
    cmd += ["--causal"] if causal else []
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    # linmix reports its own VmHWM: a child's rusage would include the forking Python's pages
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr}")
    return float(r.stderr.split("peak_rss_mib=")[1].split()[0])


def main():
    passed = failed = 0
    print(f"{'mixer':14s} {'T=16':>9s} {'T=4096':>9s} {'T=16384':>9s}  growth of the T part (linear: 4x)")
    for mixer in ["linear", "performer", "norm_linear", "flow", "flash", "block_softmax", "aft_simple",
                  "aft_conv", "rwkv4", "s4d", "mamba", "fnet"]:
        base, a, b = (peak_rss_mib(mixer, T) for T in (16, 4096, 16384))
        growth = (b - base) / max(a - base, 1e-9)
        ok = growth <= 5.0
        passed += ok
        failed += not ok
        print(f"{mixer:14s} {base:8.1f}M {a:8.1f}M {b:8.1f}M  {growth:5.2f}x {'ok' if ok else 'FAIL'}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
