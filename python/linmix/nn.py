"""linmix's language model and its layers as torch.nn.Modules, on linmix.ops kernels.

    model = linmix.nn.LanguageModel.from_checkpoint("run/ckpt.safetensors")  # linmix train's, or RWKV / Mamba
    logits = model(tokens)                      # [B, T, V], equal to `linmix logits` on the same tokens
    model.save_checkpoint("mine.safetensors")   # `linmix generate --model mine.safetensors` samples from it

    model = linmix.nn.LanguageModel({"vocab": 256, "d_model": 128, "n_layer": 4, "mixer": "gla"}, seed=1)

The model is README's "The language model": embedding (+ learned positions where a layer wants
them), optional ln0, blocks of [norm -> token mixer -> residual, norm -> channel mix -> residual],
final norm, head. Every parameter keeps its checkpoint name (``model.tensors()``) and its shape;
parameters are created and initialised by the C++ library, so a config means the same model in
both. Each block is a ``Block`` of a ``MixerLayer`` (the layer of its mechanism, one function per
layer kind below, the mechanism itself a linmix.ops call: float32 kernels and their hand-written
backward) and a ``ChannelMix``. The RWKV-5/6/7 time mixes are BlinkDL's blocks (docs/RWKV.md).
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _C, ops


def _shift(x):  # x[b, t-1], zeros at t = 0
    return F.pad(x, (0, 0, 1, 0))[:, :-1]


def _mix(name, x, prm, causal=True):
    """The mechanism on named inputs, with the layer's params that are the mechanism's."""
    own = {p["name"] for p in ops.SPECS[name]["params"]}
    out = ops.call(name, x, causal=causal, **{k: float(v) for k, v in prm.items() if k in own})
    return out[0] if isinstance(out, tuple) else out


# ---- the token-mixing layer of each kind: fn(a, P, prm, cfg, carry) -> out; a: [B, T, C] (the
# normalised block input), P(name): the layer's parameter under "blocks.<i>." (None if absent),
# prm: the layer's params (the mechanism's and the layer knobs), carry: RWKV-7's v_first

def _attention(m):  # q, k, v, o projections, heads of C / n_head
    def f(a, P, prm, cfg, carry):
        B, T, C = a.shape
        H = cfg["n_head"]
        x = {n: (a @ P(f"att.{n}.weight").T).reshape(B, T, H, C // H) for n in "qkv"}
        if m == "performer":
            x["proj"] = P("att.proj")
        return _mix(m, x, prm).reshape(B, T, C) @ P("att.o.weight").T
    return f


def _aft(m):  # q, k, v, o per channel, the variant's learned bias w or kernels u
    def f(a, P, prm, cfg, carry):
        x = {n: a @ P(f"att.{n}.weight").T for n in "qkv"}
        if m in ("aft_full", "aft_local"):
            x["w"] = P("att.w")
        if m == "aft_conv":
            x["u"] = P("att.u")
        return _mix(m, x, prm) @ P("att.o.weight").T
    return f


def _rwkv4(a, P, prm, cfg, carry):
    xx = _shift(a)
    mix = lambda n: a * P(n) + xx * (1 - P(n))  # noqa: E731
    r = torch.sigmoid(mix("att.time_mix_r") @ P("att.receptance.weight").T)
    k = mix("att.time_mix_k") @ P("att.key.weight").T
    v = mix("att.time_mix_v") @ P("att.value.weight").T
    wkv = _mix("rwkv4", {"k": k, "v": v, "w": torch.exp(P("att.time_decay")), "u": P("att.time_first")}, prm)
    return (r * wkv) @ P("att.output.weight").T


def _s4d(a, P, prm, cfg, carry):
    y = _mix("s4d", {"u": a, "log_dt": P("att.log_dt"), "A_re": -torch.exp(P("att.log_A_re")), "A_im": P("att.A_im"),
                     "C_re": P("att.C_re"), "C_im": P("att.C_im"), "D": P("att.D")}, prm)
    return F.gelu(y, approximate="tanh") @ P("att.o.weight").T


def _gau(a, P, prm, cfg, carry):  # FLASH's gated attention unit
    U = F.silu(a @ P("att.wu.weight").T + P("att.wu.bias"))
    V = F.silu(a @ P("att.wv.weight").T + P("att.wv.bias"))
    Z = F.silu(a @ P("att.wz.weight").T + P("att.wz.bias"))
    g, b = P("att.gamma"), P("att.beta")
    A = _mix("flash", {"quad_q": Z * g[0] + b[0], "quad_k": Z * g[1] + b[1], "lin_q": Z * g[2] + b[2],
                       "lin_k": Z * g[3] + b[3], "v": V}, prm)
    return (U * A) @ P("att.o.weight").T


def _conv4(x, w, b=None):  # causal depthwise, kernel 4: out[t] = b + sum_j w[:, j] x[t - 3 + j]
    T = x.shape[1]
    xp = F.pad(x, (0, 0, 3, 0))
    out = sum(w[:, j] * xp[:, j:j + T] for j in range(4))
    return out if b is None else out + b


def _mamba(a, P, prm, cfg, carry):
    Ei, N = P("att.D").shape[0], P("att.A_log").shape[1]
    R = P("att.dt_proj.weight").shape[1]
    xz = a @ P("att.in_proj.weight").T
    xs = F.silu(_conv4(xz[..., :Ei], P("att.conv.weight"), P("att.conv.bias")))
    dbc = xs @ P("att.x_proj.weight").T
    x = {"u": xs, "delta": dbc[..., :R] @ P("att.dt_proj.weight").T, "A": -torch.exp(P("att.A_log")),
         "Bm": dbc[..., R:R + N], "Cm": dbc[..., R + N:], "D": P("att.D"), "z": xz[..., Ei:],
         "delta_bias": P("att.dt_proj.bias")}
    return _mix("mamba", x, prm) @ P("att.out_proj.weight").T


def _mamba2(a, P, prm, cfg, carry):  # mamba_ssm's Mamba2 block (src/model/mamba2_layer.cpp)
    Bsz, T, _ = a.shape
    H, Ei = P("att.A_log").shape[0], P("att.norm.weight").shape[0]
    G = int(prm.get("groups", 1))
    Wc = P("att.conv.weight").shape[0]
    GN = (Wc - Ei) // 2
    zxbcdt = a @ P("att.in_proj.weight").T
    z, dt = zxbcdt[..., :Ei], zxbcdt[..., Ei + Wc:]
    xbc = F.silu(_conv4(zxbcdt[..., Ei:Ei + Wc], P("att.conv.weight"), P("att.conv.bias")))
    x = {"x": xbc[..., :Ei].reshape(Bsz, T, H, Ei // H), "dt": dt, "A": -torch.exp(P("att.A_log")),
         "Bm": xbc[..., Ei:Ei + GN].reshape(Bsz, T, G, -1), "Cm": xbc[..., Ei + GN:].reshape(Bsz, T, G, -1),
         "D": P("att.D"), "dt_bias": P("att.dt_bias")}
    y = _mix("mamba2", x, prm).reshape(Bsz, T, G, Ei // G) * F.silu(z.reshape(Bsz, T, G, Ei // G))
    y = (y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-5)).reshape(Bsz, T, Ei) * P("att.norm.weight")
    return y @ P("att.out_proj.weight").T


# The layer of the decaying / delta-rule mechanisms (src/model/decay_layer.cpp): projections
# (+ bias) [-> short causal conv + SiLU] -> the map into the domain -> the mechanism -> per-head
# RMSNorm or GroupNorm -> [swish gate] -> Wo.
_MAPS = {"id": lambda x: x, "sigmoid": torch.sigmoid, "logsig16": lambda x: F.logsigmoid(x) / 16, "softplus": F.softplus}
_QKV = [("q", "id", False), ("k", "id", False), ("v", "id", False)]
_CQKV = [("q", "id", True), ("k", "id", True), ("v", "id", True)]
_DECAY = {
    "retention": (_QKV, "group", True),
    "gla": (_QKV + [("g", "logsig16", False)], "rms_head", False),
    "deltanet": (_CQKV + [("beta", "sigmoid", False)], "rms_head", False),
    "gated_deltanet": (_CQKV + [("beta", "sigmoid", False), ("g", "softplus", False)], "rms_head", False),
}


def _decay(m):
    def f(a, P, prm, cfg, carry):
        B, T, C = a.shape
        H = cfg["n_head"]
        Dh = C // H
        projs, norm, gamma = _DECAY[m]

        def proj(n, conv):
            xin = a if P(f"att.{n}.lora") is None else a @ P(f"att.{n}.lora").T  # low rank: x W1^T W2^T
            raw = xin @ P(f"att.{n}.weight").T
            if P(f"att.{n}.bias") is not None:
                raw = raw + P(f"att.{n}.bias")
            return F.silu(_conv4(raw, P(f"att.{n}.conv"))) if conv else raw

        x = {}
        for n, mp, conv in projs:
            val = _MAPS[mp](proj(n, conv))
            if P(f"att.{n}.A_log") is not None:
                val = -torch.exp(P(f"att.{n}.A_log")) * val
            x[n] = val.reshape(B, T, H) if n == "beta" or (n == "g" and m != "gla") else val.reshape(B, T, H, Dh)
        if gamma:  # RetNet's fixed decays 1 - 2^(-5-h)
            x["gamma"] = 1 - torch.pow(2.0, -5.0 - torch.arange(H, dtype=a.dtype))
        y = _mix(m, x, prm).reshape(B, T, H, Dh)
        if norm == "group":
            y = y - y.mean(-1, keepdim=True)
        y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-5)
        y = (y * P("att.ln_x.weight")).reshape(B, T, C) if norm == "rms_head" else \
            y.reshape(B, T, C) * P("att.ln_x.weight") + P("att.ln_x.bias")
        return (y * F.silu(proj("gate", False))) @ P("att.o.weight").T
    return f


def _rwkv(m):  # BlinkDL's RWKV-5/6/7 time mix (docs/RWKV.md) over the sequence
    def f(a, P, prm, cfg, carry):
        B, T, C = a.shape
        H = cfg["n_head"]
        N = C // H
        eps = float(prm.get("gn_eps", 64e-5))
        vec = lambda n: P(n).reshape(-1)  # noqa: E731
        hn = lambda t: t.reshape(B, T, H, N)  # noqa: E731
        prev = _shift(a)
        d = prev - a

        def gn(o):  # GroupNorm per head, [B, T, H, N] -> [B, T, C]
            mu = o.mean(-1, keepdim=True)
            var = ((o - mu) ** 2).mean(-1, keepdim=True)
            return ((o - mu) / torch.sqrt(var + eps)).reshape(B, T, C) * vec("att.ln_x.weight") + vec("att.ln_x.bias")

        if m == "rwkv5":
            lerp = lambda n: a * vec(n) + prev * (1 - vec(n))  # noqa: E731
            r, k, v = (hn(lerp(f"att.time_mix_{n[0]}") @ P(f"att.{n}.weight").T) for n in ("receptance", "key", "value"))
            x = {"r": r, "k": k, "v": v, "w": -torch.exp(P("att.time_decay").reshape(H, N)),
                 "u": P("att.time_faaaa").reshape(H, N)}
            y = gn(_mix("rwkv5", x, prm).reshape(B, T, H, N))
            if P("att.gate.weight") is not None:
                y = y * F.silu(lerp("att.time_mix_g") @ P("att.gate.weight").T)
            return y @ P("att.output.weight").T
        if m == "rwkv6":
            A1, A2 = P("att.time_maa_w1"), P("att.time_maa_w2")
            Dm = A2.shape[1]
            z = torch.tanh((a + d * vec("att.time_maa_x")) @ A1)
            xs = {nm: a + d * (vec("att.time_maa_" + nm) + z[..., c * Dm:(c + 1) * Dm] @ A2[c])
                  for c, nm in enumerate("wkvrg")}
            r, k, v = (hn(xs[n[0]] @ P(f"att.{n}.weight").T) for n in ("receptance", "key", "value"))
            lam = vec("att.time_decay") + torch.tanh(xs["w"] @ P("att.time_decay_w1")) @ P("att.time_decay_w2")
            x = {"r": r, "k": k, "v": v, "w": hn(-torch.exp(lam)), "u": P("att.time_faaaa").reshape(H, N)}
            y = gn(_mix("rwkv6", x, prm).reshape(B, T, H, N)) * F.silu(xs["g"] @ P("att.gate.weight").T)
            return y @ P("att.output.weight").T
        xs = {c: a + d * vec("att.x_" + c) for c in "rwkvag"}
        r, k, v = (xs[n[0]] @ P(f"att.{n}.weight").T for n in ("receptance", "key", "value"))
        lam = vec("att.w0") + torch.tanh(xs["w"] @ P("att.w1")) @ P("att.w2")
        logw = -math.exp(-0.5) * torch.sigmoid(lam)
        aa = torch.sigmoid(vec("att.a0") + (xs["a"] @ P("att.a1")) @ P("att.a2"))
        g = torch.sigmoid(xs["g"] @ P("att.g1")) @ P("att.g2")
        kap = hn(k * vec("att.k_k"))
        kap = kap / torch.clamp(kap.norm(dim=-1, keepdim=True), min=1e-12)
        k = k * (1 + (aa - 1) * vec("att.k_a"))
        if not carry:  # the first rwkv7 layer sets v_first for the later ones
            carry.append(v)
        else:
            v = v + (carry[0] - v) * torch.sigmoid(vec("att.v0") + (xs["v"] @ P("att.v1")) @ P("att.v2"))
        x = {"r": hn(r), "w": hn(logw), "k": hn(k), "v": hn(v), "a": kap, "b": -kap * hn(aa)}
        y = gn(_mix("rwkv7", x, prm).reshape(B, T, H, N))
        y = y + ((hn(r) * hn(k) * P("att.r_k").reshape(H, N)).sum(-1, keepdim=True) * hn(v)).reshape(B, T, C)
        return (y * g) @ P("att.output.weight").T
    return f


# The layer of every mechanism that can be a language-model layer, by registry name (as
# src/model/mixer_layer.cpp's table).
LAYERS = {m: _attention(m) for m in ("softmax", "linear", "performer", "flow", "norm_linear", "block_softmax")}
LAYERS.update({m: _aft(m) for m in ("aft_full", "aft_local", "aft_simple", "aft_conv")})
LAYERS.update({"rwkv4": _rwkv4, "s4d": _s4d, "flash": _gau, "mamba": _mamba, "mamba2": _mamba2})
LAYERS.update({m: _decay(m) for m in _DECAY})
LAYERS.update({m: _rwkv(m) for m in ("rwkv5", "rwkv6", "rwkv7")})


class _Params(nn.Module):
    """Parameters under their checkpoint names relative to a prefix ('.' is not allowed in a
    module's parameter name: stored with '__')."""

    def __init__(self, tensors):
        super().__init__()
        for n, t in tensors.items():
            self.register_parameter(n.replace(".", "__"), nn.Parameter(t.clone()))

    def get(self, name):
        return getattr(self, name.replace(".", "__"), None)

    def named(self):
        return {n.replace("__", "."): p for n, p in self.named_parameters()}


class MixerLayer(_Params):
    """The token-mixing layer of one block (its kind by mechanism: LAYERS), params "att.*"."""

    def __init__(self, mixer, params, tensors, cfg):
        super().__init__(tensors)
        if mixer not in LAYERS:
            raise ValueError(f"linmix.nn: mechanism '{mixer}' has no language-model layer")
        self.mixer, self.params, self.cfg = mixer, dict(params), cfg

    def forward(self, a, carry=None):
        return LAYERS[self.mixer](a, self.get, self.params, self.cfg, carry if carry is not None else [])


class ChannelMix(_Params):
    """The block's channel mix: "mlp" (GELU MLP), "rwkv" (RWKV-4/5), "rwkv6", "rwkv7"."""

    def __init__(self, kind, tensors):
        super().__init__(tensors)
        self.kind = kind

    def forward(self, b):
        P = self.get
        if self.kind == "mlp":
            h = F.gelu(b @ P("mlp.fc.weight").T + P("mlp.fc.bias"), approximate="tanh")
            return h @ P("mlp.proj.weight").T + P("mlp.proj.bias")
        xx = _shift(b)
        vec = lambda n: P(n).reshape(-1)  # noqa: E731
        if self.kind == "rwkv":
            xk = b * vec("ffn.time_mix_k") + xx * (1 - vec("ffn.time_mix_k"))
            xr = b * vec("ffn.time_mix_r") + xx * (1 - vec("ffn.time_mix_r"))
        elif self.kind == "rwkv6":
            xk, xr = b + (xx - b) * vec("ffn.time_maa_k"), b + (xx - b) * vec("ffn.time_maa_r")
        else:
            xk, xr = b + (xx - b) * vec("ffn.x_k"), None
        vv = (torch.relu(xk @ P("ffn.key.weight").T) ** 2) @ P("ffn.value.weight").T
        return vv if xr is None else torch.sigmoid(xr @ P("ffn.receptance.weight").T) * vv


class Norm(_Params):
    """LayerNorm (eps 1e-5) or RMSNorm (Mamba's, eps 1e-5) with the checkpoint's weight (and bias)."""

    def __init__(self, rms, tensors):
        super().__init__(tensors)
        self.rms = rms

    def forward(self, x):
        if self.rms:
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * self.get("weight")
        return F.layer_norm(x, (x.shape[-1],), self.get("weight"), self.get("bias"), eps=1e-5)


class Block(nn.Module):
    def __init__(self, i, cfg, tensors):
        super().__init__()
        p = f"blocks.{i}."
        own = {n[len(p):]: t for n, t in tensors.items() if n.startswith(p)}
        layer = cfg["layers"][i]
        rms = cfg.get("norm", "layernorm") == "rmsnorm"
        sub = lambda pre: {n[len(pre):]: t for n, t in own.items() if n.startswith(pre)}  # noqa: E731
        self.ln0 = Norm(rms, sub("ln0.")) if cfg["ln0"] and i == 0 else None
        self.ln1 = Norm(rms, sub("ln1."))
        self.att = MixerLayer(layer["mixer"], layer.get("params", {}), {n: t for n, t in own.items() if n.startswith("att.")}, cfg)
        cm = cfg["channel_mix"]
        self.ln2 = Norm(rms, sub("ln2.")) if cm != "none" else None
        self.ffn = ChannelMix(cm, {n: t for n, t in own.items() if n.startswith(("mlp.", "ffn."))}) if cm != "none" else None

    def forward(self, x, carry):
        x = x + self.att(self.ln1(x), carry)
        if self.ffn is not None:
            x = x + self.ffn(self.ln2(x))
        return x


class LanguageModel(nn.Module):
    """linmix's language model (config: a dict or JSON text as `linmix train --config` takes; or
    tensors + config of a checkpoint). Parameters are created and initialised by the C++ library
    (seed as `linmix train --seed`), unless tensors are given."""

    def __init__(self, config, seed=0, tensors=None, tokenizer="bytes"):
        super().__init__()
        text = config if isinstance(config, str) else json.dumps(config)
        text, init = _C.init_model(text, int(seed))  # the normalised config and its parameters
        self.config = json.loads(text)
        if self.config.get("classes", 0) or not self.config.get("causal", True):
            raise ValueError("linmix.nn.LanguageModel: the config is a classifier (\"classes\": "
                             f"{self.config.get('classes', 0)}): linmix.nn holds the language model only; train and "
                             "score classifiers with `linmix train --task` and `linmix eval`")
        if tensors is not None:
            missing = sorted(set(init) - set(tensors))
            extra = sorted(set(tensors) - set(init))
            if missing or extra:
                raise ValueError(f"linmix.nn: tensors do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
            for n, t in init.items():
                if tuple(tensors[n].shape) != tuple(t.shape):
                    raise ValueError(f"linmix.nn: tensor '{n}' has shape {list(tensors[n].shape)}, the config's is {list(t.shape)}")
            init = {n: tensors[n].float() for n in init}
        self.tokenizer = tokenizer
        cfg = self.config
        rms = cfg.get("norm", "layernorm") == "rmsnorm"
        self.emb = _Params({"weight": init["emb.weight"]})
        self.pos = _Params({"weight": init["pos.weight"]}) if "pos.weight" in init else None
        self.blocks = nn.ModuleList(Block(i, cfg, init) for i in range(cfg["n_layer"]))
        self.ln_out = Norm(rms, {n[7:]: t for n, t in init.items() if n.startswith("ln_out.")})
        self.head = _Params({"weight": init["head.weight"]})

    @classmethod
    def from_checkpoint(cls, path):
        """A `linmix train` checkpoint, or an RWKV-4/5/6/7 / Mamba / Mamba-2 one (as linmix reads them)."""
        ck = _C.load_checkpoint(str(path))
        return cls(ck["config"], tensors=ck["tensors"], tokenizer=ck["tokenizer"] or "bytes")

    def tensors(self):
        """Every parameter by its checkpoint name."""
        out = {"emb.weight": self.emb.get("weight"), "head.weight": self.head.get("weight")}
        if self.pos is not None:
            out["pos.weight"] = self.pos.get("weight")
        out.update({"ln_out." + n: t for n, t in self.ln_out.named().items()})
        for i, b in enumerate(self.blocks):
            for name, mod in (("ln0", b.ln0), ("ln1", b.ln1), ("ln2", b.ln2)):
                if mod is not None:
                    out.update({f"blocks.{i}.{name}.{n}": t for n, t in mod.named().items()})
            for mod in (b.att, b.ffn):
                if mod is not None:
                    out.update({f"blocks.{i}.{n}": t for n, t in mod.named().items()})
        return out

    def save_checkpoint(self, path, tokenizer=None):
        """A linmix checkpoint (written to a temporary file, then renamed) that `linmix generate`,
        `logits`, `eval` and `train --init` read."""
        _C.save_checkpoint(str(path), json.dumps(self.config), {n: t.detach().float().contiguous() for n, t in self.tensors().items()},
                           tokenizer or self.tokenizer)

    def forward(self, tokens):
        """tokens: int64 [B, T] -> logits [B, T, V]."""
        if tokens.dim() != 2:
            raise ValueError(f"linmix.nn: tokens must be [B, T], found {list(tokens.shape)}")
        V = self.config["vocab"]
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"linmix.nn: a token is outside the vocabulary [0, {V})")
        x = self.emb.get("weight")[tokens]
        if self.pos is not None:
            T = tokens.shape[1]
            if T > self.pos.get("weight").shape[0]:
                raise ValueError(f"linmix.nn: {T} tokens, the model's learned positions cover {self.pos.get('weight').shape[0]}")
            x = x + self.pos.get("weight")[:T]
        carry = []  # RWKV-7's v_first
        for i, b in enumerate(self.blocks):
            if b.ln0 is not None:
                x = b.ln0(x)
            x = b(x, carry)
        return self.ln_out(x) @ self.head.get("weight").T
