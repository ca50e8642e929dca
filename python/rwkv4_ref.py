"""An independent PyTorch implementation of the RWKV-4 language model of MIXERS.md ("The
RWKV-4 language model"), token by token, in float64, with the plain (unstabilised) WKV
recurrence. Weights by BlinkDL's names."""
import numpy as np
import torch
import torch.nn.functional as F


def rwkv4_logits(w, tokens):
    """w: dict name -> float64 tensor (BlinkDL names); tokens: list of ints. Returns [T, V]."""
    L = 0
    while f"blocks.{L}.ln1.weight" in w:
        L += 1
    C = w["emb.weight"].shape[1]
    ln = lambda x, n: F.layer_norm(x, (C,), w[n + ".weight"], w[n + ".bias"], eps=1e-5)  # noqa: E731
    vec = lambda n: w[n].reshape(-1)  # noqa: E731
    att_prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    ffn_prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    num = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]  # sum_i e^{-(t-1-i)w + k_i} v_i
    den = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    out = []
    for tok in tokens:
        x = ln(w["emb.weight"][tok], "blocks.0.ln0")
        for i in range(L):
            p = f"blocks.{i}."
            xa = ln(x, p + "ln1")
            mk, mv, mr = vec(p + "att.time_mix_k"), vec(p + "att.time_mix_v"), vec(p + "att.time_mix_r")
            xk = xa * mk + att_prev[i] * (1 - mk)
            xv = xa * mv + att_prev[i] * (1 - mv)
            xr = xa * mr + att_prev[i] * (1 - mr)
            att_prev[i] = xa
            r = torch.sigmoid(w[p + "att.receptance.weight"] @ xr)
            k = w[p + "att.key.weight"] @ xk
            v = w[p + "att.value.weight"] @ xv
            decay = torch.exp(vec(p + "att.time_decay"))  # w = exp(time_decay)
            bonus = torch.exp(vec(p + "att.time_first") + k)
            wkv = (num[i] + bonus * v) / (den[i] + bonus)
            num[i] = torch.exp(-decay) * num[i] + torch.exp(k) * v
            den[i] = torch.exp(-decay) * den[i] + torch.exp(k)
            x = x + w[p + "att.output.weight"] @ (r * wkv)
            xf = ln(x, p + "ln2")
            fk, fr = vec(p + "ffn.time_mix_k"), vec(p + "ffn.time_mix_r")
            xk = xf * fk + ffn_prev[i] * (1 - fk)
            xr = xf * fr + ffn_prev[i] * (1 - fr)
            ffn_prev[i] = xf
            rr = torch.sigmoid(w[p + "ffn.receptance.weight"] @ xr)
            kk = torch.relu(w[p + "ffn.key.weight"] @ xk) ** 2
            x = x + rr * (w[p + "ffn.value.weight"] @ kk)
        out.append(w["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(out)


def random_rwkv4(V, C, L, seed=0, F_mult=4):
    """Random-weight RWKV-4 with BlinkDL names and shapes (mixes as [1,1,C])."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    w = {"emb.weight": r(V, C), "blocks.0.ln0.weight": 1 + r(C, scale=0.1), "blocks.0.ln0.bias": r(C, scale=0.1),
         "ln_out.weight": 1 + r(C, scale=0.1), "ln_out.bias": r(C, scale=0.1), "head.weight": r(V, C, scale=0.3)}
    for i in range(L):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            w[p + n + ".weight"] = 1 + r(C, scale=0.1)
            w[p + n + ".bias"] = r(C, scale=0.1)
        for n in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            w[p + n] = torch.rand(1, 1, C, generator=g, dtype=torch.float64)
        w[p + "att.time_decay"] = r(C, scale=1.0) - 1.0
        w[p + "att.time_first"] = r(C, scale=0.5)
        for n in ("key", "value", "receptance", "output"):
            w[p + f"att.{n}.weight"] = r(C, C, scale=C ** -0.5)
        w[p + "ffn.key.weight"] = r(F_mult * C, C, scale=C ** -0.5)
        w[p + "ffn.value.weight"] = r(C, F_mult * C, scale=(F_mult * C) ** -0.5)
        w[p + "ffn.receptance.weight"] = r(C, C, scale=C ** -0.5)
    return w


HF_NAMES = [  # (BlinkDL pattern, Hugging Face pattern)
    ("emb.weight", "rwkv.embeddings.weight"),
    ("blocks.0.ln0.", "rwkv.blocks.0.pre_ln."),
    ("att.time_mix_k", "attention.time_mix_key"), ("att.time_mix_v", "attention.time_mix_value"),
    ("att.time_mix_r", "attention.time_mix_receptance"), ("att.", "attention."),
    ("ffn.time_mix_k", "feed_forward.time_mix_key"), ("ffn.time_mix_r", "feed_forward.time_mix_receptance"),
    ("ffn.", "feed_forward."), ("ln_out.", "rwkv.ln_out."),
]


def to_hf(w):
    out = {}
    for n, t in w.items():
        h = n
        for a, b in HF_NAMES:
            if a in h:
                h = h.replace(a, b)
                break
        if h.startswith("blocks.") and ".ln0." not in n:
            h = "rwkv." + h
            for a, b in HF_NAMES[2:]:
                if "." + a in h:
                    h = h.replace("." + a, "." + b)
                    break
        out[h] = t
    return out


QUANTIZED = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight", "att.gate.weight",
             "ffn.key.weight", "ffn.value.weight", "ffn.receptance.weight")


def _f16(x, direction):
    """float32 values rounded to fp16 downwards (-1) or upwards (+1), back as float32."""
    a = x.numpy().astype(np.float32)
    h = a.astype(np.float16)  # to nearest
    off = (h.astype(np.float32) > a) if direction < 0 else (h.astype(np.float32) < a)
    h = np.where(off, np.nextafter(h, np.float16(-np.inf if direction < 0 else np.inf)), h)
    return torch.from_numpy(h.astype(np.float32))


def _q4(t32):
    """q4: per group of 64 along a row (the last one short), m = min rounded down to fp16,
    d = (max - m) / 15 rounded up to fp16, q = round-half-even((w - m) / d) clamped to 0..15,
    w' = d q + m (all in float32)."""
    R, C = t32.shape
    G = (C + 63) // 64
    pad = G * 64 - C
    lo = torch.nn.functional.pad(t32, (0, pad), value=float("inf")).view(R, G, 64).amin(-1)
    hi = torch.nn.functional.pad(t32, (0, pad), value=float("-inf")).view(R, G, 64).amax(-1)
    m = _f16(lo, -1)
    d = _f16((hi - m) / 15.0, +1)
    md = m.repeat_interleave(64, dim=1)[:, :C]
    dd = d.repeat_interleave(64, dim=1)[:, :C]
    q = torch.where(dd > 0, torch.clamp(torch.round((t32 - md) / torch.where(dd > 0, dd, torch.ones_like(dd))), 0, 15),
                    torch.zeros_like(t32))
    return dd * q + md


def quantize(w, dtype, names=None):
    """The weights an inference engine with `dtype` storage stands for: every block matrix and
    the head rounded (bf16: to nearest even; int8: per output row, scale = max|w| / 127,
    q = round-half-even(w / scale) clamped to +-127, w' = q * scale in float32; q4: see _q4).
    names: the suffixes of the rounded matrices (default: the RWKV blocks')."""
    out = {}
    for n, t in w.items():
        if n == "head.weight" or n.endswith(names or QUANTIZED):
            t32 = t.float()
            if dtype == "bf16":
                t32 = t32.to(torch.bfloat16).float()
            elif dtype == "q4":
                t32 = _q4(t32)
            else:
                s = t32.abs().amax(dim=1, keepdim=True) / 127.0
                s = torch.where(s > 0, s, torch.ones_like(s))
                t32 = torch.clamp(torch.round(t32 / s), -127, 127) * s
            out[n] = t32.to(t.dtype)
        else:
            out[n] = t
    return out
