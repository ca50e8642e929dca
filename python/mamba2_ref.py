"""An independent PyTorch implementation of the Mamba-2 language model (Dao & Gu 2024, the SSD
recurrence of Sec. 3 and the Mamba-2 block of Fig. 6; the block as mamba_ssm's Mamba2 module and
Hugging Face's Mamba2ForCausalLM publish it, with their defaults), token by token in float64 with
the literal recurrence. Weights by Hugging Face's names (mamba_ssm's differ only in
backbone.embedding):
  backbone.embeddings.weight [V,C]; per layer backbone.layers.N.norm.weight [C] (RMSNorm, eps
  1e-5) and backbone.layers.N.mixer.{in_proj.weight [2E+2GS+H, C], conv1d.weight [E+2GS,1,K],
  conv1d.bias [E+2GS], dt_bias [H], A_log [H], D [H], norm.weight [E], out_proj.weight [C,E]};
  backbone.norm_f.weight; lm_head.weight [V,C] (absent: tied to the embeddings).
Per token: h = x + Mixer(RMSNorm(x)); Mixer: [z, xBC, dt] = in_proj(x) (that order); xBC =
silu(causal depthwise conv(xBC) + bias); [u, B, C] = xBC (widths E, G S, G S); per head h of
P = E / H channels, reading group g = h // (H / G): dt = softplus(dt_h + dt_bias_h),
s[h,p,n] = exp(dt A_h) s[h,p,n] + dt u[h,p] B[g,n] with A = -exp(A_log), y[h,p] = sum_n
s[h,p,n] C[g,n] + D_h u[h,p]; then the gated RMSNorm (norm_before_gate = False): v = y silu(z),
normalised over each of the G groups of E / G channels, times norm.weight; out = out_proj(v)."""
import math

import torch
import torch.nn.functional as F

D64 = torch.float64


def dims(w, groups=1):
    V, C = w["backbone.embeddings.weight"].shape
    L = 0
    while f"backbone.layers.{L}.norm.weight" in w:
        L += 1
    p = "backbone.layers.0.mixer."
    H = w[p + "A_log"].shape[0]
    E = w[p + "norm.weight"].shape[0]
    Wc, _, K = w[p + "conv1d.weight"].shape
    S = (Wc - E) // (2 * groups)
    return V, C, L, E, H, groups, S, K


def rms(x, wt):
    return x / torch.sqrt((x * x).mean() + 1e-5) * wt


def forward(w, tokens, state=None, groups=1):
    """Returns (logits [T, V], state): per layer conv (the last K-1 conv inputs [K-1, E+2GS]) and
    ssm [H, P, S] (mamba_ssm's ssm_state layout)."""
    V, C, L, E, H, G, S, K = dims(w, groups)
    P, Wc = E // H, E + 2 * G * S
    st = [{k: v.clone() for k, v in s.items()} for s in state] if state is not None else \
        [{"conv": torch.zeros(K - 1, Wc, dtype=D64), "ssm": torch.zeros(H, P, S, dtype=D64)} for _ in range(L)]
    head = w.get("lm_head.weight", w["backbone.embeddings.weight"])
    out = []
    for tok in tokens:
        x = w["backbone.embeddings.weight"][tok]
        for i in range(L):
            p = f"backbone.layers.{i}.mixer."
            s = st[i]
            a = rms(x, w[f"backbone.layers.{i}.norm.weight"])
            zxbcdt = w[p + "in_proj.weight"] @ a
            z, xbc, dt = zxbcdt[:E], zxbcdt[E:E + Wc], zxbcdt[E + Wc:]
            window = torch.cat([s["conv"], xbc[None]], 0)  # [K, Wc], oldest first
            s["conv"] = window[1:]
            xbc = F.silu((window.T * w[p + "conv1d.weight"].reshape(Wc, K)).sum(1) + w[p + "conv1d.bias"])
            u, Bm, Cm = xbc[:E].reshape(H, P), xbc[E:E + G * S].reshape(G, S), xbc[E + G * S:].reshape(G, S)
            A = -torch.exp(w[p + "A_log"])
            y = torch.empty(H, P, dtype=D64)
            for h in range(H):
                g = h // (H // G)
                d = F.softplus(dt[h] + w[p + "dt_bias"][h])
                s["ssm"][h] = torch.exp(d * A[h]) * s["ssm"][h] + d * torch.outer(u[h], Bm[g])
                y[h] = s["ssm"][h] @ Cm[g] + w[p + "D"][h] * u[h]
            v = (y.reshape(E) * F.silu(z)).reshape(G, E // G)
            v = (v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5)).reshape(E) * w[p + "norm.weight"]
            x = x + w[p + "out_proj.weight"] @ v
        out.append(head @ rms(x, w["backbone.norm_f.weight"]))
    return torch.stack(out), st


def greedy(w, prompt, n, groups=1):
    logits, st = forward(w, prompt, groups=groups)
    res, nxt = [], int(torch.argmax(logits[-1]))
    for _ in range(n):
        res.append(nxt)
        lg, st = forward(w, [nxt], st, groups=groups)
        nxt = int(torch.argmax(lg[-1]))
    return res


def random_mamba2(V, C, L, S=8, H=4, G=1, expand=2, K=4, seed=0, tied=False):
    """Random-weight Mamba2ForCausalLM state dict (HF names), float64, with dt in the alive range
    (softplus^-1 of a log-uniform dt in [1e-3, 1e-1] and A uniform in [1, 16], as mamba_ssm
    initialises them)."""
    E = expand * C
    Wc = E + 2 * G * S
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=D64) * scale  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=D64)  # noqa: E731
    w = {"backbone.embeddings.weight": r(V, C), "backbone.norm_f.weight": 1 + r(C, scale=0.1)}
    if not tied:
        w["lm_head.weight"] = r(V, C, scale=0.5)
    for i in range(L):
        p = f"backbone.layers.{i}."
        w[p + "norm.weight"] = 1 + r(C, scale=0.1)
        m = p + "mixer."
        w[m + "in_proj.weight"] = r(E + Wc + H, C, scale=1 / math.sqrt(C))
        w[m + "conv1d.weight"] = r(Wc, 1, K, scale=0.5)
        w[m + "conv1d.bias"] = r(Wc, scale=0.1)
        dt = torch.exp(math.log(1e-3) + u(H) * math.log(100))
        w[m + "dt_bias"] = dt + torch.log(-torch.expm1(-dt))
        w[m + "A_log"] = torch.log(1 + 15 * u(H))
        w[m + "D"] = 1 + r(H, scale=0.1)
        w[m + "norm.weight"] = 1 + r(E, scale=0.1)
        w[m + "out_proj.weight"] = r(C, E, scale=1 / math.sqrt(E))
    return w
