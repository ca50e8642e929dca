#!/usr/bin/python3
"""`linmix mix` against an independent float64 PyTorch evaluation of MIXERS.md.

Driven by the registry (`linmix mixers --json`): every mechanism, causal and non-causal where
defined, each of its test param sets, every form (reference, parallel, recurrent), T in
{1, 7, 64, 257, 1024}: its example inputs (`linmix example`: N(0,1) draws in the mechanism's
domain, a new seed each run unless LINMIX_SEED is set; the seed is printed), run through the
`linmix` binary, compared with python/oracle.py's ORACLES. A mechanism without an oracle fails
by name. Also: a sequence split across two
recurrent calls with the state passed along, and stability inputs (keys, biases in +-60).

Usage: oracle_test.py PATH/TO/linmix
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import oracle  # noqa: E402
import st  # noqa: E402

LINMIX = os.path.abspath(sys.argv[1])
SEED = int(os.environ.get("LINMIX_SEED", time.time_ns() % (2**31)))
rng = np.random.default_rng(SEED)
TMP = tempfile.mkdtemp(prefix="linmix-oracle-")
B, H, D, E, C = 2, 3, 5, 4, 6
passed, failed = 0, 0


def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def uniform60(*shape):
    return rng.uniform(-60, 60, shape).astype(np.float32)


def run(mixer, causal, mode, params, tensors, grad=False):
    inp, out = os.path.join(TMP, "in.safetensors"), os.path.join(TMP, "out.safetensors")
    st.save(inp, tensors)
    cmd = [LINMIX, "mix", "--mixer", mixer, "--mode", mode, "--in", inp, "--out", out]
    cmd += ["--causal"] if causal else []
    cmd += ["--grad"] if grad else []
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return st.load(out)


def refused(mixer, causal, params, tensors, what):
    """A call MIXERS.md refuses: exit code 2 and a one-line message."""
    global passed, failed
    inp, out = os.path.join(TMP, "bad.safetensors"), os.path.join(TMP, "bad-out.safetensors")
    st.save(inp, tensors)
    cmd = [LINMIX, "mix", "--mixer", mixer, "--mode", "parallel", "--in", inp, "--out", out]
    cmd += ["--causal"] if causal else []
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    ok = r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    passed += ok
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {mixer} refuses {what}: exit {r.returncode} {r.stderr.strip()[:80]}", flush=True)


def check(name, got, ref, tol_factor):
    # MIXERS.md: max |err| <= tol_factor * max(1, max |ref|)
    global passed, failed
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    tol = tol_factor * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    ok = np.all(np.isfinite(got)) and err <= tol
    passed += ok
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:62s} err {err:.2e} tol {tol:.1e}", flush=True)


def check_rms(name, got, ref, tol, floor):
    global passed, failed
    err = float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2))) if ref.size else 0.0
    scale = max(float(np.sqrt(np.mean(ref ** 2))) if ref.size else 0.0, floor, 1e-30)
    ok = bool(np.all(np.isfinite(got))) and (err == 0 or err / scale <= tol)
    passed += ok
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:62s} rel-rms {err / scale:.2e} tol {tol:.0e}", flush=True)


SPECS = json.loads(subprocess.run([LINMIX, "mixers", "--json"], capture_output=True, text=True, check=True).stdout)


def fail(msg):
    global failed
    failed += 1
    print(f"FAIL {msg}", flush=True)


def example(mixer, causal, T, stress=0):
    """The mechanism's example inputs (registry sizes at the test scale, its domain rules, its
    stability rule with stress), drawn by `linmix example` from a fresh seed."""
    out = os.path.join(TMP, "example.safetensors")
    cmd = [LINMIX, "example", "--mixer", mixer, "--T", str(T), "--seed", str(int(rng.integers(2**31))),
           "--stress", str(stress), "--out", out] + (["--causal"] if causal else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return st.load(out)


def flags(spec):
    return [c for c, ok in ((False, spec["noncausal"]), (True, spec["causal"])) if ok]


def cases(T, stable):
    """(mixer, causal flags, params, inputs dict, oracle fn(inputs as float64 torch, causal)):
    every registry mechanism with each of its test param sets, on its example inputs, and the
    extra cases below. A mechanism without an oracle is reported by coverage() and skipped."""
    out = []
    for spec in SPECS:
        name = spec["name"]
        if name not in oracle.ORACLES:
            continue
        sets = [dict(spec["example_params"])] + [{**spec["example_params"], **m} for m in spec["more_params"]]
        for params in sets:
            for causal in flags(spec):
                fn = (lambda x, c, n=name, p=params: oracle.ORACLES[n](x, c, p))
                out.append((name, (causal,), params, example(name, causal, T, 1 if stable else 0), fn))
    if not stable:
        out += extra_cases(T)
    return out


def extra_cases(T):
    """Params and domains the registry's examples do not reach."""
    out = []
    ok = oracle.ORACLES
    if T >= 7 and "softmax" in ok:
        x = example("softmax", False, T)
        out.append(("softmax", (False, True), {"window": 3, "scale": 0.3}, x,
                    lambda x, c: ok["softmax"](x, c, {"window": 3, "scale": 0.3})))
    if "flash" in ok:  # one group holds the whole sequence (the default G = 256)
        out.append(("flash", (False, True), {"group": 256}, example("flash", True, T),
                    lambda x, c: ok["flash"](x, c, {"group": 256})))
    if "mamba" in ok:  # dt = delta itself: keep it >= 0 so h decays; no D, z, bias
        mb = example("mamba", True, T)
        bare = {n: mb[n] for n in ("u", "delta", "A", "Bm", "Cm")}
        bare["delta"] = np.abs(bare["delta"])
        out.append(("mamba", (True,), {"delta_softplus": 0}, bare,
                    lambda x, c: ok["mamba"](x, c, {"delta_softplus": 0})))
    if "mamba2" in ok:  # one group shared by all heads; and the bare form (no D, z, dt_bias; d = dt)
        m2 = example("mamba2", True, T)
        one = dict(m2, Bm=m2["Bm"][:, :, :1].copy(), Cm=m2["Cm"][:, :, :1].copy())
        out.append(("mamba2", (True,), {}, one, lambda x, c: ok["mamba2"](x, c, {})))
        bare = {n: m2[n] for n in ("x", "dt", "A", "Bm", "Cm")}
        bare["dt"] = np.abs(bare["dt"]) * 0.1
        out.append(("mamba2", (True,), {"dt_softplus": 0}, bare,
                    lambda x, c: ok["mamba2"](x, c, {"dt_softplus": 0})))
    return out


def state_specs():
    return {s["name"]: s for s in SPECS if s.get("state_all_modes")}


def initial_state(spec, tensors):
    """A random state before token 0 (N(0,1)), shaped by the spec's state dims bound on tensors."""
    dims = {}
    for inp in spec["inputs"]:
        if inp["name"] in tensors:
            for d, n in zip(inp["dims"].split(","), tensors[inp["name"]].shape):
                dims[d] = n
    for d, n in spec["test_dims"]["causal"].items():  # dims only a state has (a cache's L rows)
        dims.setdefault(d, n)
    out = {st_["name"]: normal(*[int(d) if d.isdigit() else dims[d] for d in st_["dims"].split(",")])
           for st_ in spec["state"]}
    for n, f in oracle.STATE_DOMAIN.get(spec["name"], {}).items():
        out[n] = f(torch.from_numpy(out[n])).numpy()
    return out


def state_checks():
    """MIXERS.md's state contract for the mechanisms whose every form takes state.*: from a random
    initial state, every mode gives the oracle's y and final state; a parallel call split in two
    with the state passed on equals one call."""
    for name, spec in state_specs().items():
        if name not in oracle.STATE_ORACLES:
            fail(f"{name}: no state oracle in python/oracle.py STATE_ORACLES")
            continue
        params = dict(spec["example_params"])
        for T in (1, 7, 131):
            for stress in (0, 1):
                tensors = example(name, True, T, stress)
                tensors.update(initial_state(spec, tensors))
                x64 = {n: torch.from_numpy(a.astype(np.float64)) for n, a in tensors.items()}
                y_ref, fin = oracle.STATE_ORACLES[name](x64, params)
                tag = f"{name} T={T} from a state{' fast decay' if stress else ''}"
                for mode, tol in (("reference", 1e-6), ("parallel", 1e-4), ("recurrent", 1e-4)):
                    got = run(name, True, mode, params, tensors)
                    check(f"{tag} {mode} y", got["y"], y_ref.numpy(), tol)
                    for n, S in fin.items():
                        check(f"{tag} {mode} {n}", got[n], S.numpy(), tol)
                if T >= 3:
                    t1 = T // 2 + 1
                    o1 = run(name, True, "parallel", params, split_at(tensors, 0, t1))
                    second = split_at(tensors, t1, T)
                    second.update({n: a for n, a in o1.items() if n.startswith("state.")})
                    o2 = run(name, True, "parallel", params, second)
                    check(f"{tag} parallel split at {t1} y", np.concatenate([o1["y"], o2["y"]], axis=1), y_ref.numpy(), 1e-4)
                    for n, S in fin.items():
                        check(f"{tag} parallel split at {t1} {n}", o2[n], S.numpy(), 1e-4)


def refusals():
    """Every domain error of MIXERS.md's new section: exit 2, one line."""
    specs = state_specs()
    for name, spec in specs.items():
        x = example(name, True, 5)
        if spec["noncausal"]:  # a non-causal form exists, but no state in it
            x.update(initial_state(spec, x))
            refused(name, False, {}, x, "a state in a call without --causal")
        else:
            refused(name, False, {}, x, "a call without --causal")
    for spec in SPECS:  # every log decay the registry declares, made positive
        for decay in spec.get("log_decays", []):
            x = example(spec["name"], True, 5)
            x[decay] = np.abs(x[decay]) + 0.1
            refused(spec["name"], True, {}, x, f"a positive log decay {decay}")
    if "retention" in specs:
        for bad in (0.0, 1.5, -0.5):
            x = example("retention", True, 5)
            x["gamma"][0] = bad
            refused("retention", True, {}, x, f"gamma = {bad}")
    for name in ("deltanet", "gated_deltanet"):
        if name in specs:
            refused(name, True, {"l2norm": 2}, example(name, True, 5), "l2norm = 2")
    if "mamba2" in specs:
        refused("mamba2", True, {"dt_softplus": 2}, example("mamba2", True, 5), "dt_softplus = 2")
        x = example("mamba2", True, 5)  # H = 4 heads, 3 groups
        x["Bm"] = np.concatenate([x["Bm"], x["Bm"][:, :, :1]], axis=2)
        x["Cm"] = np.concatenate([x["Cm"], x["Cm"][:, :, :1]], axis=2)
        refused("mamba2", True, {}, x, "H not a multiple of G")
        x = example("mamba2", True, 5)
        x["state.h"] = normal(2, 4, 3, 3)  # E, N swapped
        refused("mamba2", True, {}, x, "a transposed state")
    if "mamba" in specs:
        x = example("mamba", True, 5)
        x["state.h"] = normal(x["u"].shape[0], x["A"].shape[1], x["A"].shape[0])  # [B,N,C]: transposed
        refused("mamba", True, {}, x, "a transposed state")
    if "s4d" in specs:
        x = example("s4d", True, 5)
        B_, N_, C_ = x["u"].shape[0], x["A_re"].shape[1], x["A_re"].shape[0]
        x["state.x_re"], x["state.x_im"] = normal(B_, N_, C_), normal(B_, N_, C_)  # [B,N,C]: transposed
        refused("s4d", True, {}, x, "a transposed state")
    for name in ("aft_simple",):  # per-channel sums [B,C]: one of another width
        if name in specs:
            x = example(name, True, 5)
            B_, T_, C_ = x["q"].shape
            x.update({"state.num": normal(B_, C_), "state.den": np.abs(normal(B_, C_)) + 0.5, "state.max": normal(B_, C_ + 1)})
            refused(name, True, {}, x, "a state of the wrong width")
    for name in specs:
        if "S" not in [st_["name"] for st_ in specs[name]["state"]]:  # no key-first S to transpose
            continue
        x = example(name, True, 5)
        first = next(i for i in SPECS if i["name"] == name)["inputs"][0]["name"]
        B_, T_, H_, D_ = x[first].shape
        E_ = next(a for n, a in x.items() if n == "v").shape[3]
        x["state.S"] = normal(B_, H_, E_, D_)  # value-first: the transpose of the contract
        refused(name, True, {}, x, "a value-first (transposed) state")


def coverage():
    """Every registry mechanism has an oracle; every oracle names a registry mechanism."""
    names = [s["name"] for s in SPECS]
    for n in names:
        if n in oracle.ORACLES:
            print(f"ok   {n}: oracle present", flush=True)
        else:
            fail(f"{n}: no oracle in python/oracle.py ORACLES (every mechanism needs one)")
    for n in oracle.ORACLES:
        if n not in names:
            fail(f"{n}: python/oracle.py has an oracle for a mechanism the registry does not list")


def ssm_inputs(T, Bsz=B, Cn=C, N=4):
    u = normal(Bsz, T, Cn)
    s4 = dict(u=u, log_dt=rng.uniform(np.log(1e-3), np.log(1e-1), Cn).astype(np.float32),
              A_re=(-0.5 * np.exp(0.5 * normal(Cn, N))).astype(np.float32), A_im=3 * normal(Cn, N),
              C_re=normal(Cn, N), C_im=normal(Cn, N), D=normal(Cn))
    mb = dict(u=u, delta=normal(Bsz, T, Cn), A=(-np.exp(normal(Cn, N))).astype(np.float32), Bm=normal(Bsz, T, N),
              Cm=normal(Bsz, T, N), D=normal(Cn), z=normal(Bsz, T, Cn), delta_bias=normal(Cn))
    return s4, mb


def split_at(tensors, t1, t2):
    """Slices the time axis (axis 1 of every [B,T,...] input; not of the state) to [t1, t2)."""
    return {n: (a[:, t1:t2] if a.ndim >= 3 and not n.startswith("state.") else a) for n, a in tensors.items()}


def main():
    print(f"oracle test: linmix={LINMIX} seed={SEED} (set LINMIX_SEED to repeat)")
    coverage()
    for stable in (False, True):
        for T in ((1, 7, 64, 257, 1024) if not stable else (257,)):
            for mixer, flags, params, tensors, fn in cases(T, stable):
                x64 = {n: torch.from_numpy(a.astype(np.float64)) for n, a in tensors.items()}
                for causal in flags:
                    ref = fn(x64, causal).numpy()
                    tag = f"{mixer}{'' if not params else str(params)} T={T} {'causal' if causal else 'non-causal'}"
                    tag += " stability(+-60)" if stable else ""
                    # float32 kernels: MIXERS.md's 1e-4, kept for the +-60 inputs too (measured
                    # there: <= 1e-5 relative; the stabilised forms lose no more than rounding).
                    tol32 = 1e-4
                    # --mode reference runs in float64; only the final rounding to float32 remains.
                    check(f"{tag} reference", run(mixer, causal, "reference", params, tensors)["y"], ref, 1e-6)
                    check(f"{tag} parallel", run(mixer, causal, "parallel", params, tensors)["y"], ref, tol32)
                    if not causal:
                        continue
                    check(f"{tag} recurrent", run(mixer, causal, "recurrent", params, tensors)["y"], ref, tol32)
                    if T >= 2:  # two calls, the state of the first passed to the second
                        t1 = T // 2 + (T % 3)
                        o1 = run(mixer, causal, "recurrent", params, split_at(tensors, 0, t1))
                        second = split_at(tensors, t1, T)
                        second.update({n: a for n, a in o1.items() if n.startswith("state.")})
                        o2 = run(mixer, causal, "recurrent", params, second)
                        check(f"{tag} recurrent split at {t1}", np.concatenate([o1["y"], o2["y"]], axis=1), ref, tol32)
    state_checks()
    refusals()
    # Gradients: `linmix mix --grad` against torch.autograd of the same float64 oracle (from a
    # random initial state where the parallel form takes one: d(state.*) too).
    for T in (1, 7, 64, 257):
        for mixer, flags, params, stateless, fn in cases(T, False):
            for causal in flags:
                tensors = stateless
                if mixer in state_specs() and causal:  # a state exists in the causal form
                    tensors = dict(tensors, **initial_state(state_specs()[mixer], tensors))
                x64 = {n: torch.from_numpy(a.astype(np.float64)).requires_grad_(True) for n, a in tensors.items()}
                y = fn(x64, causal)
                dy = normal(*y.shape)
                (y * torch.from_numpy(dy.astype(np.float64))).sum().backward()
                want = {"d" + n: t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for n, t in x64.items()}
                # a gradient that vanishes in exact arithmetic (e.g. dq of a normalised mechanism at
                # T = 1, y = v whatever q) is float32 rounding noise, a difference of terms of the
                # size of the other gradients each rounded at ~(D + M) 2^-24 ~ 1e-6 relative:
                # compare it at 1e-3 of the largest gradient's RMS (1e-6 of that scale overall)
                floor = 1e-3 * max(float(np.sqrt(np.mean(g ** 2))) for g in want.values())
                tag = f"{mixer}{'' if not params else str(params)} T={T} {'causal' if causal else 'non-causal'}"
                modes = ("parallel", "reference") if T <= 64 else ("parallel",)
                for mode in modes:
                    got = run(mixer, causal, mode, params, {**tensors, "dy": dy}, grad=True)
                    for n, g in want.items():
                        # MIXERS.md: 1e-3 relative RMS for float32 gradients; the reference
                        # backward is float64 rounded to float32 at the end.
                        check_rms(f"{tag} {mode} {n}", got[n], g, 1e-3 if mode == "parallel" else 1e-5, floor)

    # Long scans (T = 4096): the linear-time recurrences, parallel and recurrent, vs the oracle.
    T = 4096
    s4, mb = ssm_inputs(T, Bsz=1, Cn=3)
    kk, vv = uniform60(1, T, 3), normal(1, T, 3)
    long_cases = [("s4d", {}, s4, lambda x: oracle.s4d(**x)), ("mamba", {}, mb, lambda x: oracle.mamba(**x)),
                  ("rwkv4", {}, dict(k=kk, v=vv, w=np.exp(normal(3)), u=uniform60(3)),
                   lambda x: oracle.rwkv4(x["k"], x["v"], x["w"], x["u"])),
                  ("aft_simple", {}, dict(q=normal(1, T, 3), k=kk, v=vv),
                   lambda x: oracle.aft_simple(x["q"], x["k"], x["v"], True))]
    # the chunked decaying forms over 64 chunks, from a state, against the float64 recurrences
    for name in ("gla", "rwkv6", "rwkv7", "mamba2", "gated_deltanet"):
        if name not in state_specs():
            continue
        x = example(name, True, T)
        x = {n: (a[:1] if a.ndim >= 3 else a) for n, a in x.items()}  # one sequence
        x.update(initial_state(state_specs()[name], x))
        y_ref, fin = oracle.STATE_ORACLES[name]({n: torch.from_numpy(a.astype(np.float64)) for n, a in x.items()}, {})
        for mode in ("parallel", "recurrent"):
            got = run(name, True, mode, {}, x)
            check(f"{name} T={T} causal long scan {mode}", got["y"], y_ref.numpy(), 1e-4)
            for n, S in fin.items():
                check(f"{name} T={T} long scan {mode} {n}", got[n], S.numpy(), 1e-4)
    for mixer, params, tensors, fn in long_cases:
        ref = fn({n: torch.from_numpy(a.astype(np.float64)) for n, a in tensors.items()}).numpy()
        for mode in ("parallel", "recurrent"):
            check(f"{mixer} T={T} causal long scan {mode}", run(mixer, True, mode, params, tensors)["y"], ref, 1e-4)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
