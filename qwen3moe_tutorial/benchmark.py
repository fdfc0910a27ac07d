"""Measuring the ladder: per step, the tokens (vs the ladder's first step), decode ms/token and operators/token.

- One protocol for every number in the book (generate.py's timing protocol): batch 1, fixed prompt,
  synchronised clock reads, the median decode step, best of a few repeats (`best_of_repeats`),
  compile excluded. Ladder steps (`measure_step`) and the Hugging Face peers (`measure_peer`) go
  through the same best-of-repeats function, so their rows compare like for like.
- `ladder_table` is the cumulative table the chapters grow one row at a time; the benchmark
  script (scripts/benchmark.py) writes the same rows, with provenance, to results/*.json.
- Single-rank measurements in-process; multi-rank ones through launch.run (the one launch path).
- `TARGETS` / `summarize` / `target_checks`: the finished system's CPU targets, the summary against
  the memory floor and the peers that they are checked against, and the checks.
- `gemv_bandwidth`: how fast one-row matmuls stream weights, library kernels vs inductor's (chapter 9).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from . import launch, roofline
from .compile import DecodeGEMV
from .generate import greedy_generate
from .platform import torch_device
from .profile import ops_per_token, profile_decode
from .steps import STEP_NAMES, recipe_upto

# The two Hugging Face peers of the benchmark: transformers as a user runs it (eager experts,
# DynamicCache), and at its fastest here (grouped_mm experts, StaticCache, torch.compile'd decode).
HF_EAGER, HF_BEST = PEERS = ("hf_eager", "hf_best")
LLAMA_CPP = "llama_cpp"          # llama.cpp on the same checkpoint at f32 (scripts/llama_cpp_peer.py), optional


def best_of_repeats(generate: Callable[[], dict], repeats: int) -> dict:
    """Call `generate` (one greedy generation, as `Generation.to_dict()`) `repeats` times in a row;
    return the timing fields of a result row: tokens, prefill and decode times of the run with the
    lowest median decode step, and `first_decode_ms` / `compile_s` of run 1, the one that compiled
    (later runs in the same process reuse the graph, so theirs would hide the cost)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    runs = [generate() for _ in range(repeats)]
    best = min(runs, key=lambda r: float("inf") if r["decode_ms_per_token"] is None else r["decode_ms_per_token"])
    return {"token_ids": list(best["token_ids"]), "prefill_ms": best["prefill_ms"],
            "decode_ms_per_token": best["decode_ms_per_token"], "decode_ms": best["decode_ms"],
            "first_decode_ms": runs[0]["first_decode_ms"], "compile_s": runs[0]["compile_s"]}


def measure_step(step: str, model_path: str, prompt_ids: list[int], new_tokens: int = 16, *, tp: int = 1,
                 dtype: torch.dtype = torch.float32, device_kind: str = "cpu", repeats: int = 3,
                 count_ops: bool = True, max_len: int = 128) -> dict:
    """Generate `new_tokens` greedily `repeats` times with the ladder up to `step` (`best_of_repeats`).
    TP 1 runs in this process, one runner for every repeat, under the launcher's environment;
    TP > 1 launches the ranks once per repeat (`launch.run`). Operators per token: TP 1 only."""
    recipe = recipe_upto(step)
    if tp == 1:
        device = torch_device(device_kind)
        with launch.launch_environment(recipe, device_kind):       # what the launcher would set
            runner = launch.build_runner(recipe, model_path, dtype=dtype, device=device, max_len=max_len)
            timed = best_of_repeats(lambda: greedy_generate(runner, prompt_ids, new_tokens, device_kind,
                                                            device=device).to_dict(), repeats)
            n_ops = ops_per_token(profile_decode(runner, prompt_ids, steps=2, warmup=1, device=device))[0] \
                if count_ops else None
    else:
        job = launch.GenerationJob(model_path, prompt_ids, new_tokens, upto=step, tp=tp, device_kind=device_kind,
                                   dtype=dtype, max_len=max_len)
        timed, n_ops = best_of_repeats(lambda: launch.run(job), repeats), None
    return {"step": step, "tp": tp, **timed, "ops_per_token": n_ops}


def measure_peer(kind: str, model_path: str, prompt_ids: list[int], new_tokens: int = 16, repeats: int = 3,
                 max_len: int = 128, device_kind: str = "cpu") -> dict:
    """One Hugging Face peer (`PEERS`), measured like a ladder step (`best_of_repeats`), as a row
    of the same shape: `HF_EAGER` with transformers' per-expert loop, `HF_BEST` with grouped_mm
    experts and a compiled decode (compiled from scratch, like our graph steps). Single device."""
    from .hf import HFCompiledRunner, HFRunner, load_hf_model

    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}; the peers are {', '.join(PEERS)}")
    device = torch_device(device_kind)
    if kind == HF_EAGER:
        runner = HFRunner(load_hf_model(model_path, device=device, experts_implementation="eager"),
                          device_kind=device_kind)
    else:
        runner = HFCompiledRunner(load_hf_model(model_path, device=device, experts_implementation="grouped_mm"),
                                  max_len=max_len, device_kind=device_kind)
    timed = best_of_repeats(lambda: greedy_generate(runner, prompt_ids, new_tokens, device_kind,
                                                    device=device).to_dict(), repeats)
    return {"step": kind, "tp": 1, **timed, "ops_per_token": None}


def ladder_table(model_path: str, prompt_ids: list[int], upto: str | None = None, new_tokens: int = 16,
                 **kwargs) -> list[dict]:
    """One measured row per step from the first (transformers' own) to `upto`, each with
    `tokens_ok` against the first."""
    last = STEP_NAMES.index(upto or STEP_NAMES[-1])
    with warnings.catch_warnings():       # one process compiles several steps: their caches are
        warnings.filterwarnings("ignore", message="not storing", category=UserWarning)   # never written
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


# The CPU targets of the finished system (issue 7), at TP 1, per benchmark preset: the bandwidth-bound `mini`
# must come within 1.5x of its memory floor and beat both Hugging Face peers by 1.5x; the
# overhead-bound `deep` must beat HF eager by 3x and HF's best by 2x. Measured against, never typed.
TARGETS = {
    "mini": {"x_floor_at_most": 1.5, "speedup_vs_hf_eager_at_least": 1.5, "speedup_vs_hf_best_at_least": 1.5},
    "deep": {"speedup_vs_hf_eager_at_least": 3.0, "speedup_vs_hf_best_at_least": 2.0},
}


def summarize(meta: dict, rows: list[dict], bytes_per_token: int, bandwidth_probes: list[float]) -> dict:
    """The benchmark's summary record (what `target_checks` reads): `meta` (preset, tp, provenance),
    the memory floor (`bytes_per_token` over the best of `bandwidth_probes`, in bytes/s: the best
    probe is the least disturbed one) and, per measured row, its decode ms/token, how many times
    the floor it is (`x_floor`), whether its tokens match the reference (HF eager, else the
    ladder's first step; None without either) and its speedup over each peer that was measured."""
    bandwidth = max(bandwidth_probes)
    floor_ms = bytes_per_token / bandwidth * 1e3
    reference_tokens = next((r["token_ids"] for r in rows if r["step"] in (HF_EAGER, STEP_NAMES[0])), None)
    summary = {**meta, "read_bandwidth_GBps": bandwidth / 1e9, "bytes_per_token": bytes_per_token,
               "read_bandwidth_probes_GBps": [round(b / 1e9, 2) for b in bandwidth_probes],
               "read_bandwidth_method": f"torch.sum over 256 MiB of float32, best of 10, {torch.get_num_threads()} "
                                        f"threads, before the first step and after each; the best probe counts",
               "floor_ms": floor_ms, "rows": []}
    for r in rows:
        ms = r["decode_ms_per_token"]
        entry = {"step": r["step"], "decode_ms_per_token": ms, "compile_s": r["compile_s"],
                 "ops_per_token": r["ops_per_token"], "x_floor": None if ms is None else ms / floor_ms,
                 "tokens_ok": None if reference_tokens is None or r["token_ids"] is None   # llama.cpp: not read
                 else r["token_ids"] == reference_tokens}
        for peer in (*PEERS, LLAMA_CPP):
            base = next((q["decode_ms_per_token"] for q in rows if q["step"] == peer), False)
            if base is not False:          # a peer that was measured (its time may be None: one token)
                entry[f"speedup_vs_{peer}"] = None if base is None or not ms else base / ms
        summary["rows"].append(entry)
    return summary


def target_checks(summary: dict, step: str | None = None) -> list[dict]:
    """Each target of the summary's preset against the measured row of `step` (default: the last
    step of the ladder that was measured): target, limit, measured value, met or not. The targets
    are set at TP 1, so a run at another TP size has none."""
    targets = TARGETS.get(summary.get("preset"), {}) if int(summary.get("tp") or 1) == 1 else {}
    rows = {r["step"]: r for r in summary.get("rows", [])}
    if step is None:
        step = next((s for s in reversed(STEP_NAMES) if s in rows), None)
    row = rows.get(step)
    checks = []
    for name, limit in targets.items():
        field, _, bound = name.rpartition("_at_")
        value = None if row is None else row.get(field)
        met = None if value is None else (value <= limit if bound == "most" else value >= limit)
        checks.append({"step": step, "target": field, "bound": "<=" if bound == "most" else ">=", "limit": limit,
                       "measured": value, "met": met})
    return checks


# ---- one-row matmul bandwidth (chapter 9, lab log) -----------------------------------------------
def _median_s(fn, inputs, n: int = 60) -> float:
    for args in inputs[:3]:
        fn(*args)
    times = []
    for i in range(n):
        args = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def _dense_cases(cfg, gen):
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    layers = [(torch.randn(qkv_out, cfg.hidden_size, generator=gen) / cfg.hidden_size ** 0.5,
               torch.randn(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, generator=gen) / 32)
              for _ in range(cfg.num_hidden_layers)]
    lm = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen) / cfg.hidden_size ** 0.5
    nbytes = (sum(a.numel() + b.numel() for a, b in layers) + lm.numel()) * 4

    def stack(x):
        for wqkv, wo in layers:
            x = x + F.linear(F.linear(x, wqkv)[..., : wo.shape[1]], wo)
        return F.linear(x, lm)

    inputs = [(torch.randn(1, 1, cfg.hidden_size, generator=gen),)]
    compiled = torch.compile(stack, fullgraph=True)
    generated = torch.compile(stack, fullgraph=True, options={"pre_grad_custom_pass": DecodeGEMV()})
    diff = (compiled(*inputs[0]) - generated(*inputs[0])).abs().max().item()
    return nbytes, inputs, [("dense: eager F.linear (BLAS)", stack), ("dense: compiled, inductor -> BLAS", compiled),
                            ("dense: compiled + DecodeGEMV", generated)], diff


def _gmm_cases(cfg, gen, sets: int = 3):
    E, K, N, M = cfg.num_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size, cfg.num_experts_per_tok
    out_in = [torch.randn(E, N, K, generator=gen) for _ in range(sets)]          # checkpoint orientation
    in_out = [w.transpose(1, 2).contiguous() for w in out_in]                    # the recipe's [E, in, out]
    x = torch.randn(M, K, generator=gen)
    # 16 routings x `sets` weight sets, cycled together: 48 distinct calls, no expert read twice in a row
    rows = [torch.randperm(E, generator=gen)[:M].sort().values for _ in range(16)]

    def gather_bmm(x, w, g):
        return torch.bmm(x.unsqueeze(1), w[g]).squeeze(1)

    def mul_sum(x, w, g):
        return (x.unsqueeze(-1) * w[g]).sum(1)

    def mul_sum_view(x, w_out_in, g):
        return mul_sum(x, w_out_in.transpose(1, 2), g)

    calls = [(i % sets, i % len(rows)) for i in range(sets * len(rows))]
    contiguous = [(x, in_out[w], rows[g]) for w, g in calls]
    views = [(x, out_in[w], rows[g]) for w, g in calls]
    cases = [("gmm: eager gather + bmm", gather_bmm, contiguous),
             ("gmm: compiled gather + bmm", torch.compile(gather_bmm, fullgraph=True), contiguous),
             ("gmm: compiled mul-sum, [E,in,out]", torch.compile(mul_sum, fullgraph=True), contiguous),
             ("gmm: compiled mul-sum, view of [E,out,in]", torch.compile(mul_sum_view, fullgraph=True), views)]
    want = gather_bmm(*contiguous[0])
    diff = max((fn(*args[0]) - want).abs().max().item() for _, fn, args in cases)
    return M * K * N * 4, cases, diff


def gemv_bandwidth(cfg, threads=(1, 2)) -> dict:
    """GB/s of weights streamed by one-row matmuls of `cfg`'s shapes, per torch thread count:
    dense layers through the BLAS library vs `compile.DecodeGEMV`, and the grouped matmul of one
    token's routed rows as gather + bmm vs multiply-and-sum (over [E, in, out] memory and over a
    transposed view of [E, out, in]); with `torch.sum`'s read bandwidth for scale. Each figure is
    the median of 60 calls cycling through weight sets larger than the caches. Restores the thread
    count it found."""
    gen = torch.Generator().manual_seed(0)
    dense_bytes, dense_inputs, dense, dense_diff = _dense_cases(cfg, gen)
    gmm_bytes, gmm, gmm_diff = _gmm_cases(cfg, gen)
    rows, before = [], torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            rows.append({"threads": n, "case": "torch.sum over 256 MiB (read bandwidth)",
                         "GBps": roofline.measure_read_bandwidth(repeats=10) / 1e9})
            for name, fn in dense:
                rows.append({"threads": n, "case": name, "GBps": dense_bytes / _median_s(fn, dense_inputs) / 1e9})
            for name, fn, inputs in gmm:
                rows.append({"threads": n, "case": name, "GBps": gmm_bytes / _median_s(fn, inputs) / 1e9})
    finally:
        torch.set_num_threads(before)
    return {"dense_bytes": dense_bytes, "gmm_bytes": gmm_bytes, "max_abs_diff_dense": dense_diff,
            "max_abs_diff_gmm": gmm_diff, "rows": rows}


def format_gemv_bandwidth(result: dict) -> str:
    lines = [f"weights per call: dense {result['dense_bytes'] / 1e6:.1f} MB, grouped matmul "
             f"{result['gmm_bytes'] / 1e6:.1f} MB; max |difference| between variants: dense "
             f"{result['max_abs_diff_dense']:.1e}, grouped {result['max_abs_diff_gmm']:.1e}",
             f"{'threads':>7s}  {'case':42s} {'GB/s':>6s}"]
    lines += [f"{r['threads']:7d}  {r['case']:42s} {r['GBps']:6.1f}" for r in result["rows"]]
    return "\n".join(lines)
