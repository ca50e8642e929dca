"""An independent PyTorch implementation of the RWKV-5 (5.1, 5.2), RWKV-6 (6.0) and RWKV-7 (7.0)
language models, written from docs/RWKV.md (the project's copy of the specification), token by
token in float64 with the literal recurrences. Weights by BlinkDL's names; everything (V, C, L,
H, N, F, LoRA widths) is read from the shapes. Also makes random-weight checkpoints of every
version and v5 layout in BlinkDL's names and shapes, with values where the computation is alive
(decays spread over (0.3, 0.999), LoRAs that move the mixes and decays)."""
import math

import torch
import torch.nn.functional as F

D64 = torch.float64


def version(w):
    """RWKV.md's rule (rwkv.cpp's converter): the first tensor present decides."""
    if "blocks.0.att.k_k" in w:
        return "7.0"
    if "blocks.0.att.time_maa_x" in w:
        return "6.0"
    if "blocks.0.att.gate.weight" in w and "blocks.0.att.ln_x.weight" in w:
        return "5.2"
    if "blocks.0.att.ln_x.weight" in w:
        return "5.1"
    return "4"


def dims(w):
    ver = version(w)
    V, C = w["emb.weight"].shape
    L = 0
    while f"blocks.{L}.ln1.weight" in w:
        L += 1
    if ver.startswith("5"):
        H = w["blocks.0.att.time_decay"].shape[0]
    elif ver == "6.0":
        H = w["blocks.0.att.time_faaaa"].shape[0]
    else:
        H = w["blocks.0.att.r_k"].shape[0]
    return ver, V, C, L, H, C // H, w["blocks.0.ffn.key.weight"].shape[0]


def zero_state(w):
    _, _, C, L, H, N, _ = dims(w)
    return [{"att_x": torch.zeros(C, dtype=D64), "ffn_x": torch.zeros(C, dtype=D64),
             "S": torch.zeros(H, N, N, dtype=D64)} for _ in range(L)]


def time_mix(ver, P, u, s, v_first, H, gn_eps):
    """One layer's time mix on a token u [..., C] (leading batch dims allowed). P(name) gives the
    layer's tensor "att.*" (None when absent); s holds att_x [..., C] and S [..., H, N, N] and is
    updated. Returns (the output [..., C], v_first)."""
    C = u.shape[-1]
    N = C // H
    lead = u.shape[:-1]
    vec = lambda n: P(n).reshape(-1)  # noqa: E731
    hn = lambda t: t.reshape(*lead, H, N)  # noqa: E731
    mv = lambda W, x: x @ W.T  # noqa: E731  (a Linear: W x)
    prev = s["att_x"]
    s["att_x"] = u
    d = prev - u

    def gn(o):
        oh = hn(o)
        m = oh.mean(-1, keepdim=True)
        var = ((oh - m) ** 2).mean(-1, keepdim=True)
        return ((oh - m) / torch.sqrt(var + gn_eps)).reshape(*lead, C) * vec("att.ln_x.weight") + vec("att.ln_x.bias")

    def per_channel(t):  # [H] or [H,N] -> [H,N]
        return t.reshape(H, 1).expand(H, N) if t.numel() == H else t.reshape(H, N)

    def wkv56(r, k, v, wd, b):  # o_t = r (b k v^T + S), S = w S + k v^T, S[i key][j value]
        kv = k[..., :, None] * v[..., None, :]
        o = torch.einsum("...hi,...hij->...hj", r, b[:, :, None] * kv + s["S"])
        s["S"] = wd[..., :, None] * s["S"] + kv
        return o.reshape(*lead, C)

    if ver.startswith("5"):
        lerp = lambda m: u * vec(m) + prev * (1 - vec(m))  # noqa: E731
        r, k, v = (hn(mv(P(f"att.{n}.weight"), lerp(f"att.time_mix_{n[0]}"))) for n in ("receptance", "key", "value"))
        wd = torch.exp(-torch.exp(per_channel(P("att.time_decay"))))
        first = P("att.time_first")
        b = torch.exp(per_channel(first)) if first is not None else per_channel(P("att.time_faaaa"))
        y = gn(wkv56(r, k, v, wd, b))
        if P("att.gate.weight") is not None:
            y = y * F.silu(mv(P("att.gate.weight"), lerp("att.time_mix_g")))
        return mv(P("att.output.weight"), y), v_first
    if ver == "6.0":
        A1, A2 = P("att.time_maa_w1"), P("att.time_maa_w2")
        Dm = A2.shape[1]
        z = torch.tanh((u + d * vec("att.time_maa_x")) @ A1)
        xs = {nm: u + d * (vec("att.time_maa_" + nm) + z[..., c * Dm:(c + 1) * Dm] @ A2[c])
              for c, nm in enumerate("wkvrg")}
        r, k, v = (hn(mv(P(f"att.{n}.weight"), xs[n[0]])) for n in ("receptance", "key", "value"))
        g = F.silu(mv(P("att.gate.weight"), xs["g"]))
        lam = vec("att.time_decay") + torch.tanh(xs["w"] @ P("att.time_decay_w1")) @ P("att.time_decay_w2")
        wd = hn(torch.exp(-torch.exp(lam)))
        y = gn(wkv56(r, k, v, wd, P("att.time_faaaa").reshape(H, N))) * g
        return mv(P("att.output.weight"), y), v_first
    # 7.0
    xs = {c: u + d * vec("att.x_" + c) for c in "rwkvag"}
    r, k, v = (mv(P(f"att.{n}.weight"), xs[n[0]]) for n in ("receptance", "key", "value"))
    lam = vec("att.w0") + torch.tanh(xs["w"] @ P("att.w1")) @ P("att.w2")
    wd = torch.exp(-math.exp(-0.5) * torch.sigmoid(lam))
    a = torch.sigmoid(vec("att.a0") + (xs["a"] @ P("att.a1")) @ P("att.a2"))
    g = torch.sigmoid(xs["g"] @ P("att.g1")) @ P("att.g2")
    kap = hn(k * vec("att.k_k"))
    kap = kap / torch.clamp(kap.norm(dim=-1, keepdim=True), min=1e-12)
    k = k * (1 + (a - 1) * vec("att.k_a"))
    if v_first is None:  # layer 0
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(vec("att.v0") + (xs["v"] @ P("att.v1")) @ P("att.v2"))
    rh, kh, vh, wh, ah = (hn(t) for t in (r, k, v, wd, a))
    S = s["S"]  # [h][i value][j key]
    Sk = torch.einsum("...ij,...j->...i", S, kap)
    S = S * wh[..., None, :] - Sk[..., :, None] * (kap * ah)[..., None, :] + vh[..., :, None] * kh[..., None, :]
    s["S"] = S
    y = gn(torch.einsum("...ij,...j->...i", S, rh).reshape(*lead, C))
    y = y + ((rh * kh * P("att.r_k").reshape(H, N)).sum(-1, keepdim=True) * vh).reshape(*lead, C)
    return mv(P("att.output.weight"), y * g), v_first


def channel_mix(ver, P, u, s):
    """One layer's channel mix on u [..., C]; s["ffn_x"] updated."""
    vec = lambda n: P(n).reshape(-1)  # noqa: E731
    prev = s["ffn_x"]
    s["ffn_x"] = u
    d = prev - u
    if ver.startswith("5"):
        xk = u * vec("ffn.time_mix_k") + prev * (1 - vec("ffn.time_mix_k"))
        xr = u * vec("ffn.time_mix_r") + prev * (1 - vec("ffn.time_mix_r"))
    elif ver == "6.0":
        xk, xr = u + d * vec("ffn.time_maa_k"), u + d * vec("ffn.time_maa_r")
    else:
        xk, xr = u + d * vec("ffn.x_k"), None
    vv = (torch.relu(xk @ P("ffn.key.weight").T) ** 2) @ P("ffn.value.weight").T
    return vv if xr is None else torch.sigmoid(xr @ P("ffn.receptance.weight").T) * vv


def forward(w, tokens, state=None, gn_eps=64e-5):
    """w: name -> float64 tensor; tokens: ints. Returns (logits [T, V], state) where the state
    is a list per layer of att_x [C], ffn_x [C], S [H, N, N] (RWKV.md's index meaning)."""
    ver, V, C, L, H, N, _ = dims(w)
    st = [{k: v.clone() for k, v in s.items()} for s in state] if state is not None else zero_state(w)
    ln = lambda x, n: F.layer_norm(x, (C,), w[n + ".weight"], w[n + ".bias"], eps=1e-5)  # noqa: E731
    out = []
    for tok in tokens:
        x = ln(w["emb.weight"][tok], "blocks.0.ln0")
        v_first = None
        for i in range(L):
            P = lambda n, i=i: w.get(f"blocks.{i}.{n}")  # noqa: E731
            y, v_first = time_mix(ver, P, ln(x, f"blocks.{i}.ln1"), st[i], v_first, H, gn_eps)
            x = x + y
            x = x + channel_mix(ver, P, ln(x, f"blocks.{i}.ln2"), st[i])
        out.append(w["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(out), st


def greedy(w, prompt, n, gn_eps=64e-5):
    """Greedy continuation: n tokens after the prompt (argmax of each step's logits)."""
    logits, st = forward(w, prompt, gn_eps=gn_eps)
    out, nxt = [], int(torch.argmax(logits[-1]))
    for _ in range(n):
        out.append(nxt)
        lg, st = forward(w, [nxt], st, gn_eps=gn_eps)
        nxt = int(torch.argmax(lg[-1]))
    return out


VARIANTS = {  # layout name -> (version, decay/bonus per head, bonus tensor, gate)
    "5.1": ("5", True, "time_first", False),        # rwkv.cpp 5.1 = ChatRWKV 5
    "5.1-faaaa": ("5", True, "time_faaaa", False),  # RWKV-LM preview: time_faaaa [H], no gate
    "5.2-head": ("5", True, "time_faaaa", True),    # ChatRWKV 5.1: gate, per-head decay
    "5.2-first": ("5", True, "time_first", True),   # ChatRWKV 5.1 with time_first
    "5.2": ("5", False, "time_faaaa", True),        # the released Eagle layout
    "6.0": ("6", False, "time_faaaa", True),
    "7.0": ("7", False, None, True),
}


def random_rwkv(layout, V, C, L, H, F_dim=None, seed=0, loras=None, v7_layer0_v=False):
    """A random-weight checkpoint of `layout` (VARIANTS) with BlinkDL names and shapes (mixes
    [1,1,C]), float64. loras: LoRA widths (v6: mix, decay; v7: w, a, v, g)."""
    ver, per_head, bonus, gate = VARIANTS[layout]
    N = C // H
    F_dim = F_dim or (int(3.5 * C) // 32 * 32 if ver == "6" else 4 * C)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=D64) * scale  # noqa: E731
    un = lambda *s, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*s, generator=g, dtype=D64)  # noqa: E731
    mat = lambda o, i: r(o, i, scale=1.0 / math.sqrt(i))  # noqa: E731
    w = {"emb.weight": r(V, C), "blocks.0.ln0.weight": 1 + r(C, scale=0.1), "blocks.0.ln0.bias": r(C, scale=0.1),
         "ln_out.weight": 1 + r(C, scale=0.1), "ln_out.bias": r(C, scale=0.1), "head.weight": r(V, C, scale=0.5)}
    for i in range(L):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            w[p + n + ".weight"], w[p + n + ".bias"] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        for n in ("receptance", "key", "value", "output"):
            w[p + f"att.{n}.weight"] = mat(C, C)
        w[p + "att.ln_x.weight"], w[p + "att.ln_x.bias"] = 1 + r(C, scale=0.2), r(C, scale=0.2)
        w[p + "ffn.key.weight"], w[p + "ffn.value.weight"] = mat(F_dim, C), mat(C, F_dim) * 0.5
        if ver == "5":
            shape = (H,) if per_head else (H, N)
            w[p + "att.time_decay"] = torch.log(-torch.log(un(*shape, lo=0.3, hi=0.999)))  # w in (0.3, 0.999)
            w[p + "att." + bonus] = r(*shape, scale=0.5) if bonus == "time_first" else un(*shape, lo=-0.5, hi=1.5)
            for m in ("k", "v", "r") + (("g",) if gate else ()):
                w[p + "att.time_mix_" + m] = un(1, 1, C)
            if gate:
                w[p + "att.gate.weight"] = mat(C, C)
            for m in ("k", "r"):
                w[p + "ffn.time_mix_" + m] = un(1, 1, C)
            w[p + "ffn.receptance.weight"] = mat(C, C)
        elif ver == "6":
            Dm, Dd = loras or (8, 16)
            for m in "xwkvrg":
                w[p + "att.time_maa_" + m] = un(1, 1, C)
            w[p + "att.time_maa_w1"] = r(C, 5 * Dm, scale=0.5 / math.sqrt(C))
            w[p + "att.time_maa_w2"] = r(5, Dm, C, scale=0.5)
            w[p + "att.time_decay"] = torch.log(-torch.log(un(1, 1, C, lo=0.3, hi=0.999)))
            w[p + "att.time_decay_w1"] = r(C, Dd, scale=0.5 / math.sqrt(C))
            w[p + "att.time_decay_w2"] = r(Dd, C, scale=0.5)
            w[p + "att.time_faaaa"] = un(H, N, lo=-0.5, hi=1.5)
            w[p + "att.gate.weight"] = mat(C, C)
            for m in "kr":
                w[p + "ffn.time_maa_" + m] = un(1, 1, C)
            w[p + "ffn.receptance.weight"] = mat(C, C)
        else:
            Dw, Da, Dv, Dg = loras or (8, 8, 8, 16)
            for m in "rwkvag":
                w[p + "att.x_" + m] = un(1, 1, C)
            w[p + "att.w0"] = r(1, 1, C, scale=1.5)
            w[p + "att.w1"], w[p + "att.w2"] = r(C, Dw, scale=0.5 / math.sqrt(C)), r(Dw, C, scale=0.5)
            w[p + "att.a0"] = r(1, 1, C, scale=0.5)
            w[p + "att.a1"], w[p + "att.a2"] = r(C, Da, scale=0.5 / math.sqrt(C)), r(Da, C, scale=0.5)
            if i > 0 or v7_layer0_v:
                w[p + "att.v0"] = r(1, 1, C, scale=0.5)
                w[p + "att.v1"], w[p + "att.v2"] = r(C, Dv, scale=0.5 / math.sqrt(C)), r(Dv, C, scale=0.5)
            w[p + "att.g1"], w[p + "att.g2"] = r(C, Dg, scale=1.0 / math.sqrt(C)), r(Dg, C, scale=1.0 / math.sqrt(Dg))
            w[p + "att.k_k"], w[p + "att.k_a"] = un(1, 1, C, lo=0.5, hi=1.5), un(1, 1, C)
            w[p + "att.r_k"] = r(H, N, scale=0.5)
            w[p + "ffn.x_k"] = un(1, 1, C)
    return w
