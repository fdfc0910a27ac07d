"""Profiling decode steps: operators per token and where the time goes (torch.profiler).

- "Operators per token" counts the *top-level* operators one decode step dispatches, i.e. those
  called from Python rather than from inside another operator; a fused op of `ops` counts once
  (it is one kernel on the NPU), views and no-op conversions not at all. Each counted operator is
  at least one kernel launch on an accelerator: the number fusion and graph mode drive down. A
  compiled graph ("Torch-Compiled Region") counts once, as its single launch on the NPU.
- Works with any runner of generate.py; on an NPU, torch_npu's profiler is used by the final CLI
  (a later chapter); here torch.profiler's CPU activity is enough to count and rank operators.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from . import ops


GRAPH_LAUNCH = "Torch-Compiled Region"     # one compiled graph: a single launch on the NPU (GE / ACL graph)


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "ops::", GRAPH_LAUNCH))


def _dispatched(events) -> list:
    """Operators called from Python: aten ops and fused ops ("ops::<name>" ranges) with no operator
    above them. A fused op counts once, whatever its reference kernel calls underneath."""
    out = []
    for ev in events:
        if not _is_op(ev.name):
            continue
        parent = ev.cpu_parent
        while parent is not None and not _is_op(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            out.append(ev)
    return out


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence the profiler's native start/stop log lines (written to fd 2, not Python's stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@torch.no_grad()
def profile_decode(runner, prompt_ids: list[int], steps: int = 4, warmup: int = 2, device="cpu"):
    """Prefill, run `warmup` decode steps, then profile `steps` more; returns the profiler."""
    ids = torch.tensor([prompt_ids], device=device)
    with ops.annotate_ops():              # warm up exactly as profiled: no compile inside the window
        token = runner.prefill(ids).argmax(-1, keepdim=True)
        pos = len(prompt_ids)
        for _ in range(warmup):
            token = runner.decode(token, pos).argmax(-1, keepdim=True)
            pos += 1
        with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                token = runner.decode(token, pos).argmax(-1, keepdim=True)
                pos += 1
    prof.steps = steps
    return prof


# Operators that only make a new view of existing memory: no kernel runs on any device.
VIEW_OPS = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "select", "slice", "unsqueeze", "squeeze", "transpose", "permute", "expand",
    "as_strided", "t", "detach", "alias", "chunk", "split", "unbind", "narrow", "view_as", "expand_as",
    "lift_fresh", "resolve_conj", "resolve_neg"))
MAYBE_NOOP_OPS = frozenset(("aten::to", "aten::contiguous", "aten::reshape", "aten::flatten", "aten::type_as"))


def is_kernel(ev) -> bool:
    """True when a top-level operator does work (not a view, not a no-op conversion)."""
    if ev.name.startswith(("ops::", GRAPH_LAUNCH)):
        return True
    if ev.name in VIEW_OPS:
        return False
    if ev.name in MAYBE_NOOP_OPS:             # a copy shows up as an aten child (_to_copy, clone, ...)
        return any(c.name.startswith("aten::") for c in ev.cpu_children)
    return True


def ops_per_token(prof, include_views: bool = False) -> tuple[float, Counter]:
    """Top-level aten operators per decode step, and their histogram over the profiled steps.

    Views and no-op conversions are left out unless `include_views`; the per-step `argmax` of the
    greedy loop is left out too: it is the sampler, not the model."""
    events = [ev for ev in _dispatched(prof.events()) if include_views or is_kernel(ev)]
    names = Counter(ev.name for ev in events)
    names.pop("aten::argmax", None)
    return sum(names.values()) / prof.steps, names
