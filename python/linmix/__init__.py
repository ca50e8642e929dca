"""linmix: linear-time token mixers on the CPU, from PyTorch.

    import torch, linmix
    o, h = linmix.ops.gla(q, k, g=g, v=v, output_final_state=True)   # fla's conventions

``linmix.ops`` has one autograd op per mechanism of the registry (``linmix.ops.SPECS``);
``linmix.nn`` the model's layers and the language model, loading and saving ``linmix train``
checkpoints. The C++ library is the extension ``linmix._C`` (built by the project's CMake
release build into this folder, or by ``pip install`` from the checkout).
"""
from . import _C  # noqa: F401
from . import ops  # noqa: F401


from . import nn  # noqa: F401,E402

__all__ = ["ops", "nn"]
