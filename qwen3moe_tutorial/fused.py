"""Fused operators (ladder steps fused_routing_gmm, fused_rmsnorm, fused_attention; chapters 06-08).

- Each class subclasses the previous step's part and routes its math through
  `qwen3moe_tutorial.ops`, with torch_npu's signatures: the NPU kernels on an A3, the pure-PyTorch
  references elsewhere. The calls are the A3 recipe's (cann-recipes-infer `models/qwen3_moe/`; the book's appendix on fused operators).
- Weights change layout once, at load time: experts become [E, in, out] for grouped matmul
  (`grouped_matmul_weight`), cast to FRACTAL_NZ once they are on an NPU (`Qwen3MoeModel.to_device`).
- Not here: graph capture (compile.py) and anything that changes numerics beyond op rounding.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .model import DecoderLayer, Qwen3MoeModel, RMSNorm
from .parallel import all_reduce
from .tp import AttentionMergedQKV, MoETPW13
from .weights import Checkpoint

# ---- fused_routing_gmm ---------------------------------------------------------------------------
def grouped_matmul_weight(w: torch.Tensor) -> torch.Tensor:
    """Experts [E, out, in] (checkpoint orientation) -> the [E, in, out] that grouped matmul takes.

    At load time this is a transposed view of the same memory: on a CPU each expert's matrix-vector
    product (one row per expert at decode) then reads its weights contiguously along `in`, the order
    a CPU reduction streams fastest. On an NPU, `Qwen3MoeModel.to_device` makes the recipe's
    contiguous [E, in, out] copy on the device and casts it to FRACTAL_NZ (`nz_weights`). Either way
    the logical shape, the values and the op call are the same.
    """
    return w.transpose(1, 2)


# Added to the top-k sum before dividing, as the recipe does: a row whose top-k probabilities all
# round to 0 (low precision, extreme logits) would otherwise divide 0/0 and turn the whole token NaN.
RENORM_EPS = 1e-20


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Router logits [T, E] -> top-k weights [T, K], expert ids [T, K] int32 and the k-major row_idx
    [T, K] int32 (v1's init_routing takes it, v2 ignores it). The weights are renormalised outside
    the op, as the recipe does."""
    weights, experts, row_idx = ops.npu_moe_gating_top_k_softmax(logits, None, k=top_k)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights, experts, row_idx


def moe_v2(x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
           norm_topk_prob: bool) -> torch.Tensor:
    """The recipe's MoE chain on this rank, before the all-reduce: x [T, H] and router logits [T, E],
    experts w13 [E, H, 2*I_r] and w2 [E, I_r, H] -> [T, H], this rank's partial sum.

    gating top-k softmax -> init_routing_v2 (row-major, counts) -> grouped matmul -> swiglu ->
    grouped matmul -> finalize_routing (drop_pad_mode 2). `FusedRoutingGMM.forward` and the op
    tests (CPU references, torch.compile, NPU kernels) all run this one function."""
    T, E, K = x.shape[0], logits.shape[-1], top_k
    weights, experts, _ = route(logits, K, norm_topk_prob)                 # [T, K]
    rows, row_of, counts, _ = ops.npu_moe_init_routing_v2(                 # rows [T*K, H] by expert
        x, experts, active_num=T * K, expert_num=E, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, active_expert_range=[0, E], quant_mode=-1)
    gate_up = ops.npu_grouped_matmul([rows], [w13], group_list=counts, split_item=3,
                                     group_type=0, group_list_type=1)[0]   # [T*K, 2*I_r]
    act = ops.npu_swiglu(gate_up, dim=-1)                                  # [T*K, I_r]
    down = ops.npu_grouped_matmul([act], [w2], group_list=counts, split_item=3,
                                  group_type=0, group_list_type=1)[0]      # [T*K, H], partial
    return ops.npu_moe_finalize_routing(down, None, None, None, weights.to(down.dtype), row_of, None,
                                        drop_pad_mode=2)                   # [T, H]


class FusedRoutingGMM(MoETPW13):
    """Router, routing, all experts in two grouped matmuls, and the weighted scatter back: no loop."""
    nz_weights = ("w13", "w2")                 # FRACTAL_NZ on an NPU, in any dtype (the recipe's GMM weights)

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        super().load(ckpt, prefix, dtype)
        self.w13 = nn.Parameter(grouped_matmul_weight(self.w13), requires_grad=False)   # [E, H, 2*I_r]
        self.w2 = nn.Parameter(grouped_matmul_weight(self.w2), requires_grad=False)     # [E, I_r, H]

    def gate(self, x: torch.Tensor):
        """Top-k weights [T, K] (renormalised outside the op, as the recipe does) and expert ids (int32)."""
        weights, experts, _ = route(F.linear(x, self.router), self.cfg.num_experts_per_tok,
                                    self.cfg.norm_topk_prob)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        x = x.view(B * S, H)
        logits = F.linear(x, self.router)                                      # [T, E]
        out = moe_v2(x, logits, self.w13, self.w2, self.cfg.num_experts_per_tok,
                     self.cfg.norm_topk_prob)                                  # [T, H], partial
        return all_reduce(out.view(B, S, H), self.tp)                          # S*H*bytes per token


def moe_v1_path(moe: FusedRoutingGMM, x: torch.Tensor) -> torch.Tensor:
    """The write-up's variant of the same block, before all-reduce: init_routing v1 (k-major
    row_idx), compute_expert_tokens (cumulative group list) and finalize in drop_pad_mode 0."""
    T, K = x.shape[0], moe.cfg.num_experts_per_tok
    logits = F.linear(x, moe.router)
    weights, experts, row_idx = route(logits, K, moe.cfg.norm_topk_prob)      # row_idx k-major
    rows, row_of, sorted_experts = ops.npu_moe_init_routing(x, row_idx, experts, T)
    ends = ops.npu_moe_compute_expert_tokens(sorted_experts, moe.cfg.num_experts).to(torch.int64)
    gate_up = ops.npu_grouped_matmul([rows], [moe.w13], group_list=ends, split_item=3, group_type=0,
                                     group_list_type=0)[0]
    down = ops.npu_grouped_matmul([ops.npu_swiglu(gate_up)], [moe.w2], group_list=ends, split_item=3,
                                  group_type=0, group_list_type=0)[0]
    return ops.npu_moe_finalize_routing(down, None, None, None, weights.to(down.dtype), row_of, None,
                                        drop_pad_mode=0)


# ---- fused_rmsnorm ---------------------------------------------------------------------------------
class FusedRMSNorm(RMSNorm):
    """npu_rms_norm (one rounding); `add_norm` fuses the residual add (npu_add_rms_norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.npu_rms_norm(x, self.weight, epsilon=self.eps)[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(normed, new residual): norm(x) and x itself when there is no residual yet (layer 0),
        else norm(residual + x) and the sum — add_rms_norm's third output."""
        if residual is None:
            return self(x), x
        y, _, total = ops.npu_add_rms_norm(residual, x, self.weight, epsilon=self.eps)
        return y, total


class FusedResidualLayer(DecoderLayer):
    """The recipe's residual protocol: a layer takes and returns (hidden, residual) — the residual
    add happens inside the next norm instead of as a separate operator."""

    def forward(self, h, residual, rope, input_pos, kv_len, k_cache, v_cache):
        h, residual = self.input_norm.add_norm(h, residual)
        h = self.attn(h, rope, input_pos, kv_len, k_cache, v_cache)
        h, residual = self.post_norm.add_norm(h, residual)
        return self.moe(h), residual


class FusedResidualModel(Qwen3MoeModel):
    def trunk(self, x, rope, input_pos, kv_len) -> torch.Tensor:
        h, residual = x, None
        for layer, k_cache, v_cache in zip(self.layers, self.cache.k, self.cache.v):
            h, residual = layer(h, residual, rope, input_pos, kv_len, k_cache, v_cache)
        return self.norm.add_norm(h[:, -1], residual[:, -1])[0]                # final add + norm


# ---- fused_attention -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def causal_mask_2048(device: torch.device) -> torch.Tensor:
    """The compressed causal mask FIA's sparse_mode 2 expects: True above the diagonal (masked)."""
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)


class FusedAttention(AttentionMergedQKV):
    """In-place RoPE op, scatter_update_ cache writes and fused infer attention (FIA): the prompt
    kernel over the fresh K/V in prefill, the incremental kernel over the cache in decode."""

    def project_qkv(self, x: torch.Tensor):
        """The merged projection; q and k made contiguous before their norms, as the recipe does
        (`npu_rms_norm` on a strided slice of the qkv output is not what the kernel is fed there)."""
        q, k, v = super().project_qkv(x)
        return q.contiguous(), k.contiguous(), v

    def rotate_and_cache(self, q, k, v, rope, input_pos, k_cache, v_cache):
        B, S = q.shape[:2]
        cos, sin = (t[None, :, None, :].expand(B, S, 1, self.D) for t in rope)   # [B, S, 1, D]
        q, k = ops.npu_apply_rotary_pos_emb(q, k, cos, sin, layout="BSND")      # in place
        start = input_pos[:1].expand(B)                                          # [B] write offsets
        ops.scatter_update_(k_cache, start, k.reshape(B, S, -1), -2)            # cache [B, S_max, Nkv_r*D]
        ops.scatter_update_(v_cache, start, v.reshape(B, S, -1), -2)            # written in place
        return q, k

    def attend(self, q, k, v, k_cache, v_cache, input_pos, kv_len):
        B, S = q.shape[:2]
        heads = dict(num_heads=self.n_heads, num_key_value_heads=self.n_kv, scale=self.D ** -0.5,
                     input_layout="BSH")
        if S > 1:   # prefill from position 0: the prompt kernel, causal, over the fresh states
            out, _ = ops.npu_fused_infer_attention_score(
                q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1),
                atten_mask=causal_mask_2048(q.device), sparse_mode=2, next_tokens=0, **heads)
        else:       # decode: the incremental kernel over the static cache, kv_len valid positions
            out, _ = ops.npu_fused_infer_attention_score(
                q.reshape(B, 1, -1), k_cache, v_cache, actual_seq_lengths_kv=[kv_len] * B, **heads)
        return out.view(B, S, self.n_heads, self.D)                            # [B, S, N_r, D]
