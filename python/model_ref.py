"""An independent float64 PyTorch implementation of linmix's language model (README "The
language model"; MIXERS.md for the mixers, through python/oracle.py), for autograd checks of
linmix's hand-written whole-model backward. Weights and config come from a linmix checkpoint."""
import json
import math

import torch
import torch.nn.functional as F

import oracle


def _ln(x, p, name):
    return F.layer_norm(x, (x.shape[-1],), p[name + ".weight"], p[name + ".bias"], eps=1e-5)


def _shift(x):  # x[b, t-1], zeros at t = 0
    return F.pad(x, (0, 0, 1, 0))[:, :-1]


def _attention_like(cfg):
    return any(l["mixer"] in ("softmax", "linear", "performer", "flow", "norm_linear", "block_softmax", "flash")
               for l in cfg["layers"])


def loss(cfg, p, inputs, targets):
    """cfg: the checkpoint's config dict; p: name -> float64 tensor (requires_grad as wanted);
    inputs, targets: LongTensor [B, T] (targets < 0 ignored). Returns the mean cross-entropy."""
    B, T = inputs.shape
    C, H = cfg["d_model"], cfg["n_head"]
    x = p["emb.weight"][inputs]
    if cfg.get("pos_emb", _attention_like(cfg)):
        x = x + p["pos.weight"][:T]
    if cfg["ln0"]:
        x = _ln(x, p, "blocks.0.ln0")
    for i, layer in enumerate(cfg["layers"]):
        m, prm = layer["mixer"], layer.get("params", {})
        P = lambda n: p[f"blocks.{i}.{n}"]  # noqa: E731
        a = _ln(x, p, f"blocks.{i}.ln1")
        if m == "rwkv4":
            xx = _shift(a)
            mix = lambda n: a * P(n) + xx * (1 - P(n))  # noqa: E731
            r = torch.sigmoid(mix("att.time_mix_r") @ P("att.receptance.weight").T)
            k = mix("att.time_mix_k") @ P("att.key.weight").T
            v = mix("att.time_mix_v") @ P("att.value.weight").T
            wkv = oracle.rwkv4(k, v, torch.exp(P("att.time_decay")), P("att.time_first"))
            out = (r * wkv) @ P("att.output.weight").T
        elif m == "s4d":
            y = oracle.s4d(a, P("att.log_dt"), -torch.exp(P("att.log_A_re")), P("att.A_im"), P("att.C_re"),
                           P("att.C_im"), P("att.D"))
            out = F.gelu(y, approximate="tanh") @ P("att.o.weight").T
        elif m == "flash":
            U = F.silu(a @ P("att.wu.weight").T + P("att.wu.bias"))
            V = F.silu(a @ P("att.wv.weight").T + P("att.wv.bias"))
            Z = F.silu(a @ P("att.wz.weight").T + P("att.wz.bias"))
            g, b = P("att.gamma"), P("att.beta")
            A = oracle.flash(Z * g[0] + b[0], Z * g[1] + b[1], Z * g[2] + b[2], Z * g[3] + b[3], V, True,
                             int(prm.get("group", 256)))
            out = (U * A) @ P("att.o.weight").T
        elif m == "mamba":
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
            out = oracle.mamba(xs, delta, -torch.exp(P("att.A_log")), dbc[..., R:R + N], dbc[..., R + N:],
                               D=P("att.D"), z=z, delta_bias=P("att.dt_proj.bias"),
                               delta_softplus=bool(int(prm.get("delta_softplus", 1)))) @ P("att.out_proj.weight").T
        else:
            q, k, v = (a @ P(f"att.{n}.weight").T for n in "qkv")
            if m.startswith("aft"):
                if m == "aft_full":
                    y = oracle.aft_full(q, k, v, P("att.w"), True)
                elif m == "aft_local":
                    y = oracle.aft_local(q, k, v, P("att.w"), True, int(prm["window"]))
                elif m == "aft_simple":
                    y = oracle.aft_simple(q, k, v, True)
                else:
                    y = oracle.aft_conv(q, k, v, P("att.u"), True)
            else:
                hd = lambda t: t.reshape(B, T, H, C // H)  # noqa: E731
                q, k, v = hd(q), hd(k), hd(v)
                if m == "softmax":
                    y = oracle.softmax(q, k, v, True, float(prm["scale"]) if "scale" in prm else None,
                                       int(prm.get("window", 0)))
                elif m == "linear":
                    y = oracle.linear(q, k, v, True)
                elif m == "performer":
                    y = oracle.performer(q, k, v, P("att.proj"), True)
                elif m == "flow":
                    y = oracle.flow(q, k, v, True)
                elif m == "norm_linear":
                    y = oracle.norm_linear(q, k, v, True)
                else:
                    y = oracle.block_softmax(q, k, v, True, int(prm.get("block", 64)))
                y = y.reshape(B, T, C)
            out = y @ P("att.o.weight").T
        x = x + out
        b2 = _ln(x, p, f"blocks.{i}.ln2")
        if cfg["channel_mix"] == "rwkv":
            xx = _shift(b2)
            xk = b2 * P("ffn.time_mix_k") + xx * (1 - P("ffn.time_mix_k"))
            xr = b2 * P("ffn.time_mix_r") + xx * (1 - P("ffn.time_mix_r"))
            kk = torch.relu(xk @ P("ffn.key.weight").T) ** 2
            x = x + torch.sigmoid(xr @ P("ffn.receptance.weight").T) * (kk @ P("ffn.value.weight").T)
        else:
            h = F.gelu(b2 @ P("mlp.fc.weight").T + P("mlp.fc.bias"), approximate="tanh")
            x = x + h @ P("mlp.proj.weight").T + P("mlp.proj.bias")
    logits = _ln(x, p, "ln_out") @ p["head.weight"].T
    return F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1)
