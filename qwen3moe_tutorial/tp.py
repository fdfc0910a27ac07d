"""Tensor parallelism (ladder steps attention_tp, merged_qkv, moe_tp_w13_swiglu; chapters 03-05).

- Each class subclasses one reference part (model.py), reads only this rank's slices of the
  checkpoint, and adds its collective as a visible call with its bytes per token.
- Head placement (`HeadPlan`) follows the A3 recipe (cann-recipes-infer `module/linear.py`, chapter 3):
  N_r = N / tp query heads per rank, Nkv_r = max(Nkv // tp, 1) KV heads, replicated (rank r uses
  KV head r // (tp / Nkv)) when tp > Nkv.
- Fused weights (wqkv, w13) are built from the logical tensors after slicing each one, so the
  shard of a fused weight is always [q_r | k_r | v_r] or [gate_r | up_r].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig
from .model import Attention, Embedding, LMHead, MoE
from .parallel import TP, all_gather_last_dim, all_reduce
from .weights import Checkpoint


@dataclass(frozen=True)
class HeadPlan:
    """Which global query and KV heads one rank holds: the single answer used by the attention
    parts, the roofline's byte counts and the launcher's check, so they cannot disagree."""
    q_heads: tuple[int, ...]      # N_r consecutive query heads
    kv_heads: tuple[int, ...]     # Nkv_r = max(Nkv // tp, 1) KV heads
    replication: int              # ranks holding each KV head: tp / Nkv when tp > Nkv, else 1

    @property
    def n_heads(self) -> int:
        """N_r: query heads on this rank."""
        return len(self.q_heads)

    @property
    def n_kv(self) -> int:
        """Nkv_r: KV heads on this rank."""
        return len(self.kv_heads)

    @classmethod
    def of(cls, cfg: ModelConfig, tp: TP) -> "HeadPlan":
        """Rank `tp.rank`'s heads; a clear ValueError when the heads cannot be placed evenly."""
        N, Nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        if N % tp.size:
            raise ValueError(f"num_attention_heads ({N}) is not divisible by the tensor-parallel size ({tp.size})")
        if tp.size > Nkv and tp.size % Nkv:
            raise ValueError(f"tensor-parallel size {tp.size} exceeds num_key_value_heads ({Nkv}) and is not a "
                             f"multiple of it, so KV heads cannot be replicated evenly")
        if tp.size <= Nkv and Nkv % tp.size:
            raise ValueError(f"num_key_value_heads ({Nkv}) is not divisible by the tensor-parallel size ({tp.size})")
        n_r = N // tp.size
        n_kv_r = max(Nkv // tp.size, 1)
        replication = max(tp.size // Nkv, 1)
        first_kv = tp.rank // replication * n_kv_r           # replicated: KV head r // (tp / Nkv); else r * Nkv_r
        return cls(q_heads=tuple(range(tp.rank * n_r, (tp.rank + 1) * n_r)),
                   kv_heads=tuple(range(first_kv, first_kv + n_kv_r)), replication=replication)


class AttentionTP(Attention):
    """This rank's heads; o_proj split by input columns, so its output is a partial sum."""

    def __init__(self, cfg: ModelConfig, tp: TP, **kwargs):
        super().__init__(cfg, tp, **kwargs)
        self.plan = HeadPlan.of(cfg, tp)
        self.n_heads, self.n_kv = self.plan.n_heads, self.plan.n_kv              # N_r, Nkv_r

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        D, q0, kv0 = self.D, self.plan.q_heads[0], self.plan.kv_heads[0]
        rows = lambda name, first, n: ckpt.get_slice(f"{prefix}{name}.weight", 0, first * D, (first + n) * D, dtype)
        self.q_proj = nn.Parameter(rows("q_proj", q0, self.n_heads), requires_grad=False)    # [N_r*D, H]
        self.k_proj = nn.Parameter(rows("k_proj", kv0, self.n_kv), requires_grad=False)     # [Nkv_r*D, H]
        self.v_proj = nn.Parameter(rows("v_proj", kv0, self.n_kv), requires_grad=False)     # [Nkv_r*D, H]
        self.o_proj = nn.Parameter(ckpt.get_slice(f"{prefix}o_proj.weight", 1, q0 * D, (q0 + self.n_heads) * D,
                                                  dtype), requires_grad=False)              # [H, N_r*D]
        self.q_norm.load(ckpt, prefix + "q_norm.weight", dtype)
        self.k_norm.load(ckpt, prefix + "k_norm.weight", dtype)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        partial = F.linear(o, self.o_proj)                                     # [B, S, H], partial sum
        return all_reduce(partial, self.tp)                                    # H*bytes per token


class VocabParallelEmbedding(Embedding):
    """Rows [r*V/tp, (r+1)*V/tp) of the table; ids of other shards give zeros, then all-reduce."""

    def load(self, ckpt: Checkpoint, dtype: torch.dtype):
        self.start, self.stop = self.tp.split(self.cfg.vocab_size, "vocab_size")
        self.weight = nn.Parameter(ckpt.get_slice("model.embed_tokens.weight", 0, self.start, self.stop, dtype),
                                   requires_grad=False)                        # [V/tp, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)                         # [B, S]
        local = torch.where(mine, ids - self.start, 0)
        x = F.embedding(local, self.weight) * mine[..., None].to(self.weight.dtype)   # [B, S, H]
        return all_reduce(x, self.tp)                                          # S*H*bytes per call


class VocabParallelLMHead(LMHead):
    """Rows [r*V/tp, (r+1)*V/tp) of lm_head; each rank's logits are all-gathered in rank order."""

    def load(self, ckpt: Checkpoint, dtype: torch.dtype):
        tied = self.cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.weight_map
        start, stop = self.tp.split(self.cfg.vocab_size, "vocab_size")
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.weight = nn.Parameter(ckpt.get_slice(name, 0, start, stop, dtype), requires_grad=False)  # [V/tp, H]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight)                                       # [B, V/tp]
        return all_gather_last_dim(local, self.tp).float()                     # [B, V]: V*bytes per token


class AttentionMergedQKV(AttentionTP):
    """One matmul for q, k and v: wqkv_r = [q_r | k_r | v_r], built after slicing each part."""
    nz_weights = ("qkv_proj", "o_proj")

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        super().load(ckpt, prefix, dtype)
        self.qkv_proj = nn.Parameter(torch.cat([self.q_proj, self.k_proj, self.v_proj]),
                                     requires_grad=False)                      # [(N_r+2*Nkv_r)*D, H]
        del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x: torch.Tensor):
        B, S, _ = x.shape
        sizes = (self.n_heads * self.D, self.n_kv * self.D, self.n_kv * self.D)
        q, k, v = F.linear(x, self.qkv_proj).split(sizes, dim=-1)              # one matmul
        return (q.view(B, S, self.n_heads, self.D), k.view(B, S, self.n_kv, self.D),
                v.view(B, S, self.n_kv, self.D))


class MoETPW13(MoE):
    """Every expert split along I: w13_r = [gate_r | up_r] (columns), w2_r = down's columns of I_r.

    Each rank computes a partial sum over its slice of the intermediate dimension; one all-reduce
    after the experts completes it."""

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        start, stop = self.tp.split(self.cfg.moe_intermediate_size, "moe_intermediate_size")
        self.router = nn.Parameter(ckpt.get(prefix + "gate.weight", dtype), requires_grad=False)   # [E, H]
        part = lambda e, proj, dim: ckpt.get_slice(f"{prefix}experts.{e}.{proj}.weight", dim, start, stop, dtype)
        E = range(self.cfg.num_experts)
        self.w13 = nn.Parameter(torch.stack([torch.cat([part(e, "gate_proj", 0), part(e, "up_proj", 0)])
                                             for e in E]), requires_grad=False)  # [E, 2*I_r, H]
        self.w2 = nn.Parameter(torch.stack([part(e, "down_proj", 1) for e in E]),
                               requires_grad=False)                              # [E, H, I_r]

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        h = ops.npu_swiglu(F.linear(x, self.w13[e]), dim=-1)                   # [T_e, 2*I_r] -> [T_e, I_r]
        return F.linear(h, self.w2[e])                                         # [T_e, H], partial sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.tp)                         # S*H*bytes per token
