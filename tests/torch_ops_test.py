"""linmix.ops (the PyTorch binding) against plain PyTorch: python/oracle.py, an independent float64
implementation of docs/MIXERS.md, run through torch.autograd. For every mechanism of the registry
and each of its forms (causal, non-causal):
- outputs and the gradients of every input (the initial state and, through the final state,
  fla's dht included) of the float32 ops vs the float64 oracle, fla's relative RMS error per
  tensor: outputs 1e-4 (float32 kernels accumulate ~1e-6 relative; MIXERS.md's output tolerance
  is 1e-4), gradients 1e-3 (MIXERS.md's float32 gradient tolerance), a vanishing gradient
  compared at 1e-3 of the largest one's RMS;
- torch.autograd.gradcheck of the float64 ops (the reference and its tape) on tiny shapes;
- cu_seqlens (packed sequences) equal to the sequences run one by one, outputs, final states
  and gradients; chunked calls with the state handed on equal one call;
- inputs (read in place, without a copy) are left as they were by the forward and backward;
- bad inputs raise ValueError naming the tensor.
Run: PYTHONPATH=python python3 -m pytest tests/torch_ops_test.py (CTest: torch_ops)."""
import os
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "python"))
import linmix  # noqa: E402
import oracle  # noqa: E402

OPS = linmix.ops
SPECS = OPS.SPECS
STATEFUL = sorted(OPS.STATEFUL)


def forms():
    out = []
    for name, s in sorted(SPECS.items()):
        for causal in (False, True):
            if s["causal" if causal else "noncausal"]:
                out.append(pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'noncausal'}"))
    return out


def numbers(params):
    return {k: float(v) for k, v in params.items()}


def rel_rms(got, want, floor=0.0):
    err = (got.double() - want.double()).pow(2).mean().sqrt().item()
    if err == 0:
        return 0.0
    return err / max(want.double().pow(2).mean().sqrt().item(), floor, 1e-30)


def oracle_outputs(name, causal, x64, params):
    """y and the final state(s) of the plain PyTorch oracle (float64, autograd)."""
    if name in OPS.STATEFUL and causal:
        return oracle.STATE_ORACLES[name](x64, params)
    return oracle.ORACLES[name](x64, causal, params), {}


def split_state(name, x):
    inputs = {n: t for n, t in x.items() if not n.startswith("state.")}
    state = {n[6:]: t for n, t in x.items() if n.startswith("state.")}
    if not state:
        return inputs, None
    return inputs, (next(iter(state.values())) if len(state) == 1 else state)


def run_op(name, causal, x, params, want_final):
    inputs, state = split_state(name, x)
    kw = {"initial_state": state, "output_final_state": want_final} if SPECS[name]["state"] else {}
    out = OPS.call(name, inputs, causal=causal, **kw, **numbers(params))
    if not SPECS[name]["state"]:
        return out, None
    y, final = out
    if isinstance(final, torch.Tensor):
        final = {SPECS[name]["state"][0]["name"]: final}
    elif final is not None:
        final = {"state." + k: v for k, v in final.items()}
    return y, final


@pytest.mark.parametrize("name,causal", forms())
@pytest.mark.parametrize("T", [7, 70])
def test_outputs_and_gradients_vs_plain_pytorch(name, causal, T):
    spec = SPECS[name]
    params = dict(spec["example_params"])
    stateful = name in OPS.STATEFUL and causal
    x = OPS.example(name, T, causal=causal, seed=T, state=stateful)
    x64 = {n: t.double().requires_grad_(True) for n, t in x.items()}
    y_ref, fin_ref = oracle_outputs(name, causal, x64, params)
    x32 = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    kept = {n: t.detach().clone() for n, t in x32.items()}  # the op reads its inputs in place: never writes them
    y, fin = run_op(name, causal, x32, params, stateful)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_rms(y, y_ref) <= 1e-4, f"y rel-rms {rel_rms(y, y_ref):.2e}"
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    loss_ref, loss = (y_ref * dy).sum(), (y * dy.float()).sum()
    for n, S in fin_ref.items():  # the final state: value, and a gradient flowing into it (dht)
        assert rel_rms(fin[n], S) <= 1e-4, f"{n} rel-rms {rel_rms(fin[n], S):.2e}"
        dS = torch.randn(S.shape, generator=g, dtype=torch.float64)
        loss_ref = loss_ref + (S * dS).sum()
        loss = loss + (fin[n] * dS.float()).sum()
    loss_ref.backward()
    loss.backward()
    want = {n: (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in x64.items()}
    floor = 1e-3 * max(w.pow(2).mean().sqrt().item() for w in want.values())
    for n, t in x32.items():
        got = t.grad if t.grad is not None else torch.zeros_like(t)
        e = rel_rms(got, want[n], floor)
        assert e <= 1e-3, f"d{n} rel-rms {e:.2e}"
        assert torch.equal(t.detach(), kept[n]), f"{n} was written by the forward or backward"


# The causal forms on the gated chunked kernels (mixers/decay_forms.h gated_heads): their float32
# forward keeps its chunk states, scores and rows for the backward (linmix::RunSaved); flash keeps
# its groups' linear states, scores and y in both forms.
KEEPS = {"linear", "norm_linear", "performer", "flow", "retention", "gla", "rwkv5", "rwkv6", "mamba2"}
KEEPS_BOTH = {"flash"}


@pytest.mark.parametrize("name,causal", forms())
def test_backward_on_what_the_forward_kept_equals_the_recomputing_one(name, causal):
    """The backward on a forward's saved chunk states (what linmix.ops runs under autograd) gives
    exactly what the backward that recomputes the forward gives: every gradient and the final state
    (y is the forward's: the backward on a kept forward leaves it out)."""
    if not SPECS[name].get("backward"):
        pytest.skip("no float32 backward")
    stateful = name in OPS.STATEFUL and causal
    x = OPS.example(name, 70, causal=causal, seed=3, state=stateful)  # 70: two chunks of 64
    p = OPS._params_text(numbers(dict(SPECS[name]["example_params"])))
    saved = linmix._C.Saved()
    fwd = linmix._C.run(name, "parallel", causal, p, x, False, 0, True, True, saved)
    assert saved.kept == ((causal and name in KEEPS) or name in KEEPS_BOTH), f"kept: {saved.kept}"
    g = torch.Generator().manual_seed(2)
    dout = {"dy": torch.randn(fwd["y"].shape, generator=g)}
    for n, t in fwd.items():
        if n.startswith("state."):
            dout["dfinal." + n[6:]] = torch.randn(t.shape, generator=g)
    want = linmix._C.run(name, "parallel", causal, p, {**x, **dout}, True, 0, True, False)
    got = linmix._C.run(name, "parallel", causal, p, {**x, **dout}, True, 0, True, False, saved)
    assert set(got) == set(want) - ({"y"} if saved.kept else set())
    for n in got:
        assert torch.equal(got[n], want[n]), f"{n}: max |diff| {(got[n] - want[n]).abs().max().item():.3e}"
    if saved.kept:  # the backward's y is the forward's rows under the same epilogue
        assert torch.equal(fwd["y"], want["y"])


def tiny(name, causal, T=4):
    x = OPS.example(name, T, causal=causal, seed=3, scale="grad", state=name in OPS.STATEFUL and causal)
    counts = {s["name"] for s in SPECS[name]["state"] if s.get("count")}  # a position: not differentiable
    return {n: t.double().requires_grad_(n not in counts) for n, t in x.items()}


@pytest.mark.parametrize("name,causal", forms())
def test_gradcheck_float64(name, causal):
    spec = SPECS[name]
    params = numbers(spec["example_params"])
    x = tiny(name, causal)
    names = list(x)
    stateful = name in OPS.STATEFUL and causal

    def f(*ts):
        inputs, state = split_state(name, dict(zip(names, ts)))
        if not spec["state"]:
            return OPS.call(name, inputs, causal=causal, **params)
        y, fin = OPS.call(name, inputs, causal=causal, initial_state=state, output_final_state=stateful, **params)
        if not stateful:
            return y
        return (y, *(fin.values() if isinstance(fin, dict) else (fin,)))

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in names), eps=1e-6, atol=1e-6, rtol=1e-5)


def packed(name, T_parts, seed=5):
    """B = 1 inputs of total length sum(T_parts) and per-sequence initial states."""
    x = OPS.example(name, sum(T_parts), causal=True, seed=seed, dims={"B": 1}, state=False)
    st = OPS.example(name, 2, causal=True, seed=seed + 1, dims={"B": len(T_parts)}, state=True)
    return x, {n[6:]: t for n, t in st.items() if n.startswith("state.")}


def _state_arg(st):
    """A state dict {name: tensor} as the op takes it: the tensor when there is one."""
    return next(iter(st.values())) if len(st) == 1 else st


def _state_dict(final, like):
    return {next(iter(like)): final} if isinstance(final, torch.Tensor) else final


def is_cache(name):  # a key/value cache state: its length L grows with the tokens
    return any("L" in s["dims"].split(",") for s in SPECS[name]["state"])


@pytest.mark.parametrize("name", STATEFUL)
def test_cu_seqlens_equals_sequences_one_by_one(name):
    spec = SPECS[name]
    params = numbers(spec["example_params"])
    parts = [5, 0, 70, 1, 13]
    x, st = packed(name, parts)
    cu = torch.tensor([0] + list(torch.tensor(parts).cumsum(0)), dtype=torch.int64)
    per_token = {i["name"] for i in spec["inputs"] if i["dims"].startswith("B,T")}
    if is_cache(name):  # caches that end unequally long are not stacked: refused
        with pytest.raises(ValueError, match="differ in length"):
            OPS.call(name, x, initial_state=_state_arg(st), output_final_state=True, cu_seqlens=cu, **params)
        parts = [5, 5, 5]  # equal lengths from equal caches: the caches end equally long
        x, st = packed(name, parts)
        cu = torch.tensor([0] + list(torch.tensor(parts).cumsum(0)), dtype=torch.int64)
    xa = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    h0a = {n: t.clone().requires_grad_(True) for n, t in st.items()}
    y, fin = OPS.call(name, xa, initial_state=_state_arg(h0a), output_final_state=True, cu_seqlens=cu, **params)
    fin = _state_dict(fin, st)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(y.shape, generator=g)
    dfin = {n: torch.randn(f.shape, generator=g) for n, f in fin.items()}
    ((y * dy).sum() + sum((fin[n] * dfin[n]).sum() for n in fin)).backward()
    xb = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    h0b = {n: t.clone().requires_grad_(True) for n, t in st.items()}
    ys, fins = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = {n: t[i:i + 1] for n, t in h0b.items()}
        if e == s:
            fins.append(init)
            continue
        sub = {n: (t[:, s:e] if n in per_token else t) for n, t in xb.items()}
        yi, fi = OPS.call(name, sub, initial_state=_state_arg(init), output_final_state=True, **params)
        ys.append(yi)
        fins.append(_state_dict(fi, st))
    y2 = torch.cat(ys, 1)
    fin2 = {n: torch.cat([f[n] for f in fins], 0) for n in st}
    ((y2 * dy).sum() + sum((fin2[n] * dfin[n]).sum() for n in fin2)).backward()
    assert torch.equal(y, y2) and all(torch.equal(fin[n], fin2[n]) for n in st)
    for n in x:
        assert torch.equal(xa[n].grad, xb[n].grad), f"d{n}"
    for n in st:
        assert torch.equal(h0a[n].grad, h0b[n].grad), f"d initial {n}"


@pytest.mark.parametrize("name", STATEFUL)
def test_chunks_with_the_state_handed_on_equal_one_call(name):
    spec = SPECS[name]
    params = numbers(spec["example_params"])
    x = OPS.example(name, 150, causal=True, seed=9, state=True)
    inputs = {n: t for n, t in x.items() if not n.startswith("state.")}
    h0 = {n[6:]: t for n, t in x.items() if n.startswith("state.")}
    per_token = {i["name"] for i in spec["inputs"] if i["dims"].startswith("B,T")}
    xa = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
    y, fin = OPS.call(name, xa, initial_state=_state_arg(h0), output_final_state=True, **params)
    fin = _state_dict(fin, h0)
    g = torch.Generator().manual_seed(4)
    dy = torch.randn(y.shape, generator=g)
    dfin = {n: torch.randn(f.shape, generator=g) for n, f in fin.items()}
    ((y * dy).sum() + sum((fin[n] * dfin[n]).sum() for n in fin)).backward()
    xb = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
    state, ys = h0, []
    for s, e in ((0, 37), (37, 101), (101, 150)):  # crossing the kernels' chunk of 64
        sub = {n: (t[:, s:e] if n in per_token else t) for n, t in xb.items()}
        yi, state = OPS.call(name, sub, initial_state=_state_arg(state), output_final_state=True, **params)
        state = _state_dict(state, h0)
        ys.append(yi)
    y2 = torch.cat(ys, 1)
    ((y2 * dy).sum() + sum((state[n] * dfin[n]).sum() for n in state)).backward()
    assert rel_rms(y2, y) <= 1e-5 and all(rel_rms(state[n], fin[n]) <= 1e-5 for n in fin)
    for n in inputs:
        assert rel_rms(xb[n].grad, xa[n].grad) <= 1e-4, f"d{n}"


def test_every_state_is_differentiable():
    # every mechanism with a recurrent state carries it through its parallel form and backward
    # (the tests above then cover it): none is left to a forward-only recurrent path
    assert {n for n, s in SPECS.items() if s["state"]} == OPS.STATEFUL


def test_threads_follow_torch():
    x = OPS.example("gla", 70, seed=1)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = OPS.gla(**x)[0]
    finally:
        torch.set_num_threads(n)
    assert torch.allclose(y1, OPS.gla(**x)[0], atol=1e-6)


def test_non_contiguous_inputs_are_handled():
    x = OPS.example("gla", 20, seed=1)
    q = x["q"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not q.is_contiguous()
    assert torch.equal(OPS.gla(**{**x, "q": q})[0], OPS.gla(**x)[0])


def raises(match, f):
    with pytest.raises(ValueError, match=match):
        f()


def test_bad_inputs_raise_naming_the_tensor():
    x = OPS.example("gla", 9, seed=1)
    raises("'v'", lambda: OPS.gla(**{**x, "v": x["v"][:, :, :1, :]}))            # wrong shape
    raises("'k'", lambda: OPS.gla(**{**x, "k": x["k"].double()}))                # mixed dtypes
    raises("'q'", lambda: OPS.gla(**{**x, "q": x["q"].int()}))                   # not floating
    bad = x["q"].clone()
    bad[0, 0, 0, 0] = float("nan")
    raises("'q'", lambda: OPS.gla(**{**x, "q": bad}))                            # NaN
    raises("'g'", lambda: OPS.gla(**{**x, "g": x["g"].abs() + 1}))               # positive log decay
    raises("missing input", lambda: OPS.gla(x["q"], x["k"]))
    raises("unknown param", lambda: OPS.gla(**x, nosuch=1))
    raises("unknown mechanism", lambda: OPS.mix("nosuch", q=x["q"]))
    raises("initial_state", lambda: OPS.gla(**x, initial_state={"Z": x["q"]}))
    raises("causal", lambda: OPS.gla(**x, causal=False))
    raises("cu_seqlens", lambda: OPS.gla(**x, cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)))
    raises("batch is 1", lambda: OPS.gla(**x, cu_seqlens=torch.tensor([0, 3, 9])))
    x1 = OPS.example("gla", 9, seed=1, dims={"B": 1})
    raises("rise from 0", lambda: OPS.gla(**x1, cu_seqlens=torch.tensor([0, 5, 3, 9])))
    raises("'state.S'", lambda: OPS.gla(**x, initial_state=torch.zeros(2, 1, 1, 1)))


def test_the_extension_is_the_build_the_cpu_and_LINMIX_ARCH_ask_for():
    # _C_v4 (x86-64-v4, AVX-512) where the CPU has it and it was built, unless LINMIX_ARCH pins the
    # portable _C (x86-64-v3); a native build reports "native"
    want = os.environ.get("LINMIX_ARCH", "auto")
    built_v4 = any(f.startswith("_C_v4.") for f in os.listdir(os.path.dirname(linmix.__file__)))
    if want == "x86-64-v3" or not (built_v4 and linmix._cpu_has_x86_64_v4()):
        assert linmix._C.ARCH in ("x86-64-v3", "native") and linmix._C.__name__ == "linmix._C"
    else:
        assert linmix._C.ARCH == "x86-64-v4" and linmix._C.__name__ == "linmix._C_v4"
    assert OPS._C is linmix._C and linmix.nn._C is linmix._C


def test_mix_by_name_equals_the_op():
    x = OPS.example("retention", 30, seed=2)
    y1, _ = OPS.mix("retention", **x)
    y2, _ = OPS.retention(**x)
    assert torch.equal(y1, y2)


def test_unchecked_values_reach_the_output_without_a_crash():
    # set_check_values(False): torch's convention, a NaN in any input comes out in y (and its
    # gradients) instead of raising; every mechanism, every input, forward and backward survive it
    # (a mechanism's own domain checks, e.g. rwkv4's w > 0, still refuse a NaN by name)
    before = OPS.set_check_values(False)
    try:
        for name, spec in OPS.SPECS.items():
            x = OPS.example(name, 9, seed=2)
            x = {k: v for k, v in x.items() if not k.startswith("state.")}
            params = numbers(spec["example_params"])
            clean = {k: v.clone().requires_grad_(True) for k, v in x.items()}
            y = OPS.mix(name, **clean, **params)
            (y[0] if isinstance(y, tuple) else y).sum().backward()
            for n in x:
                bad = {k: v.clone().requires_grad_(True) for k, v in x.items()}
                with torch.no_grad():
                    bad[n].view(-1)[0] = float("nan")
                try:
                    y = OPS.mix(name, **bad, **params)
                except ValueError as e:
                    assert f"'{n}'" in str(e), f"{name}: NaN in '{n}': {e}"
                    continue
                y = y[0] if isinstance(y, tuple) else y
                if clean[n].grad is not None and clean[n].grad.view(-1)[0] != 0:  # (an element y depends on)
                    assert not torch.isfinite(y).all(), f"{name}: NaN in '{n}' did not reach y"
                y.sum().backward()
        x = OPS.example("gla", 9, seed=1)
        x["q"][0, 0, 0, 0] = float("nan")
        assert torch.isnan(OPS.gla(**x)[0]).any()
    finally:
        OPS.set_check_values(before)
    raises("'q'", lambda: OPS.gla(**x))  # checked again
