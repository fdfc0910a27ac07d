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
import json
import os
import sys
import tempfile
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from . import ops


GRAPH_LAUNCH = "Torch-Compiled Region"     # one compiled graph: a single launch on the NPU (GE / ACL graph)


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "ops::", "c10d::", GRAPH_LAUNCH))


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
def quiet_native_stderr(enabled: bool = True):
    """Hold back the profiler's native start/stop log lines (written to fd 2, not Python's stderr).

    What was written is kept, and written out after all if the block fails, so a compiler's or
    runtime's own error text is never lost. `enabled=False` passes everything through (on an NPU:
    CANN reports graph-compilation errors on fd 2, and they must reach the user as they happen)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
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
    "as_strided", "t", "detach", "alias", "chunk", "split", "split_with_sizes", "unbind", "narrow", "view_as",
    "expand_as",
    "lift_fresh", "resolve_conj", "resolve_neg"))
MAYBE_NOOP_OPS = frozenset(("aten::to", "aten::contiguous", "aten::reshape", "aten::flatten", "aten::type_as"))


def is_kernel(ev) -> bool:
    """True when a top-level operator does work (not a view, not a no-op conversion)."""
    if ev.name.startswith(("ops::", "c10d::", GRAPH_LAUNCH)):
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


# ---- profiling a whole generation (final --profile DIR) ------------------------------------------
COLLECTIVE_WORDS = ("all_reduce", "allreduce", "all_gather", "allgather", "c10d", "gloo", "hccl", "nccl",
                    "broadcast", "reduce_scatter")


def generation_profiler(out_dir: str, device_kind: str, active: int, skip_first: int):
    """A profiler for `greedy_generate`, stepped once per generated token (prefill is step 0).

    NPU: torch_npu.profiler with the recipe's settings (CPU + NPU activities, Level1 with
    PipeUtilization, no shapes/stacks/memory, a schedule that skips the warm-up steps) and its
    tensorboard handler. Elsewhere: torch.profiler with the same schedule and a Chrome trace."""
    os.makedirs(out_dir, exist_ok=True)
    if device_kind == "npu":
        import torch_npu

        experimental = torch_npu.profiler._ExperimentalConfig(
            profiler_level=torch_npu.profiler.ProfilerLevel.Level1,
            aic_metrics=torch_npu.profiler.AiCMetrics.PipeUtilization)
        return torch_npu.profiler.profile(
            activities=[torch_npu.profiler.ProfilerActivity.CPU, torch_npu.profiler.ProfilerActivity.NPU],
            schedule=torch_npu.profiler.schedule(wait=0, warmup=0, active=active, repeat=1, skip_first=skip_first),
            on_trace_ready=torch_npu.profiler.tensorboard_trace_handler(out_dir),
            record_shapes=False, profile_memory=False, with_stack=False, experimental_config=experimental)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_kind == "cuda" else [])
    return profile(activities=activities,
                   schedule=torch.profiler.schedule(wait=0, warmup=0, active=active, repeat=1, skip_first=skip_first),
                   on_trace_ready=lambda p: p.export_chrome_trace(os.path.join(out_dir, "trace.json")))


def summarize(prof, steps: int, out_dir: str, top: int = 12) -> dict:
    """Top operators, collective vs compute time and operators per token of the profiled window;
    written next to the trace as summary.json, summary.md and summary.png."""
    events = prof.events()
    dispatched = [ev for ev in _dispatched(events) if is_kernel(ev) and ev.name != "aten::argmax"]
    total_us = sum(ev.cpu_time_total for ev in dispatched)
    collective_us = sum(ev.cpu_time_total for ev in dispatched if any(w in ev.name.lower() for w in COLLECTIVE_WORDS))
    by_name: dict[str, list] = {}
    for ev in dispatched:
        entry = by_name.setdefault(ev.name, [0, 0.0])
        entry[0] += 1
        entry[1] += ev.cpu_time_total
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    summary = {
        "profiled_decode_steps": steps,
        "ops_per_token": len(dispatched) / max(steps, 1),
        "time_per_token_ms": total_us / 1e3 / max(steps, 1),
        "collective_share": collective_us / total_us if total_us else 0.0,
        "top_operators": [{"name": n, "calls_per_token": c / max(steps, 1), "ms_per_token": t / 1e3 / max(steps, 1),
                           "share": t / total_us if total_us else 0.0} for n, (c, t) in ranked],
        "note": "host-side (CPU) operator times; on an NPU the device kernels are in the trace's NPU rows",
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_table(summary))
    plot_summary(summary, os.path.join(out_dir, "summary.png"))
    return summary


def summary_table(summary: dict) -> str:
    lines = [f"operators per token: {summary['ops_per_token']:.0f}; time in collectives: "
             f"{100 * summary['collective_share']:.0f}% of operator time", "",
             "| operator | calls/token | ms/token | share |", "|---|---:|---:|---:|"]
    lines += [f"| {o['name']} | {o['calls_per_token']:.1f} | {o['ms_per_token']:.3f} | {100 * o['share']:.0f}% |"
              for o in summary["top_operators"]]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: str | None = None):
    """Bar chart of the top operators' time per token and a collectives-vs-compute split."""
    import matplotlib
    if path:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ops_ = summary["top_operators"][::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    a.barh([o["name"] for o in ops_], [o["ms_per_token"] for o in ops_], color="#4c72b0")
    a.set_xlabel("ms per decode token (host time)")
    a.set_title(f"top operators ({summary['ops_per_token']:.0f} operators/token)")
    share = summary["collective_share"]
    b.bar(["collectives", "compute"], [100 * share, 100 * (1 - share)], color=["#c0504d", "#4c72b0"])
    b.set_ylabel("% of operator time")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
