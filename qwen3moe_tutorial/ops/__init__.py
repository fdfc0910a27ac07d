"""The one dispatch point for fused ops: `ops.npu_swiglu(x)` runs torch_npu's kernel for a tensor on an NPU
and the pure-PyTorch reference (ops/reference.py) for a tensor anywhere else.

- Every op keeps its torch_npu name, arguments and return values, so model code reads like the A3 recipe.
- Provider "auto" (default) decides per call from the device of the first tensor argument; force one with
  `with ops.use_provider("reference"):` or QWEN3MOE_OPS=reference|npu|auto (read at import).
- It never moves tensors between devices and never falls back silently when "npu" is forced.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import npu as _npu
from . import reference
from .reference import OpInputError

PROVIDERS = ("auto", "reference", "npu")
ENV_VAR = "QWEN3MOE_OPS"


def _checked(name, where: str) -> str:
    if name not in PROVIDERS:
        raise ValueError(f"{where}: ops provider must be one of {', '.join(PROVIDERS)}; got {name!r}")
    return name


_setting = _checked(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_provider(name: str):
    """Force the provider inside a `with` block: "reference", "npu" (needs torch_npu) or "auto"."""
    global _setting
    _checked(name, "use_provider")
    if name == "npu":
        _npu.require()
    previous, _setting = _setting, name
    try:
        yield name
    finally:
        _setting = previous


def provider_setting() -> str:
    """The setting itself: "auto", "reference" or "npu"."""
    return _setting


def current_provider(device=None) -> str:
    """Which kernels an op on `device` runs now: "npu" or "reference".

    Without a device it answers for this machine's accelerator: an NPU if torch_npu sees one, else the CPU.
    """
    if _setting != "auto":
        return _setting
    if device is None:
        from ..platform import npu_available
        return "npu" if npu_available() else "reference"
    return "npu" if torch.device(device).type == "npu" else "reference"


def _first_tensor(args, kwargs):
    first = args[0] if args else next(iter(kwargs.values()))
    return first[0] if isinstance(first, (list, tuple)) else first      # grouped matmul takes lists


torch.compiler.is_compiling()   # import dynamo now, not inside the first (timed) op call
_annotate = False     # set by profile.annotate_ops(): label each call so a profile counts it as one operator


@contextlib.contextmanager
def annotate_ops():
    """Inside this block every op call is wrapped in a profiler range named "ops::<name>", so a
    profile counts a fused op as the one kernel it is on the NPU, not as its reference's aten ops."""
    global _annotate
    previous, _annotate = _annotate, True
    try:
        yield
    finally:
        _annotate = previous


def _dispatcher(name: str):
    """Wrap reference.<name>: same signature and docstring, kernel chosen per call (cheap, compile-safe)."""
    ref = getattr(reference, name)
    label = f"ops::{name}"

    @functools.wraps(ref)
    def op(*args, **kwargs):
        if not torch.compiler.is_compiling() and _annotate:      # (no dynamo guard on _annotate)
            with torch.profiler.record_function(label):
                return _call(*args, **kwargs)
        return _call(*args, **kwargs)

    def _call(*args, **kwargs):
        setting = _setting
        if setting == "reference" or (setting == "auto" and _first_tensor(args, kwargs).device.type != "npu"):
            return ref(*args, **kwargs)
        return _npu.kernel(name)(*args, **kwargs)

    return op


npu_swiglu = _dispatcher("npu_swiglu")
npu_rms_norm = _dispatcher("npu_rms_norm")
npu_add_rms_norm = _dispatcher("npu_add_rms_norm")
npu_moe_gating_top_k_softmax = _dispatcher("npu_moe_gating_top_k_softmax")
npu_moe_init_routing = _dispatcher("npu_moe_init_routing")
npu_moe_init_routing_v2 = _dispatcher("npu_moe_init_routing_v2")
npu_moe_compute_expert_tokens = _dispatcher("npu_moe_compute_expert_tokens")
npu_moe_finalize_routing = _dispatcher("npu_moe_finalize_routing")
npu_grouped_matmul = _dispatcher("npu_grouped_matmul")
npu_fused_infer_attention_score = _dispatcher("npu_fused_infer_attention_score")
npu_apply_rotary_pos_emb = _dispatcher("npu_apply_rotary_pos_emb")
scatter_update_ = _dispatcher("scatter_update_")
npu_scatter_nd_update_ = _dispatcher("npu_scatter_nd_update_")
npu_format_cast = _dispatcher("npu_format_cast")

OP_NAMES = (
    "npu_swiglu", "npu_rms_norm", "npu_add_rms_norm", "npu_moe_gating_top_k_softmax", "npu_moe_init_routing",
    "npu_moe_init_routing_v2", "npu_moe_compute_expert_tokens", "npu_moe_finalize_routing",
    "npu_grouped_matmul", "npu_fused_infer_attention_score", "npu_apply_rotary_pos_emb", "scatter_update_",
    "npu_scatter_nd_update_", "npu_format_cast",
)

__all__ = [*OP_NAMES, "OP_NAMES", "PROVIDERS", "ENV_VAR", "OpInputError", "use_provider", "provider_setting",
           "current_provider", "annotate_ops", "reference"]
