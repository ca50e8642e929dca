"""An independent PyTorch implementation of the Mamba language model (Gu & Dao 2023, Fig. 3 and
Alg. 2; the block as Hugging Face's MambaForCausalLM publishes it), token by token in float64
with the literal selective-scan recurrence. Weights by Hugging Face's names:
  backbone.embeddings.weight [V,C]; per layer backbone.layers.N.norm.weight [C] (RMSNorm, eps
  1e-5) and backbone.layers.N.mixer.{in_proj.weight [2E,C], conv1d.weight [E,1,K], conv1d.bias
  [E], x_proj.weight [R+2S,E], dt_proj.weight [E,R], dt_proj.bias [E], A_log [E,S], D [E],
  out_proj.weight [C,E]}; backbone.norm_f.weight; lm_head.weight [V,C] (absent: tied to the
  embeddings).
Per token: h = x + Mixer(RMSNorm(x)); Mixer: [u, z] = in_proj(x); u = silu(causal depthwise
conv(u) + bias); [dt, B, C] = x_proj(u); dt = softplus(dt_proj(dt) + bias); for every channel
e and state n: s[e,n] = exp(dt[e] A[e,n]) s[e,n] + dt[e] B[n] u[e] with A = -exp(A_log);
y[e] = sum_n s[e,n] C[n] + D[e] u[e]; out = out_proj(y silu(z))."""
import math

import torch
import torch.nn.functional as F

D64 = torch.float64


def dims(w):
    V, C = w["backbone.embeddings.weight"].shape
    L = 0
    while f"backbone.layers.{L}.norm.weight" in w:
        L += 1
    E, S = w["backbone.layers.0.mixer.A_log"].shape
    R = w["backbone.layers.0.mixer.dt_proj.weight"].shape[1]
    K = w["backbone.layers.0.mixer.conv1d.weight"].shape[-1]
    return V, C, L, E, S, R, K


def rms(x, wt):
    return x / torch.sqrt((x * x).mean() + 1e-5) * wt


def forward(w, tokens, state=None):
    """Returns (logits [T, V], state): per layer conv (the last K-1 conv inputs [K-1, E]) and
    ssm [E, S]."""
    V, C, L, E, S, R, K = dims(w)
    st = [{k: v.clone() for k, v in s.items()} for s in state] if state is not None else \
        [{"conv": torch.zeros(K - 1, E, dtype=D64), "ssm": torch.zeros(E, S, dtype=D64)} for _ in range(L)]
    head = w.get("lm_head.weight", w["backbone.embeddings.weight"])
    out = []
    for tok in tokens:
        x = w["backbone.embeddings.weight"][tok]
        for i in range(L):
            p = f"backbone.layers.{i}.mixer."
            s = st[i]
            a = rms(x, w[f"backbone.layers.{i}.norm.weight"])
            uz = w[p + "in_proj.weight"] @ a
            u, z = uz[:E], uz[E:]
            window = torch.cat([s["conv"], u[None]], 0)  # [K, E], oldest first
            s["conv"] = window[1:]
            cw = w[p + "conv1d.weight"].reshape(E, K)
            u = F.silu((window.T * cw).sum(1) + w[p + "conv1d.bias"])
            dbc = w[p + "x_proj.weight"] @ u
            dt = F.softplus(w[p + "dt_proj.weight"] @ dbc[:R] + w[p + "dt_proj.bias"])
            Bm, Cm = dbc[R:R + S], dbc[R + S:]
            A = -torch.exp(w[p + "A_log"])
            s["ssm"] = torch.exp(dt[:, None] * A) * s["ssm"] + (dt * u)[:, None] * Bm[None, :]
            y = s["ssm"] @ Cm + w[p + "D"] * u
            x = x + w[p + "out_proj.weight"] @ (y * F.silu(z))
        out.append(head @ rms(x, w["backbone.norm_f.weight"]))
    return torch.stack(out), st


def greedy(w, prompt, n):
    logits, st = forward(w, prompt)
    res, nxt = [], int(torch.argmax(logits[-1]))
    for _ in range(n):
        res.append(nxt)
        lg, st = forward(w, [nxt], st)
        nxt = int(torch.argmax(lg[-1]))
    return res


def random_mamba(V, C, L, S=8, expand=2, R=None, K=4, seed=0, tied=False):
    """Random-weight MambaForCausalLM state dict (HF names), float64, with dt in the alive range
    (softplus^-1 of a log-uniform dt in [1e-3, 1e-1] as Mamba initialises it, A = -(1..S))."""
    E, R = expand * C, R or math.ceil(C / 16)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=D64) * scale  # noqa: E731
    w = {"backbone.embeddings.weight": r(V, C), "backbone.norm_f.weight": 1 + r(C, scale=0.1)}
    if not tied:
        w["lm_head.weight"] = r(V, C, scale=0.5)
    for i in range(L):
        p = f"backbone.layers.{i}."
        w[p + "norm.weight"] = 1 + r(C, scale=0.1)
        m = p + "mixer."
        w[m + "in_proj.weight"] = r(2 * E, C, scale=1 / math.sqrt(C))
        w[m + "conv1d.weight"] = r(E, 1, K, scale=0.5)
        w[m + "conv1d.bias"] = r(E, scale=0.1)
        w[m + "x_proj.weight"] = r(R + 2 * S, E, scale=1 / math.sqrt(E))
        w[m + "dt_proj.weight"] = r(E, R, scale=1 / math.sqrt(R))
        dt = torch.exp(math.log(1e-3) + torch.rand(E, generator=g, dtype=D64) * math.log(100))
        w[m + "dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))
        w[m + "A_log"] = torch.log(torch.arange(1, S + 1, dtype=D64)).repeat(E, 1)
        w[m + "D"] = 1 + r(E, scale=0.1)
        w[m + "out_proj.weight"] = r(C, E, scale=1 / math.sqrt(E))
    return w
