"""Independent float64 PyTorch evaluation of docs/MIXERS.md, written from the text of
that file (not from linmix's C++). Where the C++ reference materialises T x T weights, this
oracle prefers other equivalent forms (cumulative sums, explicit recurrences, masked
softmax over a 4-D logit tensor) so the two are not the same code twice.

Every function takes float64 torch tensors in MIXERS.md layouts and returns y."""
import math

import torch

F = torch.nn.functional


def softmax(q, k, v, causal, scale=None, window=0):
    # q, k: [B,T,H,D]; v: [B,T,H,E]
    T, D = q.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = torch.arange(T).view(T, 1)
    s = torch.arange(T).view(1, T)
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed &= s <= t
    if window > 0:
        allowed &= (t - s < window) & (s - t < window)
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshe->bthe", torch.softmax(logits, dim=-1), v)


def phi_elu(x):
    return F.elu(x) + 1.0


def linear(q, k, v, causal, eps=1e-6):
    # S = sum_s phi(k_s) v_s^T, z = sum_s phi(k_s); prefix sums when causal.
    fq, fk = phi_elu(q), phi_elu(k)
    kv = torch.einsum("bshd,bshe->bshde", fk, v)
    if causal:
        S, z = kv.cumsum(dim=1), fk.cumsum(dim=1)
        num = torch.einsum("bthd,bthde->bthe", fq, S)
        den = torch.einsum("bthd,bthd->bth", fq, z)
    else:
        S, z = kv.sum(dim=1), fk.sum(dim=1)
        num = torch.einsum("bthd,bhde->bthe", fq, S)
        den = torch.einsum("bthd,bhd->bth", fq, z)
    return num / (den + eps).unsqueeze(-1)


def _aft(q, k, v, w_tsc, causal):
    # w_tsc: [T,T] or [T,T,C] bias; logits[b,t,s,c] = k[b,s,c] + w[t,s(,c)]
    T = q.shape[1]
    if w_tsc.dim() == 2:
        w_tsc = w_tsc.unsqueeze(-1)
    logits = k.unsqueeze(1) + w_tsc.unsqueeze(0)
    if causal:
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # s > t
        logits = logits.masked_fill(mask.view(1, T, T, 1), float("-inf"))
    weights = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (weights * v.unsqueeze(1)).sum(dim=2)


def aft_full(q, k, v, w, causal):
    T = q.shape[1]
    return _aft(q, k, v, w[:T, :T], causal)


def aft_local(q, k, v, w, causal, window):
    T = q.shape[1]
    t = torch.arange(T).view(T, 1)
    s = torch.arange(T).view(1, T)
    near = (t - s).abs() < window
    return _aft(q, k, v, torch.where(near, w[:T, :T], torch.zeros_like(w[:T, :T])), causal)


def aft_simple(q, k, v, causal):
    T = q.shape[1]
    return _aft(q, k, v, torch.zeros(T, T, dtype=q.dtype), causal)


def aft_conv(q, k, v, u, causal):
    T, C = q.shape[1], q.shape[2]
    H, K = u.shape
    diff = torch.arange(T).view(T, 1) - torch.arange(T).view(1, T)  # t - s
    idx = diff if causal else diff + (K - 1) // 2
    valid = (idx >= 0) & (idx < K)
    w_h = torch.zeros(H, T, T, dtype=q.dtype)
    for h in range(H):
        w_h[h][valid] = u[h][idx[valid]]
    w_tsc = w_h.repeat_interleave(C // H, dim=0).permute(1, 2, 0)  # [T,T,C]
    return _aft(q, k, v, w_tsc, causal)


def rwkv4(k, v, w, u):
    # The plain (unstabilised) recurrence in float64, token by token:
    #   y_t = (a + e^{u+k_t} v_t) / (b + e^{u+k_t});  a <- e^{-w} a + e^{k_t} v_t (same for b)
    # float64 holds e^{+-60 * few} easily, so no max-shift is needed here; where the
    # stabilised C++ scan and this literal recurrence agree, both are right.
    B, T, C = k.shape
    a = torch.zeros(B, C, dtype=k.dtype)
    b = torch.zeros(B, C, dtype=k.dtype)
    decay = torch.exp(-w)
    ys = []
    for t in range(T):
        ek = torch.exp(k[:, t])
        bonus = torch.exp(u + k[:, t])
        ys.append((a + bonus * v[:, t]) / (b + bonus))
        a = decay * a + ek * v[:, t]
        b = decay * b + ek
    return torch.stack(ys, dim=1)


def performer(q, k, v, proj, causal):
    # phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M), x' = x D^(-1/4); no shifts (float64)
    D, M = q.shape[-1], proj.shape[0]

    def phi(x):
        xs = x * D ** -0.25
        return torch.exp(xs @ proj.T - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(M)

    fq, fk = phi(q), phi(k)
    kv = torch.einsum("bshm,bshe->bshme", fk, v)
    if causal:
        S, z = kv.cumsum(dim=1), fk.cumsum(dim=1)
        return torch.einsum("bthm,bthme->bthe", fq, S) / torch.einsum("bthm,bthm->bth", fq, z).unsqueeze(-1)
    S, z = kv.sum(dim=1), fk.sum(dim=1)
    return torch.einsum("bthm,bhme->bthe", fq, S) / torch.einsum("bthm,bhm->bth", fq, z).unsqueeze(-1)


def flow(q, k, v, causal, eps=1e-6):
    # MIXERS.md "flow", as tensor algebra (the official Flowformer code's shape of it)
    Q, K = torch.sigmoid(q), torch.sigmoid(k)
    T = q.shape[1]
    dot = lambda a, b: (a * b).sum(-1)  # noqa: E731  over D, broadcasting [B,T,H,D]
    if not causal:
        I = 1.0 / dot(Q + eps, K.sum(1, keepdim=True) + eps)
        O = 1.0 / dot(K + eps, Q.sum(1, keepdim=True) + eps)
        Ihat = dot(Q + eps, (K * O.unsqueeze(-1)).sum(1, keepdim=True) + eps)
        Ohat = torch.clamp(dot(K + eps, (Q * I.unsqueeze(-1)).sum(1, keepdim=True) + eps), -1.0, 1.0)
        alloc = torch.sigmoid(Ihat)
        comp = torch.softmax(Ohat, dim=1) * T
        kv = torch.einsum("bthd,bthe->bhde", K, v * comp.unsqueeze(-1))
        return torch.einsum("bthd,bhde->bthe", Q * I.unsqueeze(-1), kv) * alloc.unsqueeze(-1)
    r = torch.arange(1, T + 1, dtype=q.dtype).view(1, T, 1)
    I = r / dot(Q + eps, K.cumsum(1) + eps)
    O = r / dot(K + eps, Q.cumsum(1) + eps)
    Ihat = dot(Q + eps, (K * O.unsqueeze(-1)).cumsum(1) + eps) / r
    Ohat = torch.clamp(dot(K + eps, (Q * I.unsqueeze(-1)).cumsum(1) + eps) / r, -1.0, 1.0)
    alloc = torch.sigmoid(Ihat)
    comp = torch.exp(Ohat) / torch.exp(Ohat).cumsum(1) * r
    kv = torch.einsum("bthd,bthe->bthde", K, v * comp.unsqueeze(-1)).cumsum(1)
    return torch.einsum("bthd,bthde->bthe", Q * (I / r).unsqueeze(-1), kv) * alloc.unsqueeze(-1)


def flash(quad_q, quad_k, lin_q, lin_k, v, causal, group):
    # the paper's mixed-chunk pseudo-code: pad T to a multiple of G, reshape into groups
    B, T, S = quad_q.shape
    G = group
    pad = (-T) % G
    P = lambda x: F.pad(x, (0, 0, 0, pad)).view(B, (T + pad) // G, G, x.shape[-1])  # noqa: E731
    qq, qk, lq, lk, vv = P(quad_q), P(quad_k), P(lin_q), P(lin_k), P(v)
    kern = torch.relu(torch.einsum("bgns,bgms->bgnm", qq, qk) / G) ** 2
    if causal:
        kern = kern * torch.tril(torch.ones(G, G, dtype=q_dtype(quad_q)))
    quad = torch.einsum("bgnm,bgme->bgne", kern, vv)
    if causal:
        lin_kv = torch.einsum("bgns,bgne->bgse", lk, vv) / G
        lin_kv = lin_kv.cumsum(1) - lin_kv  # exclusive: groups before g
        lin = torch.einsum("bgns,bgse->bgne", lq, lin_kv)
    else:
        lin_kv = torch.einsum("bgns,bgne->bse", lk, vv) / T
        lin = torch.einsum("bgns,bse->bgne", lq, lin_kv)
    return (quad + lin).reshape(B, T + pad, -1)[:, :T]


def q_dtype(x):
    return x.dtype


def norm_linear(q, k, v, causal, eps=1e-6):
    fq, fk = phi_elu(q), phi_elu(k)
    kv = torch.einsum("bshd,bshe->bshde", fk, v)
    if causal:
        o = torch.einsum("bthd,bthde->bthe", fq, kv.cumsum(dim=1))
    else:
        o = torch.einsum("bthd,bhde->bthe", fq, kv.sum(dim=1))
    return o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps)


def block_softmax(q, k, v, causal, block):
    T = q.shape[1]
    parts = [softmax(q[:, i:i + block], k[:, i:i + block], v[:, i:i + block], causal) for i in range(0, T, block)]
    return torch.cat(parts, dim=1)


def s4d(u, log_dt, A_re, A_im, C_re, C_im, D):
    # kernel by a Vandermonde product, convolution by torch.fft (zero-padded to 2T)
    T = u.shape[1]
    dt = torch.exp(log_dt).unsqueeze(-1)  # [C,1]
    A = torch.complex(A_re, A_im)
    Cc = torch.complex(C_re, C_im)
    dtA = dt * A  # [C,N]
    Ct = Cc * (torch.exp(dtA) - 1.0) / A
    l = torch.arange(T, dtype=u.dtype)
    K = 2 * torch.einsum("cn,cnl->cl", Ct, torch.exp(dtA.unsqueeze(-1) * l)).real  # [C,T]
    n = 2 * T
    Uf = torch.fft.rfft(u.transpose(1, 2), n=n)  # [B,C,F]
    Kf = torch.fft.rfft(K, n=n)
    y = torch.fft.irfft(Uf * Kf, n=n)[..., :T].transpose(1, 2)
    return y + D * u


def mamba(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=True):
    # the selective_scan_ref recurrence, vectorised over batch, channels and state
    if delta_bias is not None:
        delta = delta + delta_bias
    dt = F.softplus(delta) if delta_softplus else delta
    dA = torch.exp(torch.einsum("btc,cn->btcn", dt, A))
    dBu = torch.einsum("btc,btn,btc->btcn", dt, Bm, u)
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        ys.append(torch.einsum("bcn,bn->bc", h, Cm[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y


def fnet(x):
    return torch.fft.fft2(x, dim=(1, 2)).real


def _num(p, name, default):
    return float(p[name]) if name in p else default


# The oracle of every mechanism, keyed by registry name: fn(x, causal, params) -> y, where x
# holds the call's float64 tensors by their MIXERS.md names and params the call's KEY=VALUE
# strings (defaults as MIXERS.md). tests/oracle_test.py fails naming any registry mechanism
# missing here.
ORACLES = {
    "softmax": lambda x, c, p: softmax(x["q"], x["k"], x["v"], c, scale=float(p["scale"]) if "scale" in p else None,
                                       window=int(_num(p, "window", 0))),
    "linear": lambda x, c, p: linear(x["q"], x["k"], x["v"], c, eps=_num(p, "eps", 1e-6)),
    "aft_full": lambda x, c, p: aft_full(x["q"], x["k"], x["v"], x["w"], c),
    "aft_local": lambda x, c, p: aft_local(x["q"], x["k"], x["v"], x["w"], c, int(p["window"])),
    "aft_simple": lambda x, c, p: aft_simple(x["q"], x["k"], x["v"], c),
    "aft_conv": lambda x, c, p: aft_conv(x["q"], x["k"], x["v"], x["u"], c),
    "rwkv4": lambda x, c, p: rwkv4(x["k"], x["v"], x["w"], x["u"]),
    "performer": lambda x, c, p: performer(x["q"], x["k"], x["v"], x["proj"], c),
    "flow": lambda x, c, p: flow(x["q"], x["k"], x["v"], c, eps=_num(p, "eps", 1e-6)),
    "flash": lambda x, c, p: flash(x["quad_q"], x["quad_k"], x["lin_q"], x["lin_k"], x["v"], c,
                                   int(_num(p, "group", 256))),
    "norm_linear": lambda x, c, p: norm_linear(x["q"], x["k"], x["v"], c, eps=_num(p, "eps", 1e-6)),
    "block_softmax": lambda x, c, p: block_softmax(x["q"], x["k"], x["v"], c, int(_num(p, "block", 64))),
    "s4d": lambda x, c, p: s4d(**x),
    "mamba": lambda x, c, p: mamba(**x, delta_softplus=_num(p, "delta_softplus", 1) != 0),
    "fnet": lambda x, c, p: fnet(x["x"]),
}
