"""linmix: linear-time token mixers on the CPU, from PyTorch.

    import torch, linmix
    o, h = linmix.ops.gla(q, k, g=g, v=v, output_final_state=True)   # fla's conventions

``linmix.ops`` has one autograd op per mechanism of the registry (``linmix.ops.SPECS``);
``linmix.nn`` the model's layers and the language model, loading and saving ``linmix train``
checkpoints. The C++ library is the extension ``linmix._C`` (built by the project's CMake
release build into this folder, or by ``pip install`` from the checkout): the portable build
(x86-64-v3, AVX2), or where the CPU has AVX-512 its x86-64-v4 sibling ``_C_v4``, built beside it
(``linmix._C.ARCH`` says which; ``LINMIX_ARCH=x86-64-v3`` in the environment keeps the portable one).
"""
import importlib as _importlib
import os as _os
import sys as _sys


def _cpu_has_x86_64_v4():
    """AVX-512 F, BW, CD, DQ and VL, as the kernel reports them (it leaves them out where it does
    not save the AVX-512 registers)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    except OSError:
        pass
    return False


def _load_extension():
    want = _os.environ.get("LINMIX_ARCH", "auto")
    if want not in ("auto", "x86-64-v3", "x86-64-v4"):
        raise ImportError(f"LINMIX_ARCH: expected auto, x86-64-v3 or x86-64-v4, found {want!r}")
    v4 = _cpu_has_x86_64_v4()
    if want == "x86-64-v4" and not v4:
        raise ImportError("LINMIX_ARCH=x86-64-v4: this CPU has no AVX-512 (F, BW, CD, DQ, VL)")
    if want != "x86-64-v3" and v4:
        try:
            module = _importlib.import_module(__name__ + "._C_v4")
        except ImportError:
            if want == "x86-64-v4":
                raise
        else:
            _sys.modules[__name__ + "._C"] = module  # `from . import _C` anywhere finds this one
            return module
    return _importlib.import_module(__name__ + "._C")


_C = _load_extension()
from . import ops  # noqa: F401


from . import nn  # noqa: F401,E402

__all__ = ["ops", "nn"]
