"""Independent float64 PyTorch evaluation of docs/MIXERS.md, written from the text of
that file (not from linmix's C++). Where the C++ reference materialises T x T weights, this
oracle prefers other equivalent forms (cumulative sums, explicit recurrences, masked
softmax over a 4-D logit tensor) so the two are not the same code twice.

Every function takes float64 torch tensors in MIXERS.md layouts and returns y."""
import math

import torch

F = torch.nn.functional


def softmax(q, k, v, causal, scale=None, window=0, k0=None, v0=None, final=False, block=0):
    # q, k: [B,T,H,D]; v: [B,T,H,E]. From a key/value cache k0 [B,L,H,D], v0 [B,L,H,E] (the rows
    # of the L tokens before 0): query t is position L + t and sees the cache's rows as positions
    # 0..L-1; with final also the cache after the last token (every row; the last window - 1 with
    # a window; the rows of the unfinished block with block > 0, block_softmax's).
    T, D = q.shape[1], q.shape[3]
    L = 0 if k0 is None else k0.shape[1]
    if k0 is not None:
        k, v = torch.cat([k0, k], 1), torch.cat([v0, v], 1)
    n = L + T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
    t = torch.arange(T).view(T, 1) + L
    s = torch.arange(n).view(1, n)
    allowed = torch.ones(T, n, dtype=torch.bool)
    if block > 0:
        allowed &= t // block == s // block
    if causal:
        allowed &= s <= t
    if window > 0:
        allowed &= (t - s < window) & (s - t < window)
    logits = logits.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhts,bshe->bthe", torch.softmax(logits, dim=-1), v)
    if not final:
        return y
    keep = n % block if block > 0 else min(n, window - 1) if window > 0 else n
    return y, {"state.k": k[:, n - keep:], "state.v": v[:, n - keep:]}


def phi_elu(x):
    return F.elu(x) + 1.0


def linear(q, k, v, causal, eps=1e-6, S0=None, z0=None, final=False):
    # S = sum_s phi(k_s) v_s^T, z = sum_s phi(k_s); prefix sums when causal, from the state
    # (S0, z0) before token 0; with final also the state after the last token.
    fq, fk = phi_elu(q), phi_elu(k)
    kv = torch.einsum("bshd,bshe->bshde", fk, v)
    if causal:
        S, z = kv.cumsum(dim=1), fk.cumsum(dim=1)
        if S0 is not None:
            S = S + S0.unsqueeze(1)
        if z0 is not None:
            z = z + z0.unsqueeze(1)
        num = torch.einsum("bthd,bthde->bthe", fq, S)
        den = torch.einsum("bthd,bthd->bth", fq, z)
    else:
        S, z = kv.sum(dim=1), fk.sum(dim=1)
        num = torch.einsum("bthd,bhde->bthe", fq, S)
        den = torch.einsum("bthd,bhd->bth", fq, z)
    y = num / (den + eps).unsqueeze(-1)
    return (y, S[:, -1], z[:, -1]) if final else y


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


def aft_full(q, k, v, w, causal, k0=None, v0=None, final=False):
    # From a cache k0, v0 [B,L,C] (every row before token 0): query t is position L + t, its
    # bias row w[L + t]; with final also the cache after the last token (all L + T rows).
    T = q.shape[1]
    if k0 is None and not final:
        return _aft(q, k, v, w[:T, :T], causal)
    L = 0 if k0 is None else k0.shape[1]
    if k0 is not None:
        k, v = torch.cat([k0, k], 1), torch.cat([v0, v], 1)
    n = L + T
    logits = k.unsqueeze(1) + w[L:n, :n].unsqueeze(0).unsqueeze(-1)  # [B,T,n,C]
    later = torch.arange(n).view(1, n) > torch.arange(L, n).view(T, 1)
    logits = logits.masked_fill(later.view(1, T, n, 1), float("-inf"))
    y = torch.sigmoid(q) * (torch.softmax(logits, dim=2) * v.unsqueeze(1)).sum(dim=2)
    return (y, {"state.k": k, "state.v": v}) if final else y


def aft_ring_state(q, k, v, bias, lo, st=None, final=False, with_pos=True):
    # Causal aft_local / aft_conv from a state (MIXERS.md): st holds the far sums num, den, max
    # [B,C] (unscaled: num e^{max}, den e^{max}), the ring k, v [B,L,C] (positions pos - L ..
    # pos - 1) and, for aft_local, pos [B]; bias(t, s) [len(t), len(s), C] at absolute positions.
    # Every position sees the far sums plus the ring and its own past with their bias; with final
    # also the state after the last token: the last min(L + T, lo) rows as the ring, the rows
    # before them folded into the sums (max the largest exponent), pos + T.
    B, T, C = q.shape
    st = st or {}
    L = st["state.k"].shape[1] if "state.k" in st else 0
    n, keep = L + T, min(L + T, lo)
    ys, fin = [], {n_: [] for n_ in ("state.num", "state.den", "state.max", "state.k", "state.v", "state.pos")}
    for b in range(B):
        pos = int(st["state.pos"][b].item()) if "state.pos" in st else L
        K = torch.cat([st["state.k"][b], k[b]], 0) if L else k[b]  # [n,C], positions pos - L ..
        V = torch.cat([st["state.v"][b], v[b]], 0) if L else v[b]
        t = torch.arange(pos, pos + T)
        s = torch.arange(pos - L, pos + T)
        logits = K.unsqueeze(0) + bias(t, s)  # [T,n,C]
        logits = logits.masked_fill((s.view(1, n) > t.view(T, 1)).unsqueeze(-1), float("-inf"))
        if "state.num" in st:
            N0, D0, m0 = st["state.num"][b] * torch.exp(st["state.max"][b]), st["state.den"][b] * torch.exp(st["state.max"][b]), st["state.max"][b]
        else:
            N0, D0, m0 = torch.zeros(C, dtype=q.dtype), torch.zeros(C, dtype=q.dtype), torch.full((C,), -1e38, dtype=q.dtype)
        e = torch.exp(logits)
        ys.append(torch.sigmoid(q[b]) * ((e * V.unsqueeze(0)).sum(1) + N0) / (e.sum(1) + D0))
        if final:
            old = K[:n - keep]
            m = torch.maximum(m0, old.amax(0)) if n > keep else m0
            ee = torch.exp(old - m)
            fin["state.num"].append(N0 * torch.exp(-m) + (ee * V[:n - keep]).sum(0))
            fin["state.den"].append(D0 * torch.exp(-m) + ee.sum(0))
            fin["state.max"].append(m)
            fin["state.k"].append(K[n - keep:])
            fin["state.v"].append(V[n - keep:])
            fin["state.pos"].append(torch.tensor(float(pos + T), dtype=q.dtype))
    y = torch.stack(ys)
    if not final:
        return y
    out = {n_: torch.stack(f) for n_, f in fin.items() if with_pos or n_ != "state.pos"}
    return y, out


def aft_local(q, k, v, w, causal, window, st=None, final=False):
    if st or final:  # causal, from a state: the bias at absolute positions inside the window
        near = lambda t, s: ((t.view(-1, 1) - s.view(1, -1)).abs() < window).unsqueeze(-1)  # noqa: E731
        bias = lambda t, s: torch.where(near(t, s), w[t][:, s].unsqueeze(-1), torch.zeros(1, dtype=q.dtype))  # noqa: E731
        return aft_ring_state(q, k, v, bias, window - 1, st, final)
    T = q.shape[1]
    t = torch.arange(T).view(T, 1)
    s = torch.arange(T).view(1, T)
    near = (t - s).abs() < window
    return _aft(q, k, v, torch.where(near, w[:T, :T], torch.zeros_like(w[:T, :T])), causal)


def aft_simple(q, k, v, causal):
    T = q.shape[1]
    return _aft(q, k, v, torch.zeros(T, T, dtype=q.dtype), causal)


def aft_simple_state(q, k, v, num0=None, den0=None, max0=None):
    # Causal AFT-simple as the literal running sums in float64, token by token, from the state of
    # MIXERS.md (num0, den0 scaled by e^{-max0}: the unscaled sums are num0 e^{max0}, den0 e^{max0});
    # returns y and the final state in that form, max the largest exponent seen.
    B, T, C = k.shape
    if num0 is None:
        N, D, m = (torch.zeros(B, C, dtype=k.dtype), torch.zeros(B, C, dtype=k.dtype),
                   torch.full((B, C), -1e38, dtype=k.dtype))
    else:
        N, D, m = num0 * torch.exp(max0), den0 * torch.exp(max0), max0
    ys = []
    for t in range(T):
        e = torch.exp(k[:, t])
        N = N + e * v[:, t]
        D = D + e
        ys.append(torch.sigmoid(q[:, t]) * N / D)
        m = torch.maximum(m, k[:, t])
    return torch.stack(ys, dim=1), N * torch.exp(-m), D * torch.exp(-m), m


def aft_conv(q, k, v, u, causal, st=None, final=False):
    T, C = q.shape[1], q.shape[2]
    H, K = u.shape
    if st or final:  # causal, from a state: u[h, t - s] for 0 <= t - s < K
        def bias(t, s):
            d = t.view(-1, 1) - s.view(1, -1)
            valid = ((d >= 0) & (d < K)).unsqueeze(0)
            b = torch.where(valid, u[:, d.clamp(0, K - 1)], torch.zeros(1, dtype=q.dtype))  # [H,T,n]
            return b.repeat_interleave(C // H, dim=0).permute(1, 2, 0)
        return aft_ring_state(q, k, v, bias, K - 1, st, final, with_pos=False)
    diff = torch.arange(T).view(T, 1) - torch.arange(T).view(1, T)  # t - s
    idx = diff if causal else diff + (K - 1) // 2
    valid = (idx >= 0) & (idx < K)
    w_h = torch.zeros(H, T, T, dtype=q.dtype)
    for h in range(H):
        w_h[h][valid] = u[h][idx[valid]]
    w_tsc = w_h.repeat_interleave(C // H, dim=0).permute(1, 2, 0)  # [T,T,C]
    return _aft(q, k, v, w_tsc, causal)


def rwkv4(k, v, w, u, a0=None, b0=None, p0=None, final=False):
    # The plain (unstabilised) recurrence in float64, token by token:
    #   y_t = (a + e^{u+k_t} v_t) / (b + e^{u+k_t});  a <- e^{-w} a + e^{k_t} v_t (same for b)
    # float64 holds e^{+-60 * few} easily, so no max-shift is needed here; where the
    # stabilised C++ scan and this literal recurrence agree, both are right. From the state
    # (a0, b0, p0), the scaled sums of MIXERS.md: a = a0 e^{p0}, b = b0 e^{p0}; with final also
    # the final state in that form, p the running max max(p - w, k_t) and a, b scaled by e^{-p}.
    B, T, C = k.shape
    a = torch.zeros(B, C, dtype=k.dtype) if a0 is None else a0 * torch.exp(p0)
    b = torch.zeros(B, C, dtype=k.dtype) if b0 is None else b0 * torch.exp(p0)
    p = torch.full((B, C), -1e38, dtype=k.dtype) if p0 is None else p0
    decay = torch.exp(-w)
    ys = []
    for t in range(T):
        ek = torch.exp(k[:, t])
        bonus = torch.exp(u + k[:, t])
        ys.append((a + bonus * v[:, t]) / (b + bonus))
        a = decay * a + ek * v[:, t]
        b = decay * b + ek
        p = torch.maximum(p - w, k[:, t])
    y = torch.stack(ys, dim=1)
    return (y, a * torch.exp(-p), b * torch.exp(-p), p) if final else y


def performer(q, k, v, proj, causal, S0=None, z0=None, kmax0=None, final=False):
    # phi(x)_m = exp(omega_m . x' - |x'|^2 / 2) / sqrt(M), x' = x D^(-1/4); no shifts (float64).
    # Causal, from the state (S0 [B,H,M,E], z0 [B,H,M] scaled by e^{-kmax0} [B,H]: the sums over
    # the tokens before 0 are S0 e^{kmax0}, z0 e^{kmax0}); with final also the state after the
    # last token in that form, kmax the largest key logit seen (or kmax0).
    D, M = q.shape[-1], proj.shape[0]

    def logits(x):
        xs = x * D ** -0.25
        return xs @ proj.T - (xs * xs).sum(-1, keepdim=True) / 2

    fq, lk = torch.exp(logits(q)) / math.sqrt(M), logits(k)
    fk = torch.exp(lk) / math.sqrt(M)
    kv = torch.einsum("bshm,bshe->bshme", fk, v)
    if causal and (S0 is not None or final):
        B, T, H, E = v.shape
        S = torch.zeros(B, H, M, E, dtype=q.dtype) if S0 is None else S0 * torch.exp(kmax0)[..., None, None]
        z = torch.zeros(B, H, M, dtype=q.dtype) if z0 is None else z0 * torch.exp(kmax0)[..., None]
        ys = []
        for t in range(T):
            S = S + kv[:, t]
            z = z + fk[:, t]
            ys.append(torch.einsum("bhm,bhme->bhe", fq[:, t], S) / torch.einsum("bhm,bhm->bh", fq[:, t], z)[..., None])
        y = torch.stack(ys, dim=1)
        if not final:
            return y
        kmax = lk.amax(dim=(1, 3))
        if kmax0 is not None:
            kmax = torch.maximum(kmax0, kmax)
        return y, S * torch.exp(-kmax)[..., None, None], z * torch.exp(-kmax)[..., None], kmax
    if causal:
        S, z = kv.cumsum(dim=1), fk.cumsum(dim=1)
        return torch.einsum("bthm,bthme->bthe", fq, S) / torch.einsum("bthm,bthm->bth", fq, z).unsqueeze(-1)
    S, z = kv.sum(dim=1), fk.sum(dim=1)
    return torch.einsum("bthm,bhme->bthe", fq, S) / torch.einsum("bthm,bhm->bth", fq, z).unsqueeze(-1)


def flow(q, k, v, causal, eps=1e-6, st=None, final=False):
    # MIXERS.md "flow", as tensor algebra (the official Flowformer code's shape of it). Causal,
    # from a state st ({"state.sumK": [B,H,D], ..., "state.sumexp": [B,H], "state.KV": [B,H,D,E],
    # "state.pos": [B]}: the sums over the pos tokens before 0): every prefix sum starts from the
    # state's and positions count on from pos; with final also the final state (by name).
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
    B, _, H, D = q.shape
    pos = st["state.pos"].detach().round() if st else torch.zeros(B, dtype=q.dtype)  # counts: no gradient
    zero = lambda *shape: torch.zeros(*shape, dtype=q.dtype)  # noqa: E731
    E = v.shape[3]
    s0 = st or {"state.sumK": zero(B, H, D), "state.sumQ": zero(B, H, D), "state.sumKO": zero(B, H, D),
                "state.sumQI": zero(B, H, D), "state.sumexp": zero(B, H), "state.KV": zero(B, H, D, E)}
    scan = lambda x, n: x.cumsum(1) + s0[n].unsqueeze(1)  # noqa: E731  a prefix sum from the state's
    r = pos.view(B, 1, 1) + torch.arange(1, T + 1, dtype=q.dtype).view(1, T, 1)
    cK, cQ = scan(K, "state.sumK"), scan(Q, "state.sumQ")
    I = r / dot(Q + eps, cK + eps)
    O = r / dot(K + eps, cQ + eps)
    cKO, cQI = scan(K * O.unsqueeze(-1), "state.sumKO"), scan(Q * I.unsqueeze(-1), "state.sumQI")
    Ihat = dot(Q + eps, cKO + eps) / r
    Ohat = torch.clamp(dot(K + eps, cQI + eps) / r, -1.0, 1.0)
    alloc = torch.sigmoid(Ihat)
    Z = scan(torch.exp(Ohat), "state.sumexp")
    comp = torch.exp(Ohat) / Z * r
    kv = scan(torch.einsum("bthd,bthe->bthde", K, v * comp.unsqueeze(-1)), "state.KV")
    y = torch.einsum("bthd,bthde->bthe", Q * (I / r).unsqueeze(-1), kv) * alloc.unsqueeze(-1)
    if not final:
        return y
    return y, {"state.sumK": cK[:, -1], "state.sumQ": cQ[:, -1], "state.sumKO": cKO[:, -1], "state.sumQI": cQI[:, -1],
               "state.sumexp": Z[:, -1], "state.KV": kv[:, -1], "state.pos": pos + T}


def flash(quad_q, quad_k, lin_q, lin_k, v, causal, group, st=None, final=False):
    # the paper's mixed-chunk pseudo-code: pad T to a multiple of G, reshape into groups. Causal,
    # from a state (MIXERS.md: the unfinished group's rows quad_k, lin_k, v [B,L,.] and M [B,S,E],
    # the groups before as sum lin_k^T V / G): the rows go first (zero query rows, outputs
    # dropped) and every position adds lin_q . M; with final also the state after the last token.
    if causal and (st or final):
        B, T, S = quad_q.shape
        L = st["state.v"].shape[1] if st else 0
        cat = lambda x, n: torch.cat([st["state." + n] if n else torch.zeros(B, L, x.shape[2], dtype=x.dtype), x], 1) if L else x  # noqa: E731
        qq, qk, lq, lk, vv = cat(quad_q, None), cat(quad_k, "quad_k"), cat(lin_q, None), cat(lin_k, "lin_k"), cat(v, "v")
        y = flash(qq, qk, lq, lk, vv, True, group)
        M0 = st["state.M"] if st else torch.zeros(B, S, v.shape[2], dtype=v.dtype)
        y = (y + torch.einsum("bts,bse->bte", lq, M0))[:, L:]
        if not final:
            return y
        n = L + T
        full, keep = n // group * group, n % group
        M = M0 + torch.einsum("bts,bte->bse", lk[:, :full], vv[:, :full]) / group
        return y, {"state.quad_k": qk[:, n - keep:], "state.lin_k": lk[:, n - keep:], "state.v": vv[:, n - keep:],
                   "state.M": M}
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


def norm_linear(q, k, v, causal, eps=1e-6, S0=None, final=False):
    fq, fk = phi_elu(q), phi_elu(k)
    kv = torch.einsum("bshd,bshe->bshde", fk, v)
    if causal:
        S = kv.cumsum(dim=1) + (0 if S0 is None else S0.unsqueeze(1))
        o = torch.einsum("bthd,bthde->bthe", fq, S)
    else:
        o = torch.einsum("bthd,bhde->bthe", fq, kv.sum(dim=1))
    y = o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps)
    return (y, S[:, -1]) if final else y


def block_softmax(q, k, v, causal, block, k0=None, v0=None, final=False):
    if k0 is not None or final:  # from the cache of the unfinished block's rows (causal)
        return softmax(q, k, v, True, k0=k0, v0=v0, final=final, block=block)
    T = q.shape[1]
    parts = [softmax(q[:, i:i + block], k[:, i:i + block], v[:, i:i + block], causal) for i in range(0, T, block)]
    return torch.cat(parts, dim=1)


def s4d(u, log_dt, A_re, A_im, C_re, C_im, D, x0=None, final=False):
    # kernel by a Vandermonde product, convolution by torch.fft (zero-padded to 2T); from the
    # complex state x0 [B,C,N] before token 0 (None: zeros), whose part is the recurrence
    # x_t = Abar x_{t-1} (+ u_t) run on x0 alone; with final also the last x.
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
    y = torch.fft.irfft(Uf * Kf, n=n)[..., :T].transpose(1, 2) + D * u
    if x0 is None and not final:
        return y
    Abar = torch.exp(dtA)  # [C,N]
    x = torch.zeros(u.shape[0], *A.shape, dtype=Cc.dtype) if x0 is None else x0
    for t in range(T):  # the recurrence, step by step (independent of the kernel and the FFT)
        x = Abar * x + u[:, t].unsqueeze(-1)
    if x0 is not None:  # the state's part of y_t: 2 Re(Ct Abar^{t+1} x0)
        pw = torch.exp(dtA.unsqueeze(-1) * (l + 1))  # [C,N,T]: Abar^{t+1}
        ys = 2 * torch.einsum("cn,cnt,bcn->btc", Ct, pw, x0).real
        y = y + ys
    return (y, x) if final else y


def mamba(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=True, h0=None, final=False):
    # the selective_scan_ref recurrence, vectorised over batch, channels and state, from the
    # state h0 [B,C,N] before token 0 (zeros when None); with final also the last h
    if delta_bias is not None:
        delta = delta + delta_bias
    dt = F.softplus(delta) if delta_softplus else delta
    dA = torch.exp(torch.einsum("btc,cn->btcn", dt, A))
    dBu = torch.einsum("btc,btn,btc->btcn", dt, Bm, u)
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=u.dtype) if h0 is None else h0
    ys = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        ys.append(torch.einsum("bcn,bn->bc", h, Cm[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if final else y


def _s4d_state(x):  # the complex state of an s4d call, or None
    return torch.complex(x["state.x_re"], x["state.x_im"]) if "state.x_re" in x else None


def _no_state(x):
    return {n: t for n, t in x.items() if not n.startswith("state.")}


def _mamba_x(x):  # the tensors of a mamba call, its state apart
    return {n: t for n, t in x.items() if not n.startswith("state.")}


def fnet(x):
    return torch.fft.fft2(x, dim=(1, 2)).real


def _num(p, name, default):
    return float(p[name]) if name in p else default


# ---- Decaying linear attention, delta rules, RWKV-5/6/7 and Mamba-2 (MIXERS.md). Causal only.
# Each takes the initial state S0 (key-first [B,H,D,E]; mamba2 h0 [B,H,E,N]; None = zeros) and
# returns (y, final state). Written from the text: the retention decay-matrix form, the other
# recurrences token by token in the layouts MIXERS.md states.

def _scale(p, D, default_sqrt):
    return float(p["scale"]) if "scale" in p else (1.0 / math.sqrt(D) if default_sqrt else 1.0)


def _state0(S0, B, H, D, E, like):
    return torch.zeros(B, H, D, E, dtype=like.dtype) if S0 is None else S0


def retention(q, k, v, gamma, scale, S0=None):
    # y_t = scale (sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s + gamma^(t+1) S0^T q_t): the T x T form
    B, T, H, D = q.shape
    E = v.shape[3]
    n = torch.arange(T, dtype=q.dtype)
    expo = (n.view(T, 1) - n.view(1, T)).clamp(min=0)
    lg = torch.log(gamma).view(H, 1, 1)
    Gam = torch.exp(expo.unsqueeze(0) * lg) * (n.view(T, 1) >= n.view(1, T))  # [H,T,S]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * Gam
    y = torch.einsum("bhts,bshe->bthe", scores, v)
    S0 = _state0(S0, B, H, D, E, q)
    init = torch.exp((n + 1).view(1, T, 1) * lg.view(1, 1, H))  # gamma^(t+1): [1,T,H]
    y = y + init.unsqueeze(-1) * torch.einsum("bthd,bhde->bthe", q, S0)
    tail = torch.exp((T - 1 - n).view(1, T, 1) * lg.view(1, 1, H))  # gamma^(T-1-s)
    S = torch.exp(T * lg.view(1, H, 1, 1)) * S0 + torch.einsum("bsh,bshd,bshe->bhde", tail.expand(B, T, H), k, v)
    return scale * y, S


def gla(q, k, v, g, scale, S0=None):
    B, T, H, D = q.shape
    S = _state0(S0, B, H, D, v.shape[3], q)
    ys = []
    for t in range(T):
        S = torch.exp(g[:, t]).unsqueeze(-1) * S + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        ys.append(torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return scale * torch.stack(ys, dim=1), S


def _l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def delta_rule(q, k, v, beta, scale, l2norm=True, g=None, S0=None):
    # S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T (g = 0: DeltaNet)
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    B, T, H, D = q.shape
    E = v.shape[3]
    S = _state0(S0, B, H, D, E, q)
    eye = torch.eye(D, dtype=q.dtype)
    ys = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t]
        trans = eye - bt[..., None, None] * torch.einsum("bhd,bhf->bhdf", kt, kt)
        if g is not None:
            trans = torch.exp(g[:, t])[..., None, None] * trans
        S = trans @ S + bt[..., None, None] * torch.einsum("bhd,bhe->bhde", kt, v[:, t])
        ys.append(torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return scale * torch.stack(ys, dim=1), S


def rwkv56(r, k, v, w, u, scale, S0=None):
    # y_t = scale (S_{t-1} + diag(u) k_t v_t^T)^T r_t; S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T.
    # w: [B,T,H,D] (rwkv6) or [H,D] (rwkv5, constant in time)
    B, T, H, D = r.shape
    S = _state0(S0, B, H, D, v.shape[3], r)
    ys = []
    for t in range(T):
        kv = torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
        ys.append(torch.einsum("bhd,bhde->bhe", r[:, t], S + u.unsqueeze(-1) * kv))
        wt = w[:, t] if w.dim() == 4 else w.unsqueeze(0)
        S = torch.exp(wt).unsqueeze(-1) * S + kv
    return scale * torch.stack(ys, dim=1), S


def rwkv7(r, w, k, v, a, b, scale, S0=None):
    # BlinkDL's value-first form: St = St diag(e^w) + St a b^T + v k^T, out = St r; St = S^T
    B, T, H, D = r.shape
    E = v.shape[3]
    St = _state0(S0, B, H, D, E, r).transpose(-1, -2)  # [B,H,E,D]
    ys = []
    for t in range(T):
        St = (St * torch.exp(w[:, t]).unsqueeze(-2) + (St @ a[:, t].unsqueeze(-1)) @ b[:, t].unsqueeze(-2)
              + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2))
        ys.append((St @ r[:, t].unsqueeze(-1)).squeeze(-1))
    return scale * torch.stack(ys, dim=1), St.transpose(-1, -2)


def mamba2(x, dt, A, Bm, Cm, D=None, z=None, dt_bias=None, dt_softplus=True, h0=None):
    # h [B,H,E,N] (mamba_ssm's layout); head h reads group h // (H // G)
    Bsz, T, H, E = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    rep = H // G
    Bh, Ch = Bm.repeat_interleave(rep, dim=2), Cm.repeat_interleave(rep, dim=2)  # [B,T,H,N]
    d = dt + (dt_bias if dt_bias is not None else 0.0)
    d = F.softplus(d) if dt_softplus else d
    h = torch.zeros(Bsz, H, E, N, dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(T):
        dA = torch.exp(d[:, t] * A)  # [B,H]
        h = dA[..., None, None] * h + torch.einsum("bh,bhe,bhn->bhen", d[:, t], x[:, t], Bh[:, t])
        ys.append(torch.einsum("bhen,bhn->bhe", h, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.view(1, 1, H, 1) * x
    if z is not None:
        y = y * F.silu(z)
    return y, h


def _flow_state(x):  # the state tensors of a call (flow's, aft_local's, aft_conv's), or None
    return {n: t for n, t in x.items() if n.startswith("state.")} or None


def _st(x):
    return x.get("state.S")


# Every state-carrying mechanism: fn(x, params) -> (y, {"state.<name>": final state}), x with the
# optional initial state "state.<name>".
STATE_ORACLES = {
    "retention": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *retention(x["q"], x["k"], x["v"], x["gamma"], _scale(p, x["q"].shape[3], True), _st(x))),
    "gla": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *gla(x["q"], x["k"], x["v"], x["g"], _scale(p, x["q"].shape[3], True), _st(x))),
    "deltanet": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *delta_rule(x["q"], x["k"], x["v"], x["beta"], _scale(p, x["q"].shape[3], True),
                    _num(p, "l2norm", 1) != 0, None, _st(x))),
    "gated_deltanet": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *delta_rule(x["q"], x["k"], x["v"], x["beta"], _scale(p, x["q"].shape[3], True),
                    _num(p, "l2norm", 1) != 0, x["g"], _st(x))),
    "rwkv5": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *rwkv56(x["r"], x["k"], x["v"], x["w"], x["u"], _scale(p, 0, False), _st(x))),
    "rwkv6": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *rwkv56(x["r"], x["k"], x["v"], x["w"], x["u"], _scale(p, 0, False), _st(x))),
    "rwkv7": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], _scale(p, 0, False), _st(x))),
    "linear": lambda x, p: (lambda y, S, z: (y, {"state.S": S, "state.z": z}))(
        *linear(x["q"], x["k"], x["v"], True, _num(p, "eps", 1e-6), x.get("state.S"), x.get("state.z"), final=True)),
    "norm_linear": lambda x, p: (lambda y, S: (y, {"state.S": S}))(
        *norm_linear(x["q"], x["k"], x["v"], True, _num(p, "eps", 1e-6), x.get("state.S"), final=True)),
    "aft_simple": lambda x, p: (lambda y, n, d, m: (y, {"state.num": n, "state.den": d, "state.max": m}))(
        *aft_simple_state(x["q"], x["k"], x["v"], x.get("state.num"), x.get("state.den"), x.get("state.max"))),
    "flow": lambda x, p: flow(x["q"], x["k"], x["v"], True, _num(p, "eps", 1e-6), _flow_state(x), final=True),
    "softmax": lambda x, p: softmax(x["q"], x["k"], x["v"], True, float(p["scale"]) if "scale" in p else None,
                                    int(_num(p, "window", 0)), x.get("state.k"), x.get("state.v"), final=True),
    "block_softmax": lambda x, p: block_softmax(x["q"], x["k"], x["v"], True, int(_num(p, "block", 64)),
                                                x.get("state.k"), x.get("state.v"), final=True),
    "aft_full": lambda x, p: aft_full(x["q"], x["k"], x["v"], x["w"], True, x.get("state.k"), x.get("state.v"), final=True),
    "aft_local": lambda x, p: aft_local(x["q"], x["k"], x["v"], x["w"], True, int(p["window"]), _flow_state(x), final=True),
    "aft_conv": lambda x, p: aft_conv(x["q"], x["k"], x["v"], x["u"], True, _flow_state(x), final=True),
    "flash": lambda x, p: flash(x["quad_q"], x["quad_k"], x["lin_q"], x["lin_k"], x["v"], True,
                                int(_num(p, "group", 256)), _flow_state(x), final=True),
    "performer": lambda x, p: (lambda y, S, z, km: (y, {"state.S": S, "state.z": z, "state.kmax": km}))(
        *performer(x["q"], x["k"], x["v"], x["proj"], True, x.get("state.S"), x.get("state.z"), x.get("state.kmax"),
                   final=True)),
    "rwkv4": lambda x, p: (lambda y, a, b, pp: (y, {"state.a": a, "state.b": b, "state.p": pp}))(
        *rwkv4(x["k"], x["v"], x["w"], x["u"], x.get("state.a"), x.get("state.b"), x.get("state.p"), final=True)),
    "s4d": lambda x, p: (lambda y, xs: (y, {"state.x_re": xs.real, "state.x_im": xs.imag}))(
        *s4d(**_no_state(x), x0=_s4d_state(x), final=True)),
    "mamba": lambda x, p: (lambda y, h: (y, {"state.h": h}))(
        *mamba(**_mamba_x(x), delta_softplus=_num(p, "delta_softplus", 1) != 0, h0=x.get("state.h"), final=True)),
    "mamba2": lambda x, p: (lambda y, h: (y, {"state.h": h}))(
        *mamba2(x["x"], x["dt"], x["A"], x["Bm"], x["Cm"], x.get("D"), x.get("z"), x.get("dt_bias"),
                _num(p, "dt_softplus", 1) != 0, x.get("state.h"))),
}


# The oracle of every mechanism, keyed by registry name: fn(x, causal, params) -> y, where x
# holds the call's float64 tensors by their MIXERS.md names and params the call's KEY=VALUE
# strings (defaults as MIXERS.md). tests/oracle_test.py fails naming any registry mechanism
# missing here.
ORACLES = {
    "softmax": lambda x, c, p: softmax(x["q"], x["k"], x["v"], c, scale=float(p["scale"]) if "scale" in p else None,
                                       window=int(_num(p, "window", 0)), k0=x.get("state.k"), v0=x.get("state.v")),
    "linear": lambda x, c, p: linear(x["q"], x["k"], x["v"], c, _num(p, "eps", 1e-6), x.get("state.S"), x.get("state.z")),
    "aft_full": lambda x, c, p: aft_full(x["q"], x["k"], x["v"], x["w"], c, x.get("state.k"), x.get("state.v")),
    "aft_local": lambda x, c, p: aft_local(x["q"], x["k"], x["v"], x["w"], c, int(p["window"]), _flow_state(x)),
    "aft_simple": lambda x, c, p: (aft_simple_state(x["q"], x["k"], x["v"], x["state.num"], x["state.den"],
                                                    x["state.max"])[0] if "state.num" in x else
                                   aft_simple(x["q"], x["k"], x["v"], c)),
    "aft_conv": lambda x, c, p: aft_conv(x["q"], x["k"], x["v"], x["u"], c, _flow_state(x)),
    "rwkv4": lambda x, c, p: rwkv4(x["k"], x["v"], x["w"], x["u"], x.get("state.a"), x.get("state.b"), x.get("state.p")),
    "performer": lambda x, c, p: performer(x["q"], x["k"], x["v"], x["proj"], c, x.get("state.S"), x.get("state.z"),
                                           x.get("state.kmax")),
    "flow": lambda x, c, p: flow(x["q"], x["k"], x["v"], c, eps=_num(p, "eps", 1e-6), st=_flow_state(x)),
    "flash": lambda x, c, p: flash(x["quad_q"], x["quad_k"], x["lin_q"], x["lin_k"], x["v"], c,
                                   int(_num(p, "group", 256)), _flow_state(x)),
    "norm_linear": lambda x, c, p: norm_linear(x["q"], x["k"], x["v"], c, _num(p, "eps", 1e-6), x.get("state.S")),
    "block_softmax": lambda x, c, p: block_softmax(x["q"], x["k"], x["v"], c, int(_num(p, "block", 64)),
                                                   x.get("state.k"), x.get("state.v")),
    "s4d": lambda x, c, p: s4d(**_no_state(x), x0=_s4d_state(x)),
    "mamba": lambda x, c, p: mamba(**_mamba_x(x), delta_softplus=_num(p, "delta_softplus", 1) != 0,
                                   h0=x.get("state.h")),
    "fnet": lambda x, c, p: fnet(x["x"]),
}
# the causal-only state mechanisms: their state oracle is their oracle (linear and norm_linear,
# which also have a non-causal form, keep theirs above)
ORACLES.update({n: (lambda x, c, p, f=f: f(x, p)[0]) for n, f in STATE_ORACLES.items() if n not in ORACLES})

# The domain of a random initial state where not every value is one: linear's normaliser z is a
# sum of positive features (as the registry's state_fix draws it).
STATE_DOMAIN = {"linear": {"state.z": lambda t: t.abs() + 0.5},
                "aft_simple": {"state.den": lambda t: t.abs() + 0.5, "state.max": lambda t: 2 + 4 * t},
                "performer": {"state.z": lambda t: t.abs() + 0.5, "state.kmax": lambda t: 1 + 2 * t},
                "aft_conv": {"state.den": lambda t: t.abs() + 0.5, "state.max": lambda t: 2 + 4 * t},
                # aft_local: pos 0..3 tokens past the ring's 2 rows (the test dims' L)
                "aft_local": {"state.den": lambda t: t.abs() + 0.5, "state.max": lambda t: 2 + 4 * t,
                              "state.pos": lambda t: 2 + torch.round(torch.clamp(t.abs() * 2, max=3))},
                # flow: pos tokens before 0 (as the registry's state_fix draws them), sums of sigmoids
                # in (0, pos), positive flows, sumexp a sum of pos values in [1/e, e]
                "flow": {"state.pos": lambda t: 2 + torch.round(torch.clamp(t.abs() * 3, max=7)),
                         "state.sumK": lambda t: 4 * torch.sigmoid(t), "state.sumQ": lambda t: 4 * torch.sigmoid(t),
                         "state.sumKO": lambda t: t.abs() + 0.5, "state.sumQI": lambda t: t.abs() + 0.5,
                         "state.sumexp": lambda t: 4 * torch.exp(torch.tanh(t))},
                "rwkv4": {"state.b": lambda t: t.abs() + 0.5, "state.p": lambda t: 2 + 4 * t}}
