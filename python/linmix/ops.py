"""Every mechanism of linmix's registry as a CPU autograd op, with flash-linear-attention's
conventions: ``linmix.ops.<name>(*inputs, causal=..., initial_state=None,
output_final_state=False, cu_seqlens=None, **params)``.

- Inputs by their docs/MIXERS.md names and layouts (``[B,T,H,D]`` per head, ``[B,T,C]`` per
  channel), required ones positional, optional ones keyword; params (MIXERS.md) as keywords.
- Mechanisms with a recurrent state return ``(o, final_state)``; ``final_state`` is None unless
  ``output_final_state=True``. ``initial_state`` / ``final_state``: the MIXERS.md state, a tensor
  when the mechanism has one state tensor, else a dict by name (``{"S": ..., "z": ...}``).
- float32 runs the mechanism's fast parallel form and its hand-written backward; float64 runs the
  float64 reference and its tape gradient (``torch.autograd.gradcheck`` works on small shapes).
  Gradients reach every floating input, ``initial_state`` and, through ``final_state``, fla's
  ``dht``, for the mechanisms whose parallel form carries a state (STATEFUL: linear,
  norm_linear, rwkv4, s4d, mamba, retention, gla, deltanet, gated_deltanet, rwkv5, rwkv6, rwkv7, mamba2,
  aft_simple, aft_local, aft_conv, performer, flow, flash, softmax, block_softmax, aft_full: every
  mechanism with a state; a cache or ring grows, so with cu_seqlens the final caches must end
  equally long).
- ``cu_seqlens`` (int64 ``[N+1]``, B = 1): N packed sequences, each from its own initial state
  (row i of ``initial_state``), final states stacked in the same order.
- Threads follow ``torch.get_num_threads()``. Bad input raises ValueError naming the tensor.
- Input values are checked (a NaN or infinity raises ValueError naming the tensor and element;
  a positive log decay too): for 20 mechanisms' causal forward inside the kernel's own reads of
  the per-token inputs, otherwise one pass over the inputs before it (~0.3-0.5 ms for 24 MB);
  aft_local's ``w`` only in the band the forms read. ``set_check_values(False)`` leaves them
  unchecked, as torch's own ops do: a non-finite input then reaches the
  output (NaN in, NaN out) instead of raising. Shapes, dtypes and devices are always checked.
"""
import inspect
import json

import torch

from . import _C

SPECS = {s["name"]: s for s in json.loads(_C.mixers_json())}
# those whose parallel form starts from a state and returns the final one (and differentiates both)
STATEFUL = {n for n, s in SPECS.items() if s.get("state_all_modes")}


def _threads():
    return torch.get_num_threads()


_check_values = True


def set_check_values(on):
    """Check the input values of every later float32 call (True, the default) or not; returns the
    setting before. Unchecked, a NaN or infinity in an input is not named: it reaches the output."""
    global _check_values
    before, _check_values = _check_values, bool(on)
    return before


def _params_text(params):
    out = {}
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, (int, float)):
            raise ValueError(f"param '{k}': expected a number, found {type(v).__name__}")
        out[k] = repr(v)
    return out


class _Mix(torch.autograd.Function):
    """One call: tensors in the order of ``names`` (None where absent); outputs y and, when asked,
    the final states in the order of ``snames``."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        name, causal, params, names, snames, want, keep = meta
        given = {n: t for n, t in zip(names, tensors) if t is not None}
        f64 = next(iter(given.values())).dtype == torch.float64
        # float32 under autograd: the forward keeps what its backward reads (the gated kernels' chunk
        # states, fla's way), so the backward does not run the forward again
        # (keep: grad mode on where the op was called, and an input that requires grad)
        saved = _C.Saved() if keep and not f64 else None
        if f64:
            out = _C.run64(name, causal, params, given, None, _threads())
        else:
            out = _C.run(name, "parallel", causal, params, given, False, _threads(), bool(want), _check_values, saved)
        ctx.meta, ctx.f64, ctx.linmix_saved = meta, f64, saved
        ctx.save_for_backward(*tensors)
        return (out["y"],) + (tuple(out[s] for s in snames) if want else ())

    @staticmethod
    def backward(ctx, dy, *dfinal):
        name, causal, params, names, snames, want, _ = ctx.meta
        tensors = ctx.saved_tensors
        given = {n: t for n, t in zip(names, tensors) if t is not None}
        dout = {"dy": dy.contiguous()}
        for s, d in zip(snames if want else (), dfinal):
            if d is not None:
                dout["dfinal." + s[len("state."):]] = d.contiguous()
        if ctx.f64:
            g = _C.run64(name, causal, params, given, dout, _threads())
        else:
            if not SPECS[name].get("backward"):
                raise NotImplementedError(f"linmix.ops.{name}: the parallel form has no backward yet; use float64")
            # the inputs' values were checked by the forward (autograd refuses them changed in
            # place since); dy, like any upstream gradient in torch, is not
            saved, ctx.linmix_saved = ctx.linmix_saved, None  # (a second backward, retain_graph, recomputes)
            # the final state asked for only when the forward returned it (its gradient is then in
            # dout): without it aft_local, aft_conv and flash take their forms without state copies
            g = _C.run(name, "parallel", causal, params, {**given, **dout}, True, _threads(), bool(want), False, saved,
                       False)  # the gradients only: y not copied out
        grads = []
        for i, (n, t) in enumerate(zip(names, tensors)):
            grads.append(g.get("d" + n) if t is not None and ctx.needs_input_grad[i + 1] else None)
        return (None, *grads)


def _check(name, given):
    dtype = None
    for n, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"linmix.ops.{name}: '{n}' must be a torch.Tensor, found {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"linmix.ops.{name}: tensor '{n}' is on {t.device}, linmix runs on the CPU")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"linmix.ops.{name}: tensor '{n}' is {t.dtype}, expected float32 or float64")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            raise ValueError(f"linmix.ops.{name}: tensor '{n}' is {t.dtype}, the others {dtype}: one dtype per call")
    return dtype


def _state_map(name, spec, state, what):
    """initial_state as {"state.<name>": tensor}: a tensor for a one-tensor state, else a dict."""
    if state is None:
        return {}
    names = [s["name"] for s in spec["state"]]
    if isinstance(state, torch.Tensor):
        if len(names) != 1:
            raise ValueError(f"linmix.ops.{name}: its state has {len(names)} tensors "
                             f"({', '.join(n[6:] for n in names)}): pass {what} as a dict")
        return {names[0]: state}
    if not isinstance(state, dict):
        raise ValueError(f"linmix.ops.{name}: {what} must be a tensor or a dict of tensors")
    out = {}
    for k, v in state.items():
        key = k if k.startswith("state.") else "state." + k
        if key not in names:
            raise ValueError(f"linmix.ops.{name}: {what} has no tensor '{k}' (its state: "
                             f"{', '.join(n[6:] for n in names)})")
        out[key] = v
    return out


def _state_out(spec, finals):
    names = [s["name"] for s in spec["state"]]
    if len(names) == 1:
        return finals[names[0]]
    return {n[6:]: finals[n] for n in names}


def _keep(tensors):
    """Whether the forward keeps what its backward reads: a backward can follow (grad mode on, an
    input that requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())


def _one(name, spec, given, causal, state, want, params):
    """One sequence batch: (y, {state.<name>: final} or None)."""
    snames = tuple(s["name"] for s in spec["state"])
    if name in STATEFUL:
        tensors = {**given, **state}
        names = tuple(tensors)
        outs = _Mix.apply((name, causal, params, names, snames, want, _keep(tensors)), *tensors.values())
        return outs[0], (dict(zip(snames, outs[1:])) if want else None)
    if state or want:  # (every mechanism with a state carries it in its parallel form: STATEFUL)
        raise ValueError(f"linmix.ops.{name}: its parallel form takes no state")
    names = tuple(given)
    return _Mix.apply((name, causal, params, names, (), False, _keep(given)), *given.values())[0], None


def _varlen(name, spec, given, causal, state, want, params, cu):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int64 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"linmix.ops.{name}: cu_seqlens must be an int64 tensor [N+1], found "
                         f"{getattr(cu, 'dtype', type(cu).__name__)} {list(getattr(cu, 'shape', []))}")
    per_token = {i["name"] for i in spec["inputs"] if i["dims"].startswith("B,T")}
    T = None
    for n, t in given.items():
        if n in per_token:
            if t.dim() < 2 or t.shape[0] != 1:
                raise ValueError(f"linmix.ops.{name}: with cu_seqlens the batch is 1 (packed sequences); "
                                 f"'{n}' has shape {list(t.shape)}")
            T = t.shape[1] if T is None else T
    c = [int(x) for x in cu.tolist()]
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"linmix.ops.{name}: cu_seqlens must rise from 0 to T = {T}, found {c}")
    N = len(c) - 1
    for k, v in state.items():
        if v.shape[0] != N:
            raise ValueError(f"linmix.ops.{name}: initial_state '{k[6:]}' has {v.shape[0]} rows for {N} sequences")
    if T == 0 or N == sum(1 for a, b in zip(c, c[1:]) if a == b):
        raise ValueError(f"linmix.ops.{name}: cu_seqlens {c} holds no token")
    ys, finals = [], []
    for i in range(N):
        s, e = c[i], c[i + 1]
        init = {k: v[i:i + 1] for k, v in state.items()}
        if e == s:  # an empty sequence: no output, its state handed on unchanged (zeros by default)
            finals.append(init or None)
            continue
        sub = {n: (t[:, s:e] if n in per_token else t) for n, t in given.items()}
        y, f = _one(name, spec, sub, causal, init, want, params)
        ys.append(y)
        finals.append(f)
    y = torch.cat(ys, dim=1)
    if not want:
        return y, None
    some = next(f for f in finals if f is not None)
    finals = [f if f is not None else {k: torch.zeros_like(v) for k, v in some.items()} for f in finals]
    for k in some:
        if len({tuple(f[k].shape) for f in finals}) > 1:
            raise ValueError(f"linmix.ops.{name}: the packed sequences' final states differ in length ('{k[6:]}', "
                             f"a key/value cache grows with each sequence's tokens): output_final_state=True with "
                             f"cu_seqlens needs caches that end equally long; run the sequences one by one")
    return y, {k: torch.cat([f[k] for f in finals], 0) for k in some}


def call(name, tensors, causal=None, initial_state=None, output_final_state=False, cu_seqlens=None, **params):
    """linmix.ops.<name> for a name known at run time: tensors {input name: tensor}."""
    if name not in SPECS:
        raise ValueError(f"linmix.ops: unknown mechanism '{name}' (known: {', '.join(sorted(SPECS))})")
    spec = SPECS[name]
    if causal is None:
        causal = spec["causal"]
    given = {n: t for n, t in tensors.items() if t is not None}
    known = {i["name"] for i in spec["inputs"]}
    for n in given:
        if n not in known:
            raise ValueError(f"linmix.ops.{name}: unexpected tensor '{n}' (inputs: {', '.join(i['name'] for i in spec['inputs'])})")
    state = _state_map(name, spec, initial_state, "initial_state")
    _check(name, {**given, **state})
    if (state or output_final_state) and not spec["state"]:
        raise ValueError(f"linmix.ops.{name}: the mechanism has no recurrent state")
    if (state or output_final_state) and not causal:
        raise ValueError(f"linmix.ops.{name}: a state exists only in the causal form (causal=True)")
    p = _params_text(params)
    if cu_seqlens is not None:
        y, final = _varlen(name, spec, given, bool(causal), state, bool(output_final_state), p, cu_seqlens)
    else:
        y, final = _one(name, spec, given, bool(causal), state, bool(output_final_state), p)
    if not spec["state"]:
        return y
    return y, (_state_out(spec, final) if output_final_state else None)


def example(name, T, causal=None, seed=0, scale="test", dims=None, stress=0, state=False):
    """The mechanism's example inputs in its domain ({name: float32 tensor}; `linmix example`):
    sizes of a harness scale ("test", "grad", "demo", "bench") at length T, dims overriding them,
    stress 1/2 its stability inputs, state a random initial state ("state.<name>")."""
    spec = SPECS[name]
    return _C.example(name, spec["causal"] if causal is None else bool(causal), int(T), int(seed), scale, dims or {},
                      int(stress), bool(state))


def mix(name, causal=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    """Any mechanism by name: tensors and params as keywords (tensors are the torch.Tensor ones)."""
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    params = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    return call(name, tensors, causal, initial_state, output_final_state, cu_seqlens, **params)


def _make(name, spec):
    inputs = spec["inputs"]
    required = [i["name"] for i in inputs if not i["optional"]]
    optional = [i["name"] for i in inputs if i["optional"]]

    def op(*args, causal=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        if len(args) > len(required) + len(optional):
            raise ValueError(f"linmix.ops.{name}: {len(args)} positional tensors, it takes "
                             f"{len(required) + len(optional)} ({', '.join(required + optional)})")
        tensors = dict(zip(required + optional, args))
        for n in required + optional:
            if n in kw:
                if n in tensors:
                    raise ValueError(f"linmix.ops.{name}: '{n}' given twice")
                tensors[n] = kw.pop(n)
        missing = [n for n in required if tensors.get(n) is None]
        if missing:
            listing = ", ".join(i["name"] + " [" + i["dims"] + "]" for i in inputs)
            raise ValueError(f"linmix.ops.{name}: missing input tensor(s) {', '.join(missing)} (inputs: {listing})")
        return call(name, tensors, causal, initial_state, output_final_state, cu_seqlens, **kw)

    P = inspect.Parameter
    sig = [P(n, P.POSITIONAL_OR_KEYWORD) for n in required] + [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in optional]
    sig += [P("causal", P.KEYWORD_ONLY, default=spec["causal"])]
    if spec["state"]:
        sig += [P("initial_state", P.KEYWORD_ONLY, default=None), P("output_final_state", P.KEYWORD_ONLY, default=False),
                P("cu_seqlens", P.KEYWORD_ONLY, default=None)]
    else:
        sig += [P("cu_seqlens", P.KEYWORD_ONLY, default=None)]
    sig += [P(p["name"], P.KEYWORD_ONLY, default=None) for p in spec["params"]]  # None: the mechanism's default
    op.__signature__ = inspect.Signature(sig)
    op.__name__ = op.__qualname__ = name
    lines = [f"{spec['summary']} ({spec['paper']}).", "", "Inputs (docs/MIXERS.md):"]
    lines += [f"  {i['name']} [{i['dims']}]{' (optional)' if i['optional'] else ''}" for i in inputs]
    if spec["params"]:
        lines += ["Params (None: the default):"] + [f"  {p['name']} (default {p['default']}): {p['help']}" for p in spec["params"]]
    if spec["state"]:
        lines += ["State: " + ", ".join(f"{s['name'][6:]} [{s['dims']}]" for s in spec["state"]),
                  "Returns (o [" + spec["y"] + "], final_state or None)."]
    else:
        lines += ["Returns o [" + spec["y"] + "]."]
    op.__doc__ = "\n".join(lines)
    return op


for _name, _spec in SPECS.items():
    globals()[_name] = _make(_name, _spec)

__all__ = sorted(SPECS) + ["mix", "call", "example", "set_check_values", "SPECS", "STATEFUL"]
