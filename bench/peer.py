#!/usr/bin/python3
"""The peers of `linmix bench`: for every mechanism, the plain-PyTorch CPU implementation a
competent user would write (float32; chunked where that helps, a token loop where the formula
is a recurrence, FFTs where it is a convolution), timed with the same shapes, thread counts and
protocol as linmix: forward, forward + backward (autograd), and the recurrent step per token.
Each peer is first checked against the independent float64 oracle (python/oracle.py).

At --beside T (default 4096, where the targets are read) the C++ kernel of the same mechanism is
timed again just before and just after its peer (`linmix bench`, one mechanism, same T and
threads), and each peer run there carries those two times as `kernel_seconds` (and the faster
one's share of the sgemm rate its own run measured, `kernel_of_sgemm`): the speed ratio is then
read from one minute of a shared, noisy machine instead of two runs far apart.

Usage: peer.py --bin build/release/linmix [--T 256,512,...] [--threads 1,2] [--mixers a,b] [--max-seconds S]
               [--beside T] --out peer.json"""
import argparse
import json
import math
import os
import subprocess
import tempfile
import sys
import time

import blas_env  # noqa: F401  (before torch: its OpenBLAS on the kernels linmix runs)
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import oracle  # noqa: E402
import st  # noqa: E402

TMP = tempfile.mkdtemp(prefix="linmix-peer-")

F = torch.nn.functional
H, D, C, M, S, N, K, CHUNK, G = 8, 64, 512, 64, 128, 16, 64, 64, 256  # linmix bench's sizes
WINDOW, BLOCK = 128, 64  # the bench_params of aft_local and block_softmax
EPS = 1e-6


# ---------------------------------------------------------------- inputs: the registry's own

def registry(binary):
    """Every mechanism's spec (`linmix mixers --json`), by name."""
    out = subprocess.run([binary, "mixers", "--json"], capture_output=True, text=True, check=True).stdout
    return {m["name"]: m for m in json.loads(out)}


def inputs(binary, spec, T, seed=1):
    """The inputs `linmix bench` times (`linmix example --scale bench`), as float32 torch."""
    path = os.path.join(TMP, "in.safetensors")
    cmd = [binary, "example", "--mixer", spec["name"], "--scale", "bench", "--T", str(T), "--seed", str(seed),
           "--out", path] + (["--causal"] if spec["causal"] else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return {n: torch.from_numpy(a) for n, a in st.load(path).items()}


# Quadratic or FFT mechanisms: no speed-up target against a chunked peer (bench/torch_ops.py,
# bench/mix_process.py time the chunked and scan ones against their targets).
NOT_CHUNKED = {"softmax", "aft_full", "aft_local", "block_softmax", "fnet"}


def kernel_runs(binary, names, T, threads, backward=True):
    """`linmix bench`'s runs per mechanism and form ("fwd", and "fwdbwd" with backward) at T and
    `threads` (the C++ kernels, measured in the caller's run): seconds, and GFLOP/s with its share
    of the sgemm rate that run measured where the mechanism has a FLOP count."""
    out = os.path.join(tempfile.mkdtemp(prefix="linmix-kern-"), "bench.json")
    subprocess.run([binary, "bench", "--mixers", ",".join(names), "--T", str(T), "--thread-counts", str(threads),
                    "--no-step", "--out", out] + ([] if backward else ["--no-backward"]), check=True, capture_output=True)
    res = {}
    for r in json.load(open(out))["runs"]:
        if r["T"] == T and r["threads"] == threads:
            res.setdefault(r["mixer"], {})[r["form"]] = r
    return res


def kernel_times(binary, names, T, threads, backward=True):
    """kernel_runs' seconds alone."""
    return {m: {f: r["seconds"] for f, r in forms.items()}
            for m, forms in kernel_runs(binary, names, T, threads, backward).items()}


# ---------------------------------------------------------------- forwards

def chunked(fq, fk, v, normalize=True, c=CHUNK, eps=EPS):
    """Causal (kernelised) linear attention in chunks of c, [B,T,H,D] layouts: within a chunk the
    masked c x c scores, across chunks the exclusive prefix of the chunk states K^T V."""
    B, T, Hh, Dk = fq.shape
    E = v.shape[-1]
    pad = (-T) % c
    if pad:
        fq, fk, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (fq, fk, v))
    n = (T + pad) // c
    Q = fq.permute(0, 2, 1, 3).reshape(B, Hh, n, c, Dk)
    Kc = fk.permute(0, 2, 1, 3).reshape(B, Hh, n, c, Dk)
    V = v.permute(0, 2, 1, 3).reshape(B, Hh, n, c, E)
    kv = Kc.transpose(-1, -2) @ V
    Sx = kv.cumsum(2) - kv
    A = (Q @ Kc.transpose(-1, -2)) * torch.tril(torch.ones(c, c))
    y = Q @ Sx + A @ V
    if normalize:
        z = Kc.sum(3)
        Z = z.cumsum(2) - z
        den = (Q * Z.unsqueeze(3)).sum(-1) + A.sum(-1)
        y = y / (den + eps).unsqueeze(-1)
    return y.reshape(B, Hh, n * c, E)[:, :, :T].permute(0, 2, 1, 3)


def f_softmax(q, k, v):
    T = q.shape[1]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return (torch.softmax(s, -1) @ vh).transpose(1, 2)


def f_linear(q, k, v):
    return chunked(F.elu(q) + 1, F.elu(k) + 1, v)


def f_norm_linear(q, k, v):
    o = chunked(F.elu(q) + 1, F.elu(k) + 1, v, normalize=False)
    return o / torch.sqrt((o * o).mean(-1, keepdim=True) + EPS)


def performer_features(x, proj, is_query):
    xs = x * D ** -0.25
    logits = xs @ proj.T - (xs * xs).sum(-1, keepdim=True) / 2
    # stabilisers that cancel in the ratio: the row max for queries, the global max for keys
    shift = logits.amax(-1, keepdim=True) if is_query else logits.amax().detach()
    return torch.exp(logits - shift) / math.sqrt(proj.shape[0])


def f_performer(q, k, v, proj):
    return chunked(performer_features(q, proj, True), performer_features(k, proj, False), v, eps=0.0)


def f_flow(q, k, v):
    Q, Kk = torch.sigmoid(q), torch.sigmoid(k)
    T = q.shape[1]
    r = torch.arange(1, T + 1, dtype=q.dtype).view(1, T, 1)
    dot = lambda a, b: (a * b).sum(-1)  # noqa: E731
    I = r / dot(Q + EPS, Kk.cumsum(1) + EPS)
    O = r / dot(Kk + EPS, Q.cumsum(1) + EPS)
    Ihat = dot(Q + EPS, (Kk * O.unsqueeze(-1)).cumsum(1) + EPS) / r
    Ohat = torch.clamp(dot(Kk + EPS, (Q * I.unsqueeze(-1)).cumsum(1) + EPS) / r, -1.0, 1.0)
    e = torch.exp(Ohat)
    comp = e / e.cumsum(1) * r
    y = chunked(Q * (I / r).unsqueeze(-1), Kk, v * comp.unsqueeze(-1), normalize=False)
    return y * torch.sigmoid(Ihat).unsqueeze(-1)


def f_block_softmax(q, k, v):
    B, T = q.shape[:2]
    n = T // BLOCK
    r = lambda x: x.reshape(B, n, BLOCK, H, D).permute(0, 1, 3, 2, 4)  # noqa: E731
    s = (r(q) @ r(k).transpose(-1, -2)) * (1.0 / math.sqrt(D))
    s = s.masked_fill(torch.triu(torch.ones(BLOCK, BLOCK, dtype=torch.bool), 1), float("-inf"))
    return (torch.softmax(s, -1) @ r(v)).permute(0, 1, 3, 2, 4).reshape(B, T, H, D)


def _aft_dense(q, k, v, bias):  # bias [T,T] with -inf above the diagonal
    ek = torch.exp(k - k.amax(1, keepdim=True))
    ew = torch.exp(bias - bias.amax())
    return torch.sigmoid(q) * (ew @ (ek * v)) / (ew @ ek)


def f_aft_full(q, k, v, w):
    T = q.shape[1]
    return _aft_dense(q, k, v, w[:T, :T].masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")))


def f_aft_local(q, k, v, w):
    T = q.shape[1]
    t = torch.arange(T)
    near = (t.view(T, 1) - t.view(1, T)).abs() < WINDOW
    b = torch.where(near, w[:T, :T], torch.zeros(()))
    return _aft_dense(q, k, v, b.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")))


def f_aft_simple(q, k, v):
    ek = torch.exp(k - k.amax(1, keepdim=True))
    return torch.sigmoid(q) * (ek * v).cumsum(1) / ek.cumsum(1)


def f_aft_conv(q, k, v, u):
    # weights e^{k_s + w_{t,s}}: w = u_h[t-s] inside the kernel, 0 outside (MIXERS.md), so the
    # sums are running sums plus a depthwise causal convolution with e^{u} - 1
    T = q.shape[1]
    ek = torch.exp(k - k.amax(1, keepdim=True))
    kern = (torch.exp(u) - 1).repeat_interleave(C // H, 0).flip(-1).unsqueeze(1)  # [C,1,K]
    conv = lambda x: F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), kern, groups=C).transpose(1, 2)  # noqa: E731
    ekv = ek * v
    return torch.sigmoid(q) * (ekv.cumsum(1) + conv(ekv)) / (ek.cumsum(1) + conv(ek))


def f_rwkv4(k, v, w, u):  # the stabilised RWKV-4 recurrence, a token loop (ChatRWKV's RNN form)
    B, T, Cc = k.shape
    aa = torch.zeros(B, Cc)
    bb = torch.zeros(B, Cc)
    pp = torch.full((B, Cc), -1e38)
    ys = []
    for kt, vt in zip(k.unbind(1), v.unbind(1)):  # (unbind: one gradient buffer, not one per k[:, t])
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = pp - w
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return torch.stack(ys, 1)


def f_flash(quad_q, quad_k, lin_q, lin_k, v):
    return oracle.flash(quad_q, quad_k, lin_q, lin_k, v, True, G)


def f_s4d(u, log_dt, A_re, A_im, C_re, C_im, D):  # noqa: N803
    return oracle.s4d(u, log_dt, A_re, A_im, C_re, C_im, D)


def f_mamba(u, delta, A, Bm, Cm, D, z=None, delta_bias=None):  # noqa: N803  selective_scan_ref: a token loop
    dt = F.softplus(delta if delta_bias is None else delta + delta_bias)
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t0 in range(0, u.shape[1], 1024):  # the discretised inputs a block of time at a time
        dA = torch.exp(dt[:, t0:t0 + 1024].unsqueeze(-1) * A)
        dBu = (dt[:, t0:t0 + 1024] * u[:, t0:t0 + 1024]).unsqueeze(-1) * Bm[:, t0:t0 + 1024].unsqueeze(2)
        # unbind, not dA[:, t]: autograd then makes one gradient buffer per block, not one per token
        for a_t, bu_t, c_t in zip(dA.unbind(1), dBu.unbind(1), Cm[:, t0:t0 + 1024].unbind(1)):
            h = a_t * h + bu_t
            ys.append((h * c_t.unsqueeze(1)).sum(-1))
    y = torch.stack(ys, 1) + D * u
    return y if z is None else y * F.silu(z)


def f_fnet(x):
    return torch.fft.fft2(x, dim=(1, 2)).real


# The decaying / delta-rule mechanisms, in the chunked PyTorch forms a user would write from the
# papers (chunks of CHUNK, the decays within a chunk taken relative to the chunk start, the
# per-chunk products batched; a loop over chunks for the state).
def gated_chunks(q, k, v, g, shift=False, c=CHUNK):
    """S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T; y_t = S_t^T q_t (shift: S_{t-1}^T q_t). [B,T,H,X]."""
    B, T, Hh, Dk = q.shape
    E = v.shape[-1]
    pad = (-T) % c
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    n = (T + pad) // c
    q, k, v, g = (x.reshape(B, n, c, Hh, -1).transpose(2, 3) for x in (q, k, v, g))  # [B,n,H,c,X]
    cs = g.cumsum(3)
    cq = cs - g if shift else cs
    qd, kd = q * torch.exp(cq), k * torch.exp(-cs)
    mask = torch.tril(torch.ones(c, c, dtype=torch.bool), -1 if shift else 0)
    A = (qd @ kd.transpose(-1, -2)).masked_fill(~mask, 0)
    y = A @ v
    kt = k * torch.exp(cs[..., -1:, :] - cs)
    S = torch.zeros(B, Hh, Dk, E)
    ys = []
    for i in range(n):
        ys.append(y[:, i] + qd[:, i] @ S)
        S = torch.exp(cs[:, i, :, -1]).unsqueeze(-1) * S + kt[:, i].transpose(-1, -2) @ v[:, i]
    out = torch.stack(ys, 1).transpose(2, 3).reshape(B, n * c, Hh, E)
    return out[:, :T]


def dplr_chunks(r, w, k, v, a, b, c=CHUNK):
    """S_t = (diag(e^{w_t}) + b_t a_t^T) S_{t-1} + k_t v_t^T, y_t = S_t^T r_t: the chunked WY form
    (U = (I - Aab)^-1 (Aak V + ad S0) by a batched triangular solve, then a loop over chunks)."""
    B, T, Hh, Dk = r.shape
    E = v.shape[-1]
    pad = (-T) % c
    if pad:
        r, w, k, v, a, b = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, w, k, v, a, b))
    n = (T + pad) // c
    r, w, k, v, a, b = (x.reshape(B, n, c, Hh, -1).transpose(2, 3) for x in (r, w, k, v, a, b))
    cs = w.cumsum(3)
    cp = cs - w
    strict = torch.tril(torch.ones(c, c, dtype=torch.bool), -1)
    incl = torch.tril(torch.ones(c, c, dtype=torch.bool))
    ad, rd = a * torch.exp(cp), r * torch.exp(cs)
    kd, bd = k * torch.exp(-cs), b * torch.exp(-cs)
    Aab = (ad @ bd.transpose(-1, -2)).masked_fill(~strict, 0)
    Aak = (ad @ kd.transpose(-1, -2)).masked_fill(~strict, 0)
    Arb = (rd @ bd.transpose(-1, -2)).masked_fill(~incl, 0)
    Ark = (rd @ kd.transpose(-1, -2)).masked_fill(~incl, 0)
    M = torch.eye(c) - Aab
    U0 = torch.linalg.solve_triangular(M, Aak @ v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(M, ad, upper=False, unitriangular=True)
    kt, bt = k * torch.exp(cs[..., -1:, :] - cs), b * torch.exp(cs[..., -1:, :] - cs)
    S = torch.zeros(B, Hh, Dk, E)
    ys = []
    for i in range(n):
        U = U0[:, i] + W[:, i] @ S
        ys.append(rd[:, i] @ S + Ark[:, i] @ v[:, i] + Arb[:, i] @ U)
        S = (torch.exp(cs[:, i, :, -1]).unsqueeze(-1) * S + kt[:, i].transpose(-1, -2) @ v[:, i]
             + bt[:, i].transpose(-1, -2) @ U)
    return torch.stack(ys, 1).transpose(2, 3).reshape(B, n * c, Hh, E)[:, :T]


def f_retention(q, k, v, gamma):
    g = torch.log(gamma).view(1, 1, -1, 1).expand_as(q)
    return gated_chunks(q / math.sqrt(q.shape[-1]), k, v, g)


def f_gla(q, k, v, g):
    return gated_chunks(q / math.sqrt(q.shape[-1]), k, v, g)


def f_rwkv56(r, k, v, w, u):
    ww = w if w.dim() == 4 else w.unsqueeze(0).unsqueeze(0).expand_as(r)
    bonus = (r * u * k).sum(-1, keepdim=True) * v
    return gated_chunks(r, k, v, ww, shift=True) + bonus


def f_mamba2(x, dt, A, Bm, Cm, D, z=None, dt_bias=None):  # noqa: N803
    Hh, rep = x.shape[2], x.shape[2] // Bm.shape[2]
    d = F.softplus(dt + dt_bias) if dt_bias is not None else F.softplus(dt)
    Bh, Ch = Bm.repeat_interleave(rep, 2), Cm.repeat_interleave(rep, 2)
    g = (d * A).unsqueeze(-1).expand_as(Bh)
    y = gated_chunks(Ch, d.unsqueeze(-1) * Bh, x, g) + D.view(1, 1, Hh, 1) * x
    return y if z is None else y * F.silu(z)


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def f_deltanet(q, k, v, beta, g=None):
    qn, kn = _l2(q) / math.sqrt(q.shape[-1]), _l2(k)
    gg = torch.zeros_like(beta) if g is None else g
    bb = beta.unsqueeze(-1)
    return dplr_chunks(qn, gg.unsqueeze(-1).expand_as(kn), bb * kn, v, kn, -torch.exp(gg).unsqueeze(-1) * bb * kn)


def f_gated_deltanet(q, k, v, beta, g):
    return f_deltanet(q, k, v, beta, g)


def f_rwkv7(r, w, k, v, a, b):
    return dplr_chunks(r, w, k, v, a, b)


FWD = {"softmax": f_softmax, "linear": f_linear, "norm_linear": f_norm_linear, "performer": f_performer,
       "flow": f_flow, "block_softmax": f_block_softmax, "aft_full": f_aft_full, "aft_local": f_aft_local,
       "aft_simple": f_aft_simple, "aft_conv": f_aft_conv, "rwkv4": f_rwkv4, "flash": f_flash, "s4d": f_s4d,
       "mamba": f_mamba, "fnet": f_fnet, "retention": f_retention, "gla": f_gla, "deltanet": f_deltanet,
       "gated_deltanet": f_gated_deltanet, "rwkv5": f_rwkv56, "rwkv6": f_rwkv56, "rwkv7": f_rwkv7, "mamba2": f_mamba2}


def reference(spec, x):  # the float64 oracle on the same inputs, with linmix bench's params
    d = {n: t.double() for n, t in x.items()}
    return oracle.ORACLES[spec["name"]](d, spec["causal"], spec["bench_params"])


# ---------------------------------------------------------------- recurrent steps (B = 1)

def make_step(name, x):
    """A closure feeding one token per call with the state carried, or None where a
    competent user would not write one (no O(1) state, or no simple form)."""
    st = {}
    if name == "softmax":
        st["k"], st["v"] = torch.zeros(1, 0, H, D), torch.zeros(1, 0, H, D)

        def step(t):
            q, k, v = x["q"][:, t:t + 1], x["k"][:, t:t + 1], x["v"][:, t:t + 1]
            st["k"], st["v"] = torch.cat([st["k"], k], 1), torch.cat([st["v"], v], 1)
            s = torch.einsum("bqhd,bkhd->bhqk", q, st["k"]) / math.sqrt(D)
            return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), st["v"])
        return step
    if name in ("linear", "norm_linear", "performer"):
        Dk = M if name == "performer" else D
        st["S"], st["z"] = torch.zeros(H, Dk, D), torch.zeros(H, Dk)

        def feats(t, which):
            if name == "performer":
                return performer_features(x[which][0, t], x["proj"], True)
            return F.elu(x[which][0, t]) + 1

        def step(t):
            fq, fk, v = feats(t, "q"), feats(t, "k"), x["v"][0, t]
            st["S"] += fk.unsqueeze(-1) * v.unsqueeze(1)
            st["z"] += fk
            o = torch.einsum("hd,hde->he", fq, st["S"])
            if name == "norm_linear":
                return o / torch.sqrt((o * o).mean(-1, keepdim=True) + EPS)
            return o / ((fq * st["z"]).sum(-1, keepdim=True) + (0.0 if name == "performer" else EPS))
        return step
    if name == "aft_simple":
        st["num"], st["den"] = torch.zeros(C), torch.zeros(C)

        def step(t):
            ek = torch.exp(x["k"][0, t])
            st["num"] += ek * x["v"][0, t]
            st["den"] += ek
            return torch.sigmoid(x["q"][0, t]) * st["num"] / st["den"]
        return step
    if name == "rwkv4":
        st["a"], st["b"], st["p"] = torch.zeros(C), torch.zeros(C), torch.full((C,), -1e38)
        w, u = x["w"], x["u"]

        def step(t):
            kt, vt = x["k"][0, t], x["v"][0, t]
            ww = u + kt
            p = torch.maximum(st["p"], ww)
            e1, e2 = torch.exp(st["p"] - p), torch.exp(ww - p)
            y = (e1 * st["a"] + e2 * vt) / (e1 * st["b"] + e2)
            ww = st["p"] - w
            p = torch.maximum(ww, kt)
            e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
            st["a"], st["b"], st["p"] = e1 * st["a"] + e2 * vt, e1 * st["b"] + e2, p
            return y
        return step
    if name == "mamba":
        st["h"] = torch.zeros(C, N)

        def step(t):
            dt = F.softplus(x["delta"][0, t] + x["delta_bias"]) if "delta_bias" in x else F.softplus(x["delta"][0, t])
            st["h"] = torch.exp(dt.unsqueeze(-1) * x["A"]) * st["h"] + (dt * x["u"][0, t]).unsqueeze(-1) * x["Bm"][0, t]
            y = st["h"] @ x["Cm"][0, t] + x["D"] * x["u"][0, t]
            return y * F.silu(x["z"][0, t]) if "z" in x else y
        return step
    if name == "s4d":
        dt = torch.exp(x["log_dt"]).unsqueeze(-1)
        A = torch.complex(x["A_re"], x["A_im"])
        dA = torch.exp(dt * A)
        Ct = torch.complex(x["C_re"], x["C_im"]) * (dA - 1) / A
        st["h"] = torch.zeros(C, N, dtype=torch.complex64)

        def step(t):
            ut = x["u"][0, t]
            st["h"] = dA * st["h"] + ut.unsqueeze(-1)
            return 2 * (Ct * st["h"]).sum(-1).real + x["D"] * ut
        return step
    if name in ("retention", "gla", "rwkv5", "rwkv6", "deltanet", "gated_deltanet", "rwkv7", "mamba2"):
        st["S"] = None

        def step(t):  # the recurrence of MIXERS.md on one token, the state carried
            one = {n: (tt[:, t:t + 1] if tt.dim() >= 3 and tt.shape[0] == 1 and n not in ("A",) else tt)
                   for n, tt in x.items()}
            if name == "mamba2":
                y, h = oracle.mamba2(*(one[n].double() for n in ("x", "dt", "A", "Bm", "Cm", "D")),
                                     z=one.get("z"), dt_bias=one.get("dt_bias"), h0=st["S"])
                st["S"] = h
                return y
            y, fin = oracle.STATE_ORACLES[name]({**one, **({"state.S": st["S"]} if st["S"] is not None else {})}, {})
            st["S"] = fin["state.S"]
            return y
        return None if name == "mamba2" else step
    return None


# ---------------------------------------------------------------- timing

def time_best(f):
    f()  # warm-up
    best, total = float("inf"), 0.0
    for r in range(5):
        t0 = time.perf_counter()
        f()
        t = time.perf_counter() - t0
        best, total = min(best, t), total + t
        if total > 1.0:
            break
    return best


def fits(name, T):
    if name == "softmax":
        return T <= 8192  # the H x T x T scores and their softmax
    if name in ("aft_full", "aft_local"):
        return T <= 8192  # the T x T bias, its exp and masks
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default=",".join(str(256 << i) for i in range(9)))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--bin", required=True, help="the linmix binary (its registry names the mechanisms)")
    ap.add_argument("--mixers", default="", help="a,b,... (default: every mechanism of the registry)")
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--step-tokens", type=int, default=256)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--beside", type=int, default=4096,
                    help="at this T, time linmix's kernel just before and after each peer (0: never)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    Ts = [int(t) for t in a.T.split(",")]
    specs = registry(os.path.abspath(a.bin))
    names = a.mixers.split(",") if a.mixers else list(specs)
    for n in names:
        if n not in specs:
            sys.exit(f"peer.py: unknown mixer '{n}'")
    # every mechanism has a peer and an oracle: a missing one fails here, by name
    missing = [n for n in names if n not in FWD or n not in oracle.ORACLES]
    if missing:
        sys.exit("peer.py: no PyTorch peer (FWD) or oracle for " + ", ".join(missing))
    rep = {"torch": torch.__version__, "blas": blas_env.describe(), "runs": [], "check": {}}
    # correctness first: each peer against the float64 oracle
    for name in names:
        x = inputs(a.bin, specs[name], 200 if name not in ("block_softmax",) else 256, seed=5)
        with torch.no_grad():
            y = FWD[name](**x).double()
            ref = reference(specs[name], x)
        err = float((y - ref).abs().max() / max(1.0, float(ref.abs().max())))
        rep["check"][name] = err
        print(f"peer {name:14s} vs float64 oracle: max rel err {err:.2e}", flush=True)
        if not err < 1e-3:
            sys.exit(f"peer.py: the {name} peer disagrees with the oracle ({err:.2e})")
    for th in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(th)
        print(f"\n== {th} thread(s), torch {torch.__version__}", flush=True)
        for name in names:
            last, prev = {}, {}
            for T in Ts:
                if not fits(name, T):
                    print(f"{name:14s} {T:6d} skipped: does not fit", flush=True)
                    continue
                x = inputs(a.bin, specs[name], T)
                quad = specs[name]["quadratic"] or name == "aft_local"  # aft_local: a T x T dense peer
                beside = T == a.beside
                if beside:  # the kernel before the peer (its own process: linmix bench)
                    kern = [kernel_runs(a.bin, [name], T, th, backward=not a.no_backward).get(name, {})]
                first = len(rep["runs"])
                for form in ("fwd", "fwdbwd"):
                    if form == "fwdbwd" and a.no_backward:
                        continue
                    grow = 4.2 if quad else 2.2
                    if form in prev and form in last:  # the growth measured over the last doubling
                        grow = max(grow, last[form] / prev[form])
                    if form in last and last[form] * grow > a.max_seconds:
                        print(f"{name:14s} {T:6d} {form:7s} skipped: predicted over {a.max_seconds:.0f} s", flush=True)
                        continue
                    if form == "fwd":
                        def run():
                            with torch.no_grad():
                                FWD[name](**x)
                    else:
                        xg = {n: t.clone().requires_grad_(n not in ("proj",)) for n, t in x.items()}
                        dy = torch.randn_like(FWD[name](**x))

                        def run():
                            for t in xg.values():
                                t.grad = None
                            FWD[name](**xg).backward(dy)
                    s = time_best(run)
                    if form in last:
                        prev[form] = last[form]
                    last[form] = s
                    rep["runs"].append({"mixer": name, "T": T, "threads": th, "form": form, "seconds": s})
                    print(f"{name:14s} {T:6d} {form:7s} {s * 1e3:11.3f} ms", flush=True)
                if beside:  # and after it: each peer run carries both kernel times
                    kern.append(kernel_runs(a.bin, [name], T, th, backward=not a.no_backward).get(name, {}))
                    for r in rep["runs"][first:]:
                        ks = [k[r["form"]] for k in kern if r["form"] in k]
                        if len(ks) == 2:
                            r["kernel_seconds"] = [k["seconds"] for k in ks]
                            best = min(ks, key=lambda k: k["seconds"])  # the faster, with its own sgemm share
                            if "of_sgemm" in best:
                                r["kernel_of_sgemm"] = best["of_sgemm"]
                            print(f"{name:14s} {T:6d} {r['form']:7s} beside: linmix {ks[0]['seconds'] * 1e3:.3f}, "
                                  f"{ks[1]['seconds'] * 1e3:.3f} ms -> {r['seconds'] / best['seconds']:.2f}x", flush=True)
                if T == Ts[0]:
                    xs = inputs(a.bin, specs[name], a.step_tokens + 8, seed=3)
                    step = make_step(name, xs)
                    if step is not None:
                        with torch.no_grad():
                            for t in range(8):
                                step(t)
                            t0 = time.perf_counter()
                            for t in range(8, 8 + a.step_tokens):
                                step(t)
                            s = (time.perf_counter() - t0) / a.step_tokens
                        rep["runs"].append({"mixer": name, "T": T, "threads": th, "form": "step", "seconds": s})
                        print(f"{name:14s} {T:6d} step    {s * 1e6:11.1f} us/token", flush=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=1)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
