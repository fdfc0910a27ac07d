"""An analytic model of one batch-1 decode token: bytes read, collectives, operator launches.

- Counts per-RANK bytes for tensor parallelism as laid out by the recipe (cann-recipes-infer `module/linear.py`; chapters 3-5):
  q/o and experts split over ranks, K/V heads replicated when tp > Nkv (heads placed by `tp.HeadPlan`),
  router and norms replicated, embedding/lm_head split by vocabulary. Only the K activated experts are counted.
- Predicts decode latency as memory + collectives + dispatch, each term from explicit,
  adjustable assumptions (`ALLREDUCE_US`, `LAUNCH_US`, `BANDWIDTH_EFFICIENCY`, `SCENARIOS`).
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


# ---- operator launches ---------------------------------------------------------------------------
# The recipe's fused decode layer (cann-recipes-infer `modeling_qwen3_moe.py`), one kernel each; views are free.
FUSED_LAYER_OPS: tuple[str, ...] = (
    "add_rms_norm (input)", "merged qkv matmul", "q_norm rms_norm", "k_norm rms_norm",
    "apply_rotary_pos_emb", "k cache scatter_update", "v cache scatter_update",
    "fused_infer_attention_score", "o_proj matmul", "all_reduce", "add_rms_norm (post-attention)",
    "router matmul", "moe_gating_top_k_softmax", "moe_init_routing_v2", "grouped_matmul w13",
    "swiglu", "grouped_matmul w2", "moe_finalize_routing", "all_reduce",
)
FUSED_TOKEN_OPS: tuple[str, ...] = (
    "embedding lookup (shifted, masked)", "embedding mask multiply", "all_reduce", "final rms_norm",
    "lm_head matmul", "all_gather", "argmax",
)


def fused_ops_per_token(cfg: ModelConfig) -> int:
    """Kernel launches of one decode token with the recipe's fused ops (collectives included)."""
    return cfg.num_hidden_layers * len(FUSED_LAYER_OPS) + len(FUSED_TOKEN_OPS)


# ---- assumptions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """An assumed quantity: a low / typical / high value and why."""
    low: float
    mid: float
    high: float
    source: str


ALLREDUCE_US: dict[str, Range] = {
    "AI_CPU": Range(20.0, 30.0, 40.0, "assumption: small (8 KB) HCCL all-reduce orchestrated on the device's "
                    "AI CPU, A3's default HCCL_OP_EXPANSION_MODE (CANN's HCCL_OP_EXPANSION_MODE doc); chapter 11 measures it"),
    "AIV": Range(3.0, 5.0, 8.0, "assumption: the same all-reduce orchestrated and executed on the Vector cores "
                 "(HCCL_OP_EXPANSION_MODE=AIV, the recipe's setting); chapter 11 measures it"),
}
LAUNCH_US: dict[str, Range] = {
    "eager": Range(5.0, 7.5, 10.0, "assumption: host cost of one eager PyTorch operator on NPU (Python, "
                   "dispatcher, task queue); exceeds a batch-1 kernel's device time, so the host is the floor"),
    "graph": Range(0.5, 1.0, 2.0, "assumption: per-kernel cost inside a compiled static graph (one host "
                   "launch per token, device-side scheduling between kernels)"),
}
BANDWIDTH_EFFICIENCY = Range(0.6, 0.7, 0.85, "assumption: fraction of peak HBM bandwidth reached by the "
                             "small per-rank matrices of batch-1 decode (a few MB each)")

# Named (launch mode, HCCL mode) combinations; "graph, AIV" is the recipe's final configuration.
SCENARIOS: dict[str, dict] = {
    "eager, AI_CPU": {"launch": "eager", "hccl": "AI_CPU"},
    "graph, AI_CPU": {"launch": "graph", "hccl": "AI_CPU"},
    "graph, AIV": {"launch": "graph", "hccl": "AIV"},
}


def scenario_kwargs(name: str, which: str = "mid") -> dict:
    """predict_decode_ms keyword arguments of a named scenario at its low/mid/high assumptions."""
    s = SCENARIOS[name]
    # low latency per op and high efficiency go together (the optimistic end), and vice versa
    efficiency = {"low": "high", "mid": "mid", "high": "low"}[which]
    return {"collective_latency_us": getattr(ALLREDUCE_US[s["hccl"]], which),
            "dispatch_us": getattr(LAUNCH_US[s["launch"]], which),
            "bandwidth_efficiency": getattr(BANDWIDTH_EFFICIENCY, efficiency)}


# ---- the prediction ------------------------------------------------------------------------------
def predict_decode_ms(cfg: ModelConfig, hw: Hardware | str, tp: int, dtype_bytes: int = 2, *,
                      context_len: int = 0,
                      collective_latency_us: float = ALLREDUCE_US["AI_CPU"].mid,
                      link_bandwidth_Bps: float | None = None,
                      ops_per_token: int | None = None,
                      dispatch_us: float = LAUNCH_US["eager"].mid,
                      bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY.mid,
                      overlap_dispatch: bool = False) -> dict:
    """Predicted milliseconds for one batch-1 decode token on `tp` devices of kind `hw`.

    memory      = per-rank bytes read / (peak bandwidth * bandwidth_efficiency)
    collectives = per collective: collective_latency_us, plus, if link_bandwidth_Bps is given, a
                  ring transfer term (all-reduce 2(p-1)/p * bytes, all-gather (p-1) * bytes);
                  at batch 1 messages are KB, so latency dominates and the default omits it
    dispatch    = ops_per_token (default: the recipe's fused kernels, `fused_ops_per_token(cfg)`) * dispatch_us
    total       = memory + collectives + dispatch (nothing overlaps: a pessimistic sum), or with
                  overlap_dispatch=True max(dispatch, memory + collectives) (host launches hidden
                  behind device work, the optimistic end).
    Defaults are the eager, AI_CPU scenario at typical values (see `SCENARIOS`).
    """
    hw = hardware(hw) if isinstance(hw, str) else hw
    if not 0 < bandwidth_efficiency <= 1:
        raise ValueError(f"bandwidth_efficiency must be in (0, 1], got {bandwidth_efficiency}")
    b = bytes_per_token(cfg, tp, dtype_bytes, context_len)
    coll = collectives_per_token(cfg, tp, dtype_bytes)
    n_ops = fused_ops_per_token(cfg) if ops_per_token is None else ops_per_token

    memory_ms = b["total"] / (hw.bandwidth_Bps * bandwidth_efficiency) * 1e3
    collectives_us = 0.0
    for m in coll["messages"]:
        transfer_s = 0.0
        if link_bandwidth_Bps:
            moved = 2 * (tp - 1) / tp * m.bytes if m.op == "all_reduce" else (tp - 1) * m.bytes
            transfer_s = moved / link_bandwidth_Bps
        collectives_us += m.count * (collective_latency_us + transfer_s * 1e6)
    collectives_ms = collectives_us / 1e3
    dispatch_ms = n_ops * dispatch_us / 1e3
    if overlap_dispatch:
        total_ms = max(dispatch_ms, memory_ms + collectives_ms)
    else:
        total_ms = memory_ms + collectives_ms + dispatch_ms
    return {
        "memory_ms": memory_ms, "collectives_ms": collectives_ms, "dispatch_ms": dispatch_ms,
        "total_ms": total_ms,
        "bytes_per_rank": b["total"], "collectives": coll["count"], "ops_per_token": n_ops,
        "assumptions": {"hardware": hw.name, "bandwidth_Bps": hw.bandwidth_Bps, "tp": tp,
                        "dtype_bytes": dtype_bytes, "context_len": context_len,
                        "collective_latency_us": collective_latency_us,
                        "link_bandwidth_Bps": link_bandwidth_Bps, "dispatch_us": dispatch_us,
                        "bandwidth_efficiency": bandwidth_efficiency, "overlap_dispatch": overlap_dispatch},
    }


# ---- the ladder, step by step --------------------------------------------------------------------
# Each step is asked what its recipe declares (`steps.recipe_upto(name)`), never compared by name.
# `steps` is imported inside the functions: it imports every model part (compile, fused), which the
# byte arithmetic above does not need.
WRITEUP_TARGET_MS = 20.0      # the cann-recipes write-up: 8 A3 cards, BF16, batch 1, < 20 ms per token


def step_ops_per_token(step: str, cfg: ModelConfig, measured: dict[str, float], measured_cfg: ModelConfig) -> float:
    """Operators per token of `step` on `cfg`, scaled from a profiler count on a small model.

    Assumption (stated, adjustable by passing your own `measured`): operators scale with the
    number of layers; while the recipe still loops over experts (not `grouped_experts`) they also
    scale with top-k K. Once decode is one graph (`graph`) the count is the fused recipe's kernels
    (one graph launch per token)."""
    from .steps import recipe_upto

    recipe = recipe_upto(step)
    if recipe.graph:
        return fused_ops_per_token(cfg)
    scale = cfg.num_hidden_layers / measured_cfg.num_hidden_layers
    if not recipe.grouped_experts:                           # one expert call per routed expert
        scale *= cfg.num_experts_per_tok / measured_cfg.num_experts_per_tok
    return measured[step] * scale


def predict_ladder(cfg: ModelConfig, tp: int, measured_ops: dict[str, float], measured_cfg: ModelConfig,
                   hw: Hardware | str = "a3-die", dtype_bytes: int = 2, which: str = "mid",
                   steps: tuple[str, ...] | None = None) -> list[dict]:
    """A predicted decode latency for every ladder step (`steps.STEPS`, or the names given) on `tp` devices.

    What a step's recipe declares changes the model (chapters 3-11):
    - not `tensor_parallel`: one device, eager, no collectives;
    - `tensor_parallel` but not `splits_experts`: attention split over tp; every rank still runs the
      whole MoE (it reads the K activated experts in full); one all-reduce per layer (+ embedding, lm_head);
    - `splits_experts`: experts split too; two all-reduces per layer;
    - fewer operators step by step (counts from `measured_ops`, see `step_ops_per_token`);
    - `graph`: one graph launch; per-kernel cost inside the graph (LAUNCH_US["graph"]);
    - `env` HCCL_OP_EXPANSION_MODE: the all-reduce latency of that mode (ALLREDUCE_US; default AI_CPU).
    Each row says whether the step's weights fit in one device's memory (`fits`)."""
    from .steps import STEP_NAMES, recipe_upto

    hw = hardware(hw) if isinstance(hw, str) else hw
    rows = []
    for step in steps or STEP_NAMES:
        recipe = recipe_upto(step)
        size = tp if recipe.tensor_parallel else 1
        moe_replicated = recipe.tensor_parallel and not recipe.splits_experts   # whole experts on every rank
        b = bytes_per_token(cfg, size, dtype_bytes)
        resident = resident_bytes_per_rank(cfg, size, dtype_bytes)
        if moe_replicated:
            full = bytes_per_token(cfg, 1, dtype_bytes)
            b = {**b, "experts": full["experts"], "router": full["router"]}
            b["total"] = sum(v for k, v in b.items() if k in PARTS)
            resident += (cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size
                         * dtype_bytes) * (1 - 1 / size)
        launch = "graph" if recipe.graph else "eager"
        hccl = recipe.env.get("HCCL_OP_EXPANSION_MODE", "AI_CPU")              # AI_CPU: A3's default
        eff = getattr(BANDWIDTH_EFFICIENCY, {"low": "high", "mid": "mid", "high": "low"}[which])
        memory_ms = b["total"] / (hw.bandwidth_Bps * eff) * 1e3
        coll = collectives_per_token(cfg, size, dtype_bytes)
        n_coll = coll["count"] - (cfg.num_hidden_layers if moe_replicated else 0)   # no all-reduce after the MoE
        collectives_ms = n_coll * getattr(ALLREDUCE_US[hccl], which) / 1e3
        n_ops = step_ops_per_token(step, cfg, measured_ops, measured_cfg)
        dispatch_ms = n_ops * getattr(LAUNCH_US[launch], which) / 1e3
        rows.append({"step": step, "tp": size, "memory_ms": memory_ms, "collectives_ms": collectives_ms,
                     "dispatch_ms": dispatch_ms, "total_ms": memory_ms + collectives_ms + dispatch_ms,
                     "ops_per_token": n_ops, "collectives": n_coll, "bytes_per_rank": b["total"],
                     "resident_bytes_per_rank": resident, "fits": resident <= hw.memory_bytes,
                     "assumptions": {"hardware": hw.name, "hccl": hccl, "launch": launch,
                                     "which": which, "bandwidth_efficiency": eff}})
    return rows


def plot_waterfall(rows: list[dict], title: str, target_ms: float | None = WRITEUP_TARGET_MS, ax=None):
    """Stacked bars (memory, collectives, dispatch) per step; steps whose weights do not fit one
    device are hatched; the write-up's target as a line."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(10, 3.4))[1]
    names = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for term, color in (("memory_ms", "#4c72b0"), ("collectives_ms", "#c0504d"), ("dispatch_ms", "#8c8c8c")):
        values = [r[term] for r in rows]
        bars = ax.bar(names, values, bottom=bottom, color=color, label=term.replace("_ms", ""))
        for bar, r in zip(bars, rows):
            if not r["fits"]:
                bar.set_hatch("//")
        bottom = [b + v for b, v in zip(bottom, values)]
    if target_ms:
        ax.axhline(target_ms, color="k", ls="--", lw=1, label=f"write-up: < {target_ms:.0f} ms")
    ax.set_yscale("log")
    ax.set_ylabel("predicted ms / token (log)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=40)
    ax.legend(fontsize=8)
    return ax
