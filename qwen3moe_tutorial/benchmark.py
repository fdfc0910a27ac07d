"""Measuring the ladder: per step, the tokens (vs hf_baseline), decode ms/token and operators/token.

- One protocol for every number in the book (design.md section 7): batch 1, fixed prompt,
  synchronised clock reads, the median decode step, best of a few repeats, compile excluded.
- `ladder_table` is the cumulative table the chapters grow one row at a time; the benchmark
  script (scripts/benchmark.py) writes the same rows, with provenance, to results/*.json.
- Single-rank measurements in-process; multi-rank ones through parallel.run_on_ranks.
"""
from __future__ import annotations

import os

import torch

from . import parallel
from .generate import greedy_generate
from .profile import ops_per_token, profile_decode
from .steps import STEP_NAMES, build_runner, generate_on_rank, launcher_env, recipe_upto


def measure_step(step: str, model_path: str, prompt_ids: list[int], new_tokens: int = 16, *, tp: int = 1,
                 dtype: torch.dtype = torch.float32, device_kind: str = "cpu", repeats: int = 3,
                 count_ops: bool = True, max_len: int = 128) -> dict:
    """Generate `new_tokens` greedily `repeats` times with the ladder up to `step`; the best median."""
    job = {"model_path": model_path, "upto": step, "dtype": dtype, "device_kind": device_kind, "max_len": max_len,
           "prompt_ids": prompt_ids, "max_new_tokens": new_tokens, "eos_token_id": None}
    saved = {k: os.environ.get(k) for k, _ in recipe_upto(step).env}
    os.environ.update(launcher_env(recipe_upto(step)))   # as the launcher does (the aiv step)
    try:
        return _measure(step, job, model_path, prompt_ids, new_tokens, tp, dtype, device_kind, repeats, count_ops,
                        max_len)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _measure(step, job, model_path, prompt_ids, new_tokens, tp, dtype, device_kind, repeats, count_ops, max_len):
    if tp == 1:
        from .platform import torch_device
        device = torch_device(device_kind)
        runner = build_runner(recipe_upto(step), model_path, dtype=dtype, device=device, max_len=max_len)
        runs = [greedy_generate(runner, prompt_ids, new_tokens, device_kind, device=device).to_dict()
                for _ in range(repeats)]
        n_ops = ops_per_token(profile_decode(runner, prompt_ids, steps=2, warmup=1, device=device))[0] \
            if count_ops else None
    else:
        runs = [parallel.run_on_ranks(generate_on_rank, tp, (job,), device_kind) for _ in range(repeats)]
        n_ops = None
    best = min(runs, key=lambda r: r["decode_ms_per_token"] or float("inf"))
    return {"step": step, "tp": tp, "token_ids": best["token_ids"], "prefill_ms": best["prefill_ms"],
            "decode_ms_per_token": best["decode_ms_per_token"], "decode_ms": best["decode_ms"],
            "first_decode_ms": runs[0]["first_decode_ms"], "compile_s": runs[0]["compile_s"],   # run 1 compiled
            "ops_per_token": n_ops}


def ladder_table(model_path: str, prompt_ids: list[int], upto: str | None = None, new_tokens: int = 16,
                 **kwargs) -> list[dict]:
    """One measured row per step from hf_baseline to `upto`, each with `tokens_ok` against hf_baseline."""
    last = STEP_NAMES.index(upto or STEP_NAMES[-1])
    rows = [measure_step(s, model_path, prompt_ids, new_tokens, **kwargs) for s in STEP_NAMES[: last + 1]]
    for row in rows:
        row["tokens_ok"] = row["token_ids"] == rows[0]["token_ids"]
    return rows


def format_table(rows: list[dict], device_kind: str = "cpu") -> str:
    """The cumulative table as text (CPU numbers are labelled as such)."""
    lines = [f"{'step':20s} {'tokens == HF':>12s} {'ms/token':>9s} {'ops/token':>10s}   ({device_kind} measurements)"]
    for r in rows:
        ops_txt = "-" if r["ops_per_token"] is None else f"{r['ops_per_token']:.0f}"
        lines.append(f"{r['step']:20s} {str(r['tokens_ok']):>12s} {r['decode_ms_per_token']:9.2f} {ops_txt:>10s}")
    return "\n".join(lines)
