"""An analytic model of one batch-1 decode token: bytes read, collectives, operator launches.

- Counts per-RANK bytes for tensor parallelism as laid out by the recipe (cann-recipes-infer `module/linear.py`; chapters 3-5):
  q/o and experts split over ranks, K/V heads replicated when tp > Nkv (heads placed by `tp.HeadPlan`),
  router and norms replicated, embedding/lm_head split by vocabulary. Only the K activated experts are counted.
- Predicts the A3 decode latency of every ladder step (`predict_ladder`): kernels counted on our own
  code, each kernel's device time max(its bytes / achievable bandwidth, a fixed floor), host dispatch
  in eager mode, collectives at the recipe's HCCL mode; every parameter a named range with its source
  (`KERNEL_FLOOR_US`, `HOST_DISPATCH_US`, `GRAPH_LAUNCH_US`, `ALLREDUCE_US`, `BANDWIDTH_EFFICIENCY`),
  checked against published runs (`calibration`).
- Deliberately not a simulator: no overlap of compute with communication, no cache effects,
  no activation traffic (a few KB per layer at batch 1), and FLOPs never limit batch-1 decode.

Accounting (GB = 1e9 bytes, BF16): "weights read per token" is every weight a decode token
touches -- attention q/k/v/o, router, the K activated experts, all norm gammas, ONE embedding row
and the full lm_head -- which equals `ModelConfig.param_counts()["activated_per_token"]` * 2.
That gives the figures of chapter 0: 235B 43.1 GB total, 5.58 GB/rank at TP=8, 2.94 GB at
TP=16; 30B 6.08 GB total, 0.81 GB/rank at TP=8. Qwen's names ("A22B", "A3B") count the whole
embedding table as activated (21.6e9 + 0.62e9 = 22.2e9 parameters for 235B); a decode token
reads one row of it, so it is not in our bytes. Per rank, one embedding row is counted (the
recipe masks ids outside a rank's shard to row 0, so every rank reads one row).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .parallel import TP
from .tp import HeadPlan

GB = 1e9


# ---- hardware ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """One device kind: what a single rank (one process, one device) can use."""
    name: str
    memory_bytes: float          # device memory of ONE device (an A3 die, one GPU, this host's RAM)
    bandwidth_Bps: float         # peak memory read bandwidth of one device, bytes/s
    peak_bf16_flops: float | None  # dense BF16 peak of one device, FLOP/s (None: not modelled)
    devices_per_package: int     # devices in what is sold/counted as one "card" (A3: 2 dies)
    source: str                  # where each number comes from, or what was assumed

    @property
    def ridge_flop_per_byte(self) -> float | None:
        """Arithmetic intensity above which the device is compute-bound (peak FLOPs / bandwidth)."""
        return None if self.peak_bf16_flops is None else self.peak_bf16_flops / self.bandwidth_Bps


HARDWARE: dict[str, Hardware] = {
    "a3-die": Hardware(
        "a3-die", memory_bytes=64e9, bandwidth_Bps=1.6e12, peak_bf16_flops=390e12, devices_per_package=2,
        source="SGLang's Ascend NPU reference (A3: 16 devices, 2 dies per card, 64 GB per die); 1.6 TB/s per "
               "die = half of the 910C package's ~3.2 TB/s (TechPowerUp citing DigiTimes); an A3 card = 2 dies = "
               "2 devices, 128 GB. BF16 peak: press reports of ~780 TFLOPS "
               "per 910C package (TechPowerUp/DigiTimes, 2025), halved per die -- not a Huawei datasheet."),
    "a2-die": Hardware(
        "a2-die", memory_bytes=64e9, bandwidth_Bps=1.6e12, peak_bf16_flops=376e12, devices_per_package=1,
        source="Atlas A2 (Ascend 910B2/910B3): 64 GB and 1.6 TB/s per device (CANN's cross-platform operator "
               "migration guide, for the 910B2); 353.9 T Cube + 22.1 T Vector BF16 (the same guide)."),
    "h100-sxm": Hardware(
        "h100-sxm", memory_bytes=80e9, bandwidth_Bps=3.35e12, peak_bf16_flops=989e12, devices_per_package=1,
        source="NVIDIA H100 SXM datasheet: 80 GB HBM3, 3.35 TB/s, 989 TFLOPS dense BF16 (1979 with sparsity)."),
    "h200": Hardware(
        "h200", memory_bytes=141e9, bandwidth_Bps=4.8e12, peak_bf16_flops=989e12, devices_per_package=1,
        source="NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS dense BF16."),
}
HARDWARE_KINDS: tuple[str, ...] = (*HARDWARE, "this-cpu")


def measure_read_bandwidth(size_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s that `torch.sum` streams from memory on this host (best of `repeats`).

    The buffer (256 MiB by default) is far larger than any CPU cache, so the best time is bound by
    DRAM reads; filling it with random values touches every page before the clock starts, and one
    untimed pass starts the thread pool. Uses torch's current thread count.
    """
    x = torch.rand(size_bytes // 4, dtype=torch.float32)    # distinct pages: nothing a hypervisor could merge
    torch.sum(x)                                             # warm-up: thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.sum(x)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


def this_cpu(bandwidth_Bps: float | None = None) -> Hardware:
    """This host as a Hardware row; its bandwidth is measured now unless given."""
    measured = bandwidth_Bps is None
    bw = measure_read_bandwidth() if measured else bandwidth_Bps
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):     # not POSIX
        ram = float("nan")
    how = (f"measured: torch.sum over a 256 MiB float32 tensor, best of 5, {torch.get_num_threads()} threads"
           if measured else "bandwidth given by the caller")
    return Hardware("this-cpu", memory_bytes=ram, bandwidth_Bps=bw, peak_bf16_flops=None,
                    devices_per_package=1, source=f"{how}; memory = physical RAM (os.sysconf)")


def hardware(name: str) -> Hardware:
    """A row of the hardware table; "this-cpu" measures this host's read bandwidth."""
    if name == "this-cpu":
        return this_cpu()
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE_KINDS)}") from None


# ---- shard arithmetic ----------------------------------------------------------------------------
def _per_rank(total: int, tp: int, what: str) -> int:
    start, stop = TP(rank=0, size=tp).split(total, what)     # raises if uneven
    return stop - start


# ---- bytes and FLOPs per decode token ------------------------------------------------------------
PARTS: tuple[str, ...] = ("embedding", "attention_q_o", "attention_k_v", "router", "experts", "norms",
                          "lm_head", "kv_cache")


def bytes_per_token(cfg: ModelConfig, tp: int = 1, dtype_bytes: int = 2, context_len: int = 0) -> dict:
    """Bytes ONE rank reads from device memory for one batch-1 decode token, by part.

    Keys: every name in PARTS, "weights" (all parts but kv_cache) and "total" (weights + kv_cache).
    `context_len` is the number of cached positions the new token attends to.
    """
    L, H, D = cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim
    heads = HeadPlan.of(cfg, TP(0, tp))                      # every rank holds as many heads as rank 0
    N_r, Nkv_r = heads.n_heads, heads.n_kv                   # Nkv_r = 1 (replicated) when tp > Nkv
    I_r = _per_rank(cfg.moe_intermediate_size, tp, "moe_intermediate_size")
    V_r = _per_rank(cfg.vocab_size, tp, "vocab_size")
    params = {
        "embedding": H,                                      # one row of this rank's vocab shard
        "attention_q_o": L * 2 * N_r * D * H,                # q_proj rows + o_proj columns of N_r heads
        "attention_k_v": L * 2 * Nkv_r * D * H,              # k_proj, v_proj of Nkv_r heads (replicated)
        "router": L * cfg.num_experts * H,                   # replicated [E, H]
        "experts": L * cfg.num_experts_per_tok * 3 * I_r * H,  # K activated experts: gate, up, down slices
        "norms": L * (2 * H + 2 * D) + H,                    # 2 layer norms + q/k norms per layer, final norm
        "lm_head": V_r * H,                                  # this rank's vocab rows
        "kv_cache": L * 2 * Nkv_r * D * context_len,         # K and V of every cached position
    }
    out = {k: v * dtype_bytes for k, v in params.items()}
    out["weights"] = sum(v for k, v in out.items() if k != "kv_cache")
    out["total"] = out["weights"] + out["kv_cache"]
    return out


def flops_per_token(cfg: ModelConfig, tp: int = 1, context_len: int = 0) -> dict:
    """FLOPs one rank performs for one batch-1 decode token (2 per multiply-add).

    "matmul": every weight matrix used once (embedding lookup and norms excluded);
    "attention": q.k and p.v over `context_len` positions for this rank's N_r heads.
    """
    b = bytes_per_token(cfg, tp, dtype_bytes=1)              # parameters, one byte each
    matmul = 2 * (b["attention_q_o"] + b["attention_k_v"] + b["router"] + b["experts"] + b["lm_head"])
    N_r = HeadPlan.of(cfg, TP(0, tp)).n_heads
    attention = cfg.num_hidden_layers * N_r * 4 * cfg.head_dim * context_len
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def resident_bytes_per_rank(cfg: ModelConfig, tp: int = 1, dtype_bytes: int = 2) -> int:
    """Weight bytes each rank must HOLD (all E experts' slices, both vocab shards), no KV cache."""
    L, H, D = cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim
    b = bytes_per_token(cfg, tp, dtype_bytes)
    V_r = _per_rank(cfg.vocab_size, tp, "vocab_size")
    I_r = _per_rank(cfg.moe_intermediate_size, tp, "moe_intermediate_size")
    experts = L * cfg.num_experts * 3 * I_r * H * dtype_bytes
    return b["weights"] - b["embedding"] - b["experts"] + V_r * H * dtype_bytes + experts


def resident_bytes_at_step(cfg: ModelConfig, tp: int, step: str, dtype_bytes: int = 2) -> int:
    """Weight bytes each rank holds with the ladder up to `step` on `tp` ranks: steps before tensor
    parallelism hold the whole model on one device, and the TP steps before `moe_tp_w13_swiglu` hold
    every expert whole on every rank."""
    from .steps import recipe_upto

    recipe = recipe_upto(step)
    size = tp if recipe.tensor_parallel else 1
    resident = resident_bytes_per_rank(cfg, size, dtype_bytes)
    if recipe.tensor_parallel and not recipe.splits_experts:        # experts whole on every rank
        resident += int(cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size
                        * dtype_bytes * (1 - 1 / size))
    return resident


# ---- collectives ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Collective:
    where: str
    op: str                      # "all_reduce" or "all_gather"
    count: int                   # per decode token
    bytes: int                   # message size each rank contributes


def collectives_per_token(cfg: ModelConfig, tp: int, dtype_bytes: int = 2) -> dict:
    """The collectives of one decode token under the recipe's TP layout (none when tp == 1).

    Per layer: all-reduce after o_proj and after the experts ([1, H]); per token: the all-reduce
    that assembles the vocab-split embedding and the all-gather of the vocab-split logits.
    """
    if tp == 1:
        messages: list[Collective] = []
    else:
        L, row = cfg.num_hidden_layers, cfg.hidden_size * dtype_bytes
        messages = [
            Collective("embedding (vocab-split)", "all_reduce", 1, row),
            Collective("attention o_proj (row-split)", "all_reduce", L, row),
            Collective("experts down_proj (row-split)", "all_reduce", L, row),
            Collective("lm_head logits (vocab-split)", "all_gather", 1,
                       _per_rank(cfg.vocab_size, tp, "vocab_size") * dtype_bytes),
        ]
    return {
        "messages": messages,
        "all_reduce": sum(m.count for m in messages if m.op == "all_reduce"),
        "all_gather": sum(m.count for m in messages if m.op == "all_gather"),
        "count": sum(m.count for m in messages),
        "bytes": sum(m.count * m.bytes for m in messages),   # contributed by one rank
    }


# ---- the A3 latency model ------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """An assumed quantity: a low / typical / high value and why."""
    low: float
    mid: float
    high: float
    source: str


KERNEL_FLOOR_US = Range(5.5, 8.0, 10.5, "calibrated assumption: device time of a kernel that moves next to "
                        "nothing (a norm of one row, a routing op on 8 rows, a one-query attention): launch on "
                        "the AI core, tiling, pipeline fill, write-back. No Ascend figure is published. Typical "
                        "value: on a 0.5 µs grid, the one that brings the only exact comparable measurement "
                        "(vLLM-Ascend, 30B-A3B, 12.34 ms) closest while 235B-A22B on 16 A3 dies stays under the "
                        "recipe's 20 ms (the calibration table); fixed once for every row; low and high: ±2.5 µs")
HOST_DISPATCH_US = Range(15.0, 20.0, 30.0, "assumption: host cost of one eager PyTorch operator on an NPU "
                         "(Python, the dispatcher, torch_npu's task queue), set from the published batch-1 gains "
                         "of graph capture, 2-3.4x (vLLM-Ascend ACL graph 171 -> 55.6 ms; vLLM CUDA graphs "
                         "33.9 -> 10.0 ms): an eager operator costs the host 2-3 times a graph kernel's device time")
GRAPH_LAUNCH_US = Range(20.0, 50.0, 100.0, "assumption: host cost of launching one compiled graph per token "
                        "(inputs copied, one graph execution call)")
ALLREDUCE_US: dict[str, Range] = {
    "AI_CPU": Range(20.0, 30.0, 40.0, "assumption: small (4-8 KB) HCCL all-reduce expanded on the device's "
                    "AI CPU, A3's default HCCL_OP_EXPANSION_MODE (CANN's HCCL_OP_EXPANSION_MODE reference); no "
                    "published A3 figure"),
    "AIV": Range(3.0, 5.0, 8.0, "assumption: the same all-reduce expanded and run on the vector cores "
                 "(HCCL_OP_EXPANSION_MODE=AIV, the recipe's setting); NVIDIA's one-shot all-reduces take 4-8 µs"),
}
BANDWIDTH_EFFICIENCY = Range(0.6, 0.7, 0.85, "assumption: fraction of peak HBM bandwidth a kernel reaches on "
                             "batch-1 decode's small per-rank matrices (a few MB each)")
DEFAULT_CONTEXT = 4096          # cached positions a decode token attends to: the recipe's 4K input
WRITEUP_TARGET_MS = 20.0        # the recipe's write-up: 8 A3 cards, BF16, batch 1, "< 20 ms" per token


@dataclass(frozen=True)
class Assumptions:
    """Every parameter of the model, at one setting; `Assumptions.at("low" | "mid" | "high")`."""
    kernel_floor_us: float
    host_dispatch_us: float
    graph_launch_us: float
    allreduce_us: dict
    bandwidth_efficiency: float

    @classmethod
    def at(cls, which: str = "mid") -> "Assumptions":
        """Every parameter at its low, typical or high value; "low" is the optimistic end (short times,
        high bandwidth efficiency) and "high" the pessimistic one."""
        if which not in ("low", "mid", "high"):
            raise ValueError(f"which must be low, mid or high; got {which!r}")
        efficiency = {"low": "high", "mid": "mid", "high": "low"}[which]
        return cls(getattr(KERNEL_FLOOR_US, which), getattr(HOST_DISPATCH_US, which),
                   getattr(GRAPH_LAUNCH_US, which), {k: getattr(r, which) for k, r in ALLREDUCE_US.items()},
                   getattr(BANDWIDTH_EFFICIENCY, efficiency))


@dataclass(frozen=True)
class KernelCount:
    """Device kernels of one decode token of our model at one ladder step (collectives apart)."""
    per_layer: int
    per_token: int

    def total(self, layers: int) -> int:
        return self.per_layer * layers + self.per_token


def twin_config(cfg: ModelConfig, tp: int, layers: int) -> ModelConfig:
    """A small model whose decode runs the same kernels as one rank of `cfg` at `tp`: the same top-k
    (at batch 1 exactly K experts run), the same norm_topk_prob and query heads per KV head, small sizes."""
    heads = HeadPlan.of(cfg, TP(0, tp))
    return _twin(cfg.num_experts_per_tok, cfg.norm_topk_prob, heads.n_heads // heads.n_kv, layers)


def _twin(top_k: int, norm_topk_prob: bool, group: int, layers: int) -> ModelConfig:
    from .config import preset

    return preset("tiny").replace(name=f"twin-k{top_k}-g{group}-L{layers}", vocab_size=1024, hidden_size=64,
                                  head_dim=64, num_attention_heads=2 * group, num_key_value_heads=2,
                                  num_hidden_layers=layers, num_experts=max(16, 2 * top_k), num_experts_per_tok=top_k,
                                  norm_topk_prob=norm_topk_prob, moe_intermediate_size=16, max_position_embeddings=64)


def kernels_per_token(cfg: ModelConfig, tp: int, step: str) -> KernelCount:
    """Kernels one decode token launches on one rank at `step`, counted on our model's own code: the
    profiler's operator count (views left out, each fused op one kernel, `profile.ops_per_token`) of
    eager decode on a 1-layer and a 2-layer twin of `cfg` (`twin_config`); the difference is the
    per-layer count. A graph step runs the kernels of the eager step before it. Collectives are not
    counted here (a twin runs on one rank): `collective_count` adds them."""
    from .steps import STEP_NAMES, recipe_upto

    upto = STEP_NAMES[: STEP_NAMES.index(step) + 1]
    eager = next(name for name in reversed(upto) if not recipe_upto(name).graph)
    heads = HeadPlan.of(cfg, TP(0, tp))
    return _twin_count(cfg.num_experts_per_tok, cfg.norm_topk_prob, heads.n_heads // heads.n_kv, eager)


@functools.lru_cache(maxsize=None)
def _twin_count(top_k: int, norm_topk_prob: bool, group: int, step: str) -> KernelCount:
    import tempfile

    from transformers.utils import logging

    from .launch import build_runner
    from .profile import ops_per_token, profile_decode
    from .steps import recipe_upto
    from .weights import make_tiny_checkpoint

    shown = logging.is_progress_bar_enabled()
    counts = []
    try:
        with tempfile.TemporaryDirectory(prefix="qwen3moe-twin-") as tmp:
            for layers in (1, 2):
                logging.disable_progress_bar()       # the twins are written silently
                path = make_tiny_checkpoint(os.path.join(tmp, f"L{layers}"), _twin(top_k, norm_topk_prob, group, layers))
                runner = build_runner(recipe_upto(step), path, max_len=32)
                counts.append(ops_per_token(profile_decode(runner, [1, 2, 3, 4], steps=1, warmup=1))[0])
    finally:
        if shown:
            logging.enable_progress_bar()
    one, two = (round(c) for c in counts)
    return KernelCount(per_layer=two - one, per_token=2 * one - two)


def collective_count(cfg: ModelConfig, tp: int, recipe) -> int:
    """Collectives per decode token at this recipe: none on one rank; with attention TP the embedding's
    all-reduce, one after each o_proj and the logits' all-gather; with the experts split too, one after
    each MoE block (`collectives_per_token` lists the messages)."""
    if tp == 1 or not recipe.tensor_parallel:
        return 0
    return collectives_per_token(cfg, tp)["count"] - (0 if recipe.splits_experts else cfg.num_hidden_layers)


def weight_kernels(cfg: ModelConfig, tp: int, recipe, dtype_bytes: int = 2, context_len: int = DEFAULT_CONTEXT):
    """(name, kernels per token, HBM bytes each) of the kernels that stream weights or the KV cache, one
    rank of `tp` (1 where the recipe runs on one device), from the recipe's parts: separate or merged q/k/v; experts in a loop (K x gate/up/down, or K x
    w13/w2 once split) or in two grouped matmuls; the attention kernel reading the cache."""
    L, H, D, K = cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.num_experts_per_tok
    heads = HeadPlan.of(cfg, TP(0, tp))
    q, kv = heads.n_heads * D * H * dtype_bytes, heads.n_kv * D * H * dtype_bytes
    I_r = _per_rank(cfg.moe_intermediate_size, tp if recipe.splits_experts else 1, "moe_intermediate_size")
    expert = I_r * H * dtype_bytes                                     # one [I_r, H] matrix
    merged = "qkv_proj" in getattr(recipe.parts.attention, "nz_weights", ())
    rows = ([("qkv matmul", L, q + 2 * kv)] if merged else [("q matmul", L, q), ("k matmul", L, kv), ("v matmul", L, kv)])
    rows += [("o_proj matmul", L, q), ("router matmul", L, cfg.num_experts * H * dtype_bytes),
             ("attention over the cache", L, 2 * heads.n_kv * D * context_len * dtype_bytes)]
    if recipe.grouped_experts:
        rows += [("grouped matmul w13", L, K * 2 * expert), ("grouped matmul w2", L, K * expert)]
    elif recipe.splits_experts:
        rows += [("expert w13 matmul", L * K, 2 * expert), ("expert w2 matmul", L * K, expert)]
    else:
        rows += [("expert gate/up/down matmul", L * K * 3, expert)]
    rows.append(("lm_head matmul", 1, _per_rank(cfg.vocab_size, tp, "vocab_size") * H * dtype_bytes))
    return rows


def predict_step(cfg: ModelConfig, tp: int, step: str, hw: Hardware | str = "a3-die", dtype_bytes: int = 2,
                 context_len: int = DEFAULT_CONTEXT, assumptions: Assumptions | None = None) -> dict:
    """Predicted ms of one batch-1 decode token at `step` on `tp` devices of kind `hw`, by term.

    Every kernel takes max(its bytes / achievable bandwidth, KERNEL_FLOOR_US) on the device. Eager:
    the host issues each kernel in turn, so a kernel costs max(HOST_DISPATCH_US, its device time).
    Graph: device times back to back, plus one GRAPH_LAUNCH_US per token. Each collective costs
    ALLREDUCE_US of the recipe's HCCL mode (AI_CPU unless the recipe sets AIV). Terms, summing to
    `total_ms`: `memory_ms` (bytes / achievable bandwidth: the streaming floor), `kernel_floor_ms`
    (what the per-kernel minimum adds), `dispatch_ms` (host time not hidden by the device, or the
    graph launch) and `collectives_ms`. `graph_ms` is the same kernels run as a graph (what the step's
    change is still worth once graph mode is on)."""
    from .steps import recipe_upto

    hw = hardware(hw) if isinstance(hw, str) else hw
    a = assumptions or Assumptions.at("mid")
    recipe = recipe_upto(step)
    size = tp if recipe.tensor_parallel else 1
    bandwidth = hw.bandwidth_Bps * a.bandwidth_efficiency
    floor, host = a.kernel_floor_us, a.host_dispatch_us
    heavy = weight_kernels(cfg, size, recipe, dtype_bytes, context_len)
    n_kernels = kernels_per_token(cfg, size, step).total(cfg.num_hidden_layers)
    n_light = n_kernels - sum(n for _, n, _ in heavy)
    if n_light < 0:
        raise AssertionError(f"{step}: fewer kernels ({n_kernels}) than weight-reading kernels")
    device = [(n, max(b / bandwidth * 1e6, floor)) for _, n, b in heavy] + [(n_light, floor)]
    memory_us = sum(n * b for _, n, b in heavy) / bandwidth * 1e6
    device_us = sum(n * t for n, t in device)
    n_coll = collective_count(cfg, size, recipe)
    hccl = recipe.env.get("HCCL_OP_EXPANSION_MODE", "AI_CPU")
    coll_us = a.allreduce_us[hccl]
    graph_us = device_us + a.graph_launch_us + n_coll * coll_us
    if recipe.graph:
        dispatch_us, collectives_us = a.graph_launch_us, n_coll * coll_us
    else:
        dispatch_us = sum(n * max(host, t) for n, t in device) - device_us
        collectives_us = n_coll * max(host, coll_us)
    resident = resident_bytes_at_step(cfg, size, step, dtype_bytes)
    ms = lambda us: us / 1e3
    return {"step": step, "tp": size, "memory_ms": ms(memory_us), "kernel_floor_ms": ms(device_us - memory_us),
            "dispatch_ms": ms(dispatch_us), "collectives_ms": ms(collectives_us),
            "total_ms": ms(device_us + dispatch_us + collectives_us), "graph_ms": ms(graph_us),
            "kernels": n_kernels, "collectives": n_coll, "hccl": hccl, "launch": "graph" if recipe.graph else "eager",
            "bytes_per_rank": sum(n * b for _, n, b in heavy), "resident_bytes_per_rank": resident,
            "fits": resident <= hw.memory_bytes,
            "assumptions": {"hardware": hw.name, "context_len": context_len, "dtype_bytes": dtype_bytes,
                            **dataclasses.asdict(a)}}


TERMS: tuple[str, ...] = ("memory_ms", "kernel_floor_ms", "dispatch_ms", "collectives_ms")


def predict_ladder(cfg: ModelConfig, tp: int, hw: Hardware | str = "a3-die", dtype_bytes: int = 2,
                   context_len: int = DEFAULT_CONTEXT, which: str = "mid",
                   assumptions: Assumptions | None = None) -> list[dict]:
    """One `predict_step` row per ladder step, in order: the book's A3 numbers all come from here.
    Steps before tensor parallelism run on one device (their `fits` says whether the weights do)."""
    from .steps import STEP_NAMES

    a = assumptions or Assumptions.at(which)
    return [predict_step(cfg, tp, name, hw, dtype_bytes, context_len, a) for name in STEP_NAMES]


# The configurations the book follows: the recipe's "8 cards" (16 dies) for 235B, 8 dies for 30B.
BOOK_CONFIGS: tuple[tuple[str, int], ...] = (("qwen3-235b-a22b", 16), ("qwen3-30b-a3b", 8))


def step_change(step: str, configs=BOOK_CONFIGS) -> str:
    """A chapter's opening line: for each of the book's configurations, the previous step's predicted
    A3 ms -> this step's, and what the change is still worth once decode runs as a graph."""
    from .config import preset
    from .steps import STEP_NAMES

    i = STEP_NAMES.index(step)
    lines = [f"predicted on A3 dies, BF16, batch 1, {DEFAULT_CONTEXT}-token context ({step}):"]
    for name, tp in configs:
        rows = predict_ladder(preset(name), tp)
        now = rows[i]
        where = f"  {name} at TP {now['tp']:2d}:"
        fits = "" if now["fits"] else " (the weights do not fit one device)"
        if i == 0:
            lines.append(f"{where} {now['total_ms']:.1f} ms/token, the starting point{fits}")
            continue
        before = rows[i - 1]
        line = (f"{where} {before['step']} {before['total_ms']:.1f} -> {now['total_ms']:.1f} ms/token "
                f"({now['total_ms'] - before['total_ms']:+.1f} ms)")
        if not now["launch"] == "graph":                 # what the same change saves inside a graph
            line += f"; once decode is a graph, {now['graph_ms'] - before['graph_ms']:+.2f} ms"
        lines.append(line + fits)
    return "\n".join(lines)


def format_ladder(rows: list[dict]) -> str:
    """The predicted ladder as a text table (ms per token and each term)."""
    out = [f"{'step':18s} {'tp':>3s} {'launch':>6s} {'hccl':>6s} {'kernels':>7s} {'coll':>4s} "
           f"{'memory':>7s} {'k.floor':>7s} {'dispatch':>8s} {'collect.':>8s} {'total':>7s}  fits"]
    for r in rows:
        out.append(f"{r['step']:18s} {r['tp']:3d} {r['launch']:>6s} {r['hccl']:>6s} {r['kernels']:7d} "
                   f"{r['collectives']:4d} " + " ".join(f"{r[t]:{8 if t in ('dispatch_ms', 'collectives_ms') else 7}.2f}"
                                                      for t in TERMS) + f" {r['total_ms']:7.2f}  {r['fits']}")
    return "\n".join(out)


def sensitivity(cfg: ModelConfig, tp: int, step: str | None = None, points: int = 7) -> dict[str, list]:
    """Total ms of `step` (default: the last) as each of the three least certain parameters moves from its
    low to its high value, the others at their typical values: {name: [(value, ms), ...]}."""
    from .steps import STEP_NAMES

    step = step or STEP_NAMES[-1]
    base = Assumptions.at("mid")
    sweeps = {"kernel_floor_us": KERNEL_FLOOR_US, "allreduce_us": ALLREDUCE_US["AIV"],
              "bandwidth_efficiency": BANDWIDTH_EFFICIENCY}
    out = {}
    for name, rng in sweeps.items():
        values = [rng.low + (rng.high - rng.low) * i / (points - 1) for i in range(points)]
        rows = []
        for v in values:
            change = {name: {**base.allreduce_us, "AIV": v}} if name == "allreduce_us" else {name: v}
            a = dataclasses.replace(base, **change)
            rows.append((v, predict_step(cfg, tp, step, assumptions=a)["total_ms"]))
        out[name] = rows
    return out


def plot_waterfall(rows: list[dict], title: str, target_ms: float | None = WRITEUP_TARGET_MS, ax=None):
    """Stacked bars (the four terms) per step on a linear axis, each bar labelled with its total; steps
    whose weights do not fit one device are hatched; the write-up's target as a line."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ax = ax or plt.subplots(figsize=(10, 3.6))[1]
    names = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    colors = {"memory_ms": "#4c72b0", "kernel_floor_ms": "#55a868", "dispatch_ms": "#8c8c8c",
              "collectives_ms": "#c0504d"}
    label = lambda term: term.removesuffix("_ms").replace("_", " ")
    for term in TERMS:
        values = [r[term] for r in rows]
        bars = ax.bar(names, values, bottom=bottom, color=colors[term])
        for bar, r in zip(bars, rows):
            if not r["fits"]:
                bar.set_hatch("//")
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, r in enumerate(rows):
        ax.annotate(f"{r['total_ms']:.1f}", (x, r["total_ms"]), ha="center", va="bottom", fontsize=8)
    handles = [Patch(color=colors[t], label=label(t)) for t in TERMS]
    if not all(r["fits"] for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="does not fit one device"))
    if target_ms:
        handles.append(ax.axhline(target_ms, color="k", ls="--", lw=1, label=f"write-up: < {target_ms:.0f} ms"))
    ax.margins(y=0.12)                                   # room for the tallest bar's label
    ax.set_ylabel("predicted ms / token")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=35, labelsize=8)
    ax.legend(handles=handles, fontsize=8)
    return ax


# ---- calibration against published measurements --------------------------------------------------
@dataclass(frozen=True)
class Published:
    """A published batch-1 decode figure and whether our model can be compared with it."""
    config: str                 # what ran, as published
    source: str                 # where it was published
    published_ms: float
    comparable: bool
    reason: str                 # why it is (with the assumptions made) or is not comparable
    model: str | None = None    # preset, hardware and TP size to predict it with (comparable rows)
    hw: str | None = None
    tp: int | None = None
    context_len: int = DEFAULT_CONTEXT


PUBLISHED: tuple[Published, ...] = (
    Published("Qwen3-235B-A22B, Atlas A3, 8 cards = 16 dies, attention and MoE TP 16, BF16, batch 1, "
              "GE graph, AIV", "cann-recipes-infer, docs/models/qwen3_moe/qwen3_moe_optimization.md and "
              "models/qwen3_moe/config/qwen3_235b_16tp.yaml", 20.0, True,
              "the recipe our ladder follows; published as an upper bound (< 20 ms), compared as 20 ms; "
              "4K-token input (the config's input_truncated_len)", "qwen3-235b-a22b", "a3-die", 16),
    Published("Qwen3-30B-A3B-Instruct-2507, 910B3 (Atlas A2), BF16, concurrency 1, vLLM-Ascend ACL graph",
              "vllm-project/vllm-ascend pull request 5951", 12.34, True,
              "same model family and batch 1 on the previous Ascend die (64 GB, 1.6 TB/s); the TP size is not "
              "stated: predicted at TP 2, the smallest on which 61 GB of BF16 weights fit 64 GB dies; vLLM-"
              "Ascend's kernels are not ours kernel for kernel", "qwen3-30b-a3b", "a2-die", 2),
    Published("Qwen3-30B-A3B-Instruct-2507, 910B3 (Atlas A2), concurrency 1, Xlite runtime",
              "vllm-project/vllm-ascend pull request 5951", 11.71, False,
              "Xlite replaces the framework's operators with its own fused runtime: not a graph of the ops we "
              "model"),
    Published("Qwen3-30B-A3B, TP 4, 15K-token input, concurrency 1, vLLM-Ascend FULL_DECODE_ONLY",
              "vllm-project/vllm-ascend issue 4656", 20.0, False,
              "hardware and dtype not stated, and published as a lower bound ('20+ ms')"),
    Published("Qwen3-235B-A22B, Atlas 800I A3, 8 cards (TP 16), SGLang, 11K+1K", "sglang Ascend best-practice docs",
              10.0, False, "speculative decoding (EAGLE3) and a W8A8 model"),
    Published("Qwen3-30B-A3B, Atlas 800I A3, 1 card (TP 2), SGLang, batch 8", "sglang Ascend best-practice docs",
              8.0, False, "speculative decoding (EAGLE3), W8A8, batch 8"),
    Published("Qwen3-235B-A22B, Atlas 950PR, 4 cards, W4A8", "cann-recipes-infer qwen3_moe_optimization.md",
              24.0, False, "another chip (950PR) and 4-bit weights; an upper bound"),
    Published("Qwen3-235B-A22B INT8, 910B4 x 8, vLLM-Ascend / MindIE, concurrency 16", "vllm-project/vllm-ascend "
              "issue 4395", 71.0, False, "INT8 and 16 concurrent requests"),
    Published("Qwen3-235B-A22B, 8 x H20, TP 8, SGLang, BF16, batch 1", "QwenLM/Qwen3 speed benchmark", 13.4, False,
              "NVIDIA hardware: the kernel-floor and collective assumptions are the A3's"),
    Published("Qwen3-30B-A3B, 1 x H20, SGLang, BF16, batch 1", "QwenLM/Qwen3 speed benchmark", 7.3, False,
              "NVIDIA hardware: the kernel-floor and collective assumptions are the A3's"),
    Published("Qwen3-235B-A22B, 4 x GB200, TP 4, TensorRT-LLM, NVFP4, concurrency 1",
              "NVIDIA/TensorRT-LLM pull request 11612", 4.05, False, "NVIDIA hardware and 4-bit weights"),
)


def calibration(which: str = "mid") -> list[dict]:
    """Every published figure with our prediction (the last ladder step, parameters fixed once for all
    rows) and the ratio, for the comparable ones: rows of results/a3-calibration.json."""
    from .config import preset
    from .steps import STEP_NAMES

    rows = []
    for p in PUBLISHED:
        predicted = None
        if p.comparable:
            predicted = predict_step(preset(p.model), p.tp, STEP_NAMES[-1], p.hw, context_len=p.context_len,
                                     assumptions=Assumptions.at(which))["total_ms"]
        rows.append({"config": p.config, "source": p.source, "published_ms": p.published_ms,
                     "predicted_ms": predicted, "ratio": None if predicted is None else predicted / p.published_ms,
                     "comparable": p.comparable, "reason": p.reason})
    return rows
