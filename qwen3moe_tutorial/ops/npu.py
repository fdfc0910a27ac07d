"""The NPU provider: torch_npu's fused kernels, looked up by name on first use.

- torch_npu is imported only when an NPU kernel is first needed (through platform.torch_npu_module), so this
  module imports fine on a machine without it.
- No adapter code: the references in reference.py take exactly torch_npu's arguments, so a call is passed
  through unchanged. `torch_npu.X` is an alias of `torch.ops.npu.X` (torch_npu's `utils/custom_ops.py`).
"""
from __future__ import annotations

from ..platform import torch_npu_module

_kernels: dict = {}          # op name -> torch_npu callable, filled on first use


def available() -> bool:
    """True when torch_npu imports here (whether an NPU device is visible is platform.npu_available())."""
    return torch_npu_module() is not None


def require():
    """Return the torch_npu module, or raise a RuntimeError that says how to get it."""
    mod = torch_npu_module()
    if mod is None:
        raise RuntimeError("the 'npu' ops provider was requested, but torch_npu is not installed or cannot load "
                           "(install requirements-npu.txt and source CANN's set_env.sh), or use the "
                           "'reference' provider: ops.use_provider('reference') / QWEN3MOE_OPS=reference")
    return mod


def kernel(name: str):
    """The torch_npu callable for op `name` (e.g. torch_npu.npu_swiglu)."""
    fn = _kernels.get(name)
    if fn is None:
        fn = getattr(require(), name)
        _kernels[name] = fn
    return fn
