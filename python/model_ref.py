"""An independent float64 PyTorch implementation of linmix's language model (README "The
language model"; MIXERS.md for the mixers, through python/oracle.py), for autograd checks of
linmix's hand-written whole-model backward. Weights and config come from a linmix checkpoint."""
import json
import math

import torch
import torch.nn.functional as F

import oracle
import rwkv_ref


def _ln(x, p, name):
    return F.layer_norm(x, (x.shape[-1],), p[name + ".weight"], p[name + ".bias"], eps=1e-5)


def _shift(x):  # x[b, t-1], zeros at t = 0
    return F.pad(x, (0, 0, 1, 0))[:, :-1]


def _mech(cfg, name, default):
    """The mechanism's function: the float64 oracle's, or a faster one of the same signature that a
    caller puts in cfg["mechanisms"] (bench/torch_lm.py, the PyTorch twin of linmix train)."""
    return cfg.get("mechanisms", {}).get(name, default)


# ---- the token-mixing layer of each kind: fn(a, P, prm, cfg) -> out, a: [B, T, C] (ln1 output),
# P: parameter by its name under "blocks.<i>.", prm: the layer's params (the mixer's and knobs)

def _attention(m):  # q, k, v, o projections, heads of C / n_head
    def f(a, P, prm, cfg):
        B, T, C = a.shape
        H = cfg["n_head"]
        q, k, v = ((a @ P(f"att.{n}.weight").T).reshape(B, T, H, C // H) for n in "qkv")
        x = dict(q=q, k=k, v=v)
        if m == "performer":
            x["proj"] = P("att.proj")
        return _mech(cfg, m, oracle.ORACLES[m])(x, cfg.get("causal", True), prm).reshape(B, T, C) @ P("att.o.weight").T
    return f


def _aft(m):  # q, k, v, o projections per channel, the variant's learned bias w or u
    def f(a, P, prm, cfg):
        x = {n: a @ P(f"att.{n}.weight").T for n in "qkv"}
        if m in ("aft_full", "aft_local"):
            x["w"] = P("att.w")
        if m == "aft_conv":
            x["u"] = P("att.u")
        return oracle.ORACLES[m](x, cfg.get("causal", True), prm) @ P("att.o.weight").T
    return f


def _rwkv4(a, P, prm, cfg):
    xx = _shift(a)
    mix = lambda n: a * P(n) + xx * (1 - P(n))  # noqa: E731
    r = torch.sigmoid(mix("att.time_mix_r") @ P("att.receptance.weight").T)
    k = mix("att.time_mix_k") @ P("att.key.weight").T
    v = mix("att.time_mix_v") @ P("att.value.weight").T
    wkv = _mech(cfg, "rwkv4", oracle.rwkv4)(k, v, torch.exp(P("att.time_decay")), P("att.time_first"))
    return (r * wkv) @ P("att.output.weight").T


def _s4d(a, P, prm, cfg):
    y = oracle.s4d(a, P("att.log_dt"), -torch.exp(P("att.log_A_re")), P("att.A_im"), P("att.C_re"),
                   P("att.C_im"), P("att.D"))
    return F.gelu(y, approximate="tanh") @ P("att.o.weight").T


def _mamba2(a, P, prm, cfg):
    """mamba_ssm's Mamba2 block (src/model/mamba2_layer.cpp, written here from mamba_ssm's
    description): [z, xBC, dt] = a W_in^T; xBC = silu(conv4(xBC) + b); [x, B, C] = xBC; SSD;
    RMSNorm per group of (y silu(z)) times w; W_out."""
    Bsz, T, _ = a.shape
    H, Ei = P("att.A_log").shape[0], P("att.norm.weight").shape[0]
    G = int(prm.get("groups", 1))
    Wc = P("att.conv.weight").shape[0]
    GN = (Wc - Ei) // 2
    zxbcdt = a @ P("att.in_proj.weight").T
    z, xbc, dt = zxbcdt[..., :Ei], zxbcdt[..., Ei:Ei + Wc], zxbcdt[..., Ei + Wc:]
    w = P("att.conv.weight")
    xpad = F.pad(xbc, (0, 0, 3, 0))
    xbc = F.silu(P("att.conv.bias") + sum(w[:, j] * xpad[:, j:j + T] for j in range(4)))
    x, Bm, Cm = xbc[..., :Ei], xbc[..., Ei:Ei + GN], xbc[..., Ei + GN:]
    y, _ = oracle.mamba2(x.reshape(Bsz, T, H, Ei // H), dt, -torch.exp(P("att.A_log")), Bm.reshape(Bsz, T, G, -1),
                         Cm.reshape(Bsz, T, G, -1), D=P("att.D"), dt_bias=P("att.dt_bias"))
    y = y.reshape(Bsz, T, G, Ei // G) * F.silu(z.reshape(Bsz, T, G, Ei // G))
    y = (y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-5)).reshape(Bsz, T, Ei) * P("att.norm.weight")
    return y @ P("att.out_proj.weight").T


def _gau(a, P, prm, cfg):
    U = F.silu(a @ P("att.wu.weight").T + P("att.wu.bias"))
    V = F.silu(a @ P("att.wv.weight").T + P("att.wv.bias"))
    Z = F.silu(a @ P("att.wz.weight").T + P("att.wz.bias"))
    g, b = P("att.gamma"), P("att.beta")
    A = oracle.flash(Z * g[0] + b[0], Z * g[1] + b[1], Z * g[2] + b[2], Z * g[3] + b[3], V, cfg.get("causal", True),
                     int(prm.get("group", 256)))
    return (U * A) @ P("att.o.weight").T


def _mamba(a, P, prm, cfg):
    T = a.shape[1]
    Ei = P("att.D").shape[0]
    N = P("att.A_log").shape[1]
    R = P("att.dt_proj.weight").shape[1]
    xz = a @ P("att.in_proj.weight").T
    xp, z = xz[..., :Ei], xz[..., Ei:]
    w = P("att.conv.weight")  # (Ei, 4): out[t] = b + sum_j w[:, j] x[t - 3 + j]
    xpad = F.pad(xp, (0, 0, 3, 0))
    xc = P("att.conv.bias") + sum(w[:, j] * xpad[:, j:j + T] for j in range(4))
    xs = F.silu(xc)
    dbc = xs @ P("att.x_proj.weight").T
    delta = dbc[..., :R] @ P("att.dt_proj.weight").T
    return _mech(cfg, "mamba", oracle.mamba)(xs, delta, -torch.exp(P("att.A_log")), dbc[..., R:R + N], dbc[..., R + N:],
                        D=P("att.D"), z=z, delta_bias=P("att.dt_proj.bias"),
                        delta_softplus=bool(int(prm.get("delta_softplus", 1)))) @ P("att.out_proj.weight").T


# ---- the layer of the decaying / delta-rule mechanisms (src/model/decay_layer.cpp, written
# here from its description): projections (+ bias) [-> short causal depthwise conv, kernel 4, no bias, then SiLU] -> the map
# into the domain -> the mixer -> norm (per-head RMSNorm or per-head GroupNorm) -> [gate: swish
# of its projection] -> Wo.
_MAPS = {
    "id": lambda x: x,
    "sigmoid": torch.sigmoid,
    "logsig16": lambda x: F.logsigmoid(x) / 16,
    "negexp": lambda x: -torch.exp(x),
    "softplus": F.softplus,
}
# name: per-token projections (name, map, conv), weights (name, map), norm, eps, gate
_QKV = [("q", "id", False), ("k", "id", False), ("v", "id", False)]
_CQKV = [("q", "id", True), ("k", "id", True), ("v", "id", True)]
_DECAY = {
    "retention": (_QKV, [("gamma", "fixed")], "group", 1e-5, "swish"),
    # GLA's gate through a rank-16 projection (att.g.lora then att.g.weight, bias)
    "gla": (_QKV + [("g", "logsig16", False)], [], "rms_head", 1e-5, "swish"),
    "deltanet": (_CQKV + [("beta", "sigmoid", False)], [], "rms_head", 1e-5, "swish"),
    # Gated DeltaNet's gate: g = -exp(A_log) softplus(x W^T + dt_bias)
    "gated_deltanet": (_CQKV + [("beta", "sigmoid", False), ("g", "softplus", False)], [], "rms_head", 1e-5,
                       "swish"),
}


def _decay(m):
    def f(a, P, prm, cfg, Pd):
        B, T, C = a.shape
        H = cfg["n_head"]
        Dh = C // H
        projs, weights, norm, eps, gate = _DECAY[m]

        def proj(n, conv):
            xin = a
            if f"att.{n}.lora" in Pd:  # low rank: x W1^T W2^T
                xin = xin @ P(f"att.{n}.lora").T
            raw = xin @ P(f"att.{n}.weight").T
            if f"att.{n}.bias" in Pd:
                raw = raw + P(f"att.{n}.bias")
            if conv:  # out[t] = sum_j w[:, j] raw[t - 3 + j]
                w = P(f"att.{n}.conv")
                rp = F.pad(raw, (0, 0, 3, 0))
                raw = F.silu(sum(w[:, j] * rp[:, j:j + T] for j in range(4)))
            return raw

        x = {}
        for n, mp, conv in projs:
            val = _MAPS[mp](proj(n, conv))
            if f"att.{n}.A_log" in Pd:
                val = -torch.exp(P(f"att.{n}.A_log")) * val
            if n in ("Bm", "Cm"):
                x[n] = val.reshape(B, T, 1, -1)
            elif val.shape[-1] == H and n in ("beta", "dt", "g") and m != "gla":
                x[n] = val.reshape(B, T, H)
            else:
                x[n] = val.reshape(B, T, H, Dh)
        for n, mp in weights:
            x[n] = 1 - torch.pow(2.0, -5.0 - torch.arange(H, dtype=a.dtype)) if mp == "fixed" else _MAPS[mp](P(f"att.{n}"))
        z = x.pop("z", None)
        y = oracle.ORACLES[m](x, True, {k: v for k, v in prm.items() if k != "state"}).reshape(B, T, C)
        if z is not None:
            y = y * F.silu(z.reshape(B, T, C))
        w = P("att.ln_x.weight")
        if norm == "rms_all":
            y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + eps) * w
        else:
            yh = y.reshape(B, T, H, Dh)
            if norm == "group":
                yh = yh - yh.mean(-1, keepdim=True)
            yh = yh / torch.sqrt((yh * yh).mean(-1, keepdim=True) + eps)
            y = (yh * w).reshape(B, T, C) if norm == "rms_head" else yh.reshape(B, T, C) * w + P("att.ln_x.bias")
        if gate is not None:
            g = proj("gate", False)
            y = y * F.silu(g)
        return y @ P("att.o.weight").T
    return f


def _rwkv(m):  # RWKV-5/6/7 time mix with BlinkDL's names: python/rwkv_ref.py token by token
    ver = {"rwkv5": "5", "rwkv6": "6.0", "rwkv7": "7.0"}[m]

    def f(a, P, prm, cfg, carry):
        B, T, C = a.shape
        H = cfg["n_head"]
        s = {"att_x": torch.zeros(B, C, dtype=a.dtype), "S": torch.zeros(B, H, C // H, C // H, dtype=a.dtype)}
        eps = float(prm.get("gn_eps", 64e-5))
        outs, vf = [], []
        for t in range(T):
            y, v_first = rwkv_ref.time_mix(ver, P, a[:, t], s, carry[t] if carry else None, H, eps)
            outs.append(y)
            vf.append(v_first)
        if not carry:  # the first rwkv7 layer sets v_first for the later ones
            carry.extend(vf)
        return torch.stack(outs, 1)
    return f


# The layer of every mechanism that can be a language-model layer, keyed by registry name (as
# src/model/mixer_layer.cpp); tests/model_grad_test.py fails naming a causal mechanism missing here.
LAYERS = {m: _attention(m) for m in ("softmax", "linear", "performer", "flow", "norm_linear", "block_softmax")}
LAYERS.update({m: _aft(m) for m in ("aft_full", "aft_local", "aft_simple", "aft_conv")})
LAYERS.update({"rwkv4": _rwkv4, "s4d": _s4d, "flash": _gau, "mamba": _mamba, "mamba2": _mamba2})
LAYERS.update({m: _decay(m) for m in _DECAY})
LAYERS.update({m: _rwkv(m) for m in ("rwkv5", "rwkv6", "rwkv7")})
LAYERS["fnet"] = lambda a, P, prm, cfg: oracle.fnet(a)  # no parameters: Re(DFT_T DFT_C a)
# layers with no order of their own: learned positions by default
POSITIONS = {"softmax", "linear", "performer", "flow", "norm_linear", "block_softmax", "flash", "fnet"}


def _attention_like(cfg):  # a non-causal model has positions by default too
    return not cfg.get("causal", True) or any(l["mixer"] in POSITIONS for l in cfg["layers"])


def loss(cfg, p, inputs, targets):
    """cfg: the checkpoint's config dict; p: name -> float64 tensor (requires_grad as wanted);
    inputs, targets: LongTensor [B, T] (targets < 0 ignored). Returns the mean cross-entropy."""
    B, T = inputs.shape
    logits = _trunk(cfg, p, inputs) @ p["head.weight"].T
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1)


def classify_loss(cfg, p, inputs, lengths, labels):
    """The encoder classifier (README "Classifiers"): inputs LongTensor [B, T] padded past
    lengths [B]; labels [B]. Mean pooling over each sequence's own rows of the final norm, or the
    final row of the learned cls vector prepended at position 0; then head.weight, head.bias.
    Returns the mean cross-entropy over the batch."""
    B, T = inputs.shape
    cls = cfg.get("pool", "mean") == "cls"
    h = _trunk(cfg, p, inputs, p["cls.weight"] if cls else None)
    if cls:
        pooled = h[:, 0]
    else:
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(h.dtype)
        pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
    logits = pooled @ p["head.weight"].T + p["head.bias"]
    return F.cross_entropy(logits, labels)


def _trunk(cfg, p, inputs, cls=None):
    """The final-norm rows [B, T (+1 with cls), C] of the embedding and blocks."""
    B, T = inputs.shape
    if cfg.get("norm", "layernorm") == "rmsnorm":  # Mamba's: x / sqrt(mean x^2 + 1e-5) w
        def _ln(x, p, name):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * p[name + ".weight"]
    else:
        _ln = globals()["_ln"]
    C, H = cfg["d_model"], cfg["n_head"]
    x = p["emb.weight"][inputs]
    if cls is not None:
        x = torch.cat([cls.expand(B, 1, -1), x], 1)
        T += 1
    if cfg.get("pos_emb", _attention_like(cfg)):
        x = x + p["pos.weight"][:T]
    if cfg["ln0"]:
        x = _ln(x, p, "blocks.0.ln0")
    carry = []  # RWKV-7's v_first per token
    for i, layer in enumerate(cfg["layers"]):
        m, prm = layer["mixer"], layer.get("params", {})
        P = lambda n, i=i: p[f"blocks.{i}.{n}"]  # noqa: E731
        fn = LAYERS[m]
        if m in ("rwkv5", "rwkv6", "rwkv7"):
            out = fn(_ln(x, p, f"blocks.{i}.ln1"), lambda n, i=i: p.get(f"blocks.{i}.{n}"), prm, cfg, carry)
        elif m in _DECAY:  # it reads which optional parameters (biases) the checkpoint has
            out = fn(_ln(x, p, f"blocks.{i}.ln1"), P, prm, cfg, {n[len(f"blocks.{i}."):] for n in p if n.startswith(f"blocks.{i}.")})
        else:
            out = fn(_ln(x, p, f"blocks.{i}.ln1"), P, prm, cfg)
        x = x + out
        if cfg["channel_mix"] == "none":  # Mamba's blocks: the mixer only
            continue
        b2 = _ln(x, p, f"blocks.{i}.ln2")
        if cfg["channel_mix"] == "rwkv":
            xx = _shift(b2)
            xk = b2 * P("ffn.time_mix_k") + xx * (1 - P("ffn.time_mix_k"))
            xr = b2 * P("ffn.time_mix_r") + xx * (1 - P("ffn.time_mix_r"))
            kk = torch.relu(xk @ P("ffn.key.weight").T) ** 2
            x = x + torch.sigmoid(xr @ P("ffn.receptance.weight").T) * (kk @ P("ffn.value.weight").T)
        elif cfg["channel_mix"] in ("rwkv6", "rwkv7"):
            x = x + rwkv_ref.channel_mix(cfg["channel_mix"][4] + ".0", P, b2, {"ffn_x": _shift(b2)})
        else:
            h = F.gelu(b2 @ P("mlp.fc.weight").T + P("mlp.fc.bias"), approximate="tanh")
            x = x + h @ P("mlp.proj.weight").T + P("mlp.proj.bias")
    return _ln(x, p, "ln_out")


# The tests' rule for weights "alive enough to test": a checkpoint's weights times 4 (the 0.02
# init is nearly linear: every path must carry gradient), the RWKV time_ parameters also moved by
# N(0, 0.3^2) (numpy rng of seed); norms, output projections and the SSM time steps and decays
# kept (scaled, dt falls to 1e-12..1e-4 and the SSM path goes dead, its true gradients far below
# any tolerance). w: name -> numpy array (st.load), changed in place; "opt." entries untouched.
SSM_TIME = ("att.log_dt", "att.log_A_re", "att.dt_proj.bias", "A_log", "att.A", "att.dt_bias")


def alive_weights(w, seed=5):
    import numpy as np
    g = np.random.default_rng(seed)
    for n in w:
        if n.startswith("opt.") or ".ln" in n or n.startswith("ln_out") or n.endswith("att.proj") or \
                n.endswith(SSM_TIME):
            continue
        w[n] = w[n] * 4 + (0.3 * g.standard_normal(w[n].shape) if "time_" in n else 0)
    return w
