"""The reference Qwen3-MoE decoder: Hugging Face's math in one readable file, built for decode.

How it departs from transformers' Qwen3MoeForCausalLM (same numbers, different shape of code):
- a static, pre-allocated KV cache and separate `prefill` / `decode` entry points;
- each part (embedding, attention, MoE, norm, head) is a small class that loads its own weights
  from a `Checkpoint`; the ladder of optimizations (steps.py) swaps one part at a time;
- batch-1 decode first: no padding, no sampling, no training.
Letters: B batch, S sequence, H hidden, N heads, Nkv KV heads, D head dim, E experts, K top-k,
I expert intermediate, V vocabulary, _r = per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .parallel import TP
from .weights import Checkpoint

ACL_FORMAT_FRACTAL_NZ = 29      # the NPU's internal matmul-weight layout (npu_format_cast's acl_format)
DEFAULT_MAX_LEN = 512           # KV-cache positions unless asked otherwise: one size for every prompt
                                # length, so a compiled decode graph is reused across prompts


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def load(self, ckpt: Checkpoint, name: str, dtype: torch.dtype):
        self.weight = nn.Parameter(ckpt.get(name, dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryTable(nn.Module):
    """cos/sin for every position up to max_len, rotate-half convention, fp32 then cast."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype):
        super().__init__()
        D = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        freqs = torch.arange(max_len).float()[:, None] * inv_freq[None, :]     # [S_max, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                # [S_max, D]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def forward(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[input_pos], self.sin[input_pos]                        # [S, D] each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class KVCache:
    """Per-layer key and value buffers [B, S_max, Nkv_r*D] (the recipe's 3-D layout, heads side by
    side), allocated once before prefill and written in place."""
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TP):
        super().__init__()
        self.cfg, self.tp = cfg, tp

    def load(self, ckpt: Checkpoint, dtype: torch.dtype):
        self.weight = nn.Parameter(ckpt.get("model.embed_tokens.weight", dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)                                   # [B, S, H]


class LMHead(nn.Module):
    nz_weights = ("weight",)                   # cast to FRACTAL_NZ on an NPU (Qwen3MoeModel.to_device)

    def __init__(self, cfg: ModelConfig, tp: TP):
        super().__init__()
        self.cfg, self.tp = cfg, tp

    def load(self, ckpt: Checkpoint, dtype: torch.dtype):
        tied = self.cfg.tie_word_embeddings and "lm_head.weight" not in ckpt.weight_map   # as HF decides
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.weight = nn.Parameter(ckpt.get(name, dtype), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight).float()                                # [B, V]


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm before RoPE, over the static cache."""
    nz_weights = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, cfg: ModelConfig, tp: TP, norm: type = RMSNorm):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.n_heads = cfg.num_attention_heads                                 # N
        self.n_kv = cfg.num_key_value_heads                                    # Nkv
        self.D = cfg.head_dim
        self.q_norm = norm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = norm(cfg.head_dim, cfg.rms_norm_eps)

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):                  # [out, in]
            setattr(self, name, nn.Parameter(ckpt.get(f"{prefix}{name}.weight", dtype), requires_grad=False))
        self.q_norm.load(ckpt, prefix + "q_norm.weight", dtype)
        self.k_norm.load(ckpt, prefix + "k_norm.weight", dtype)

    def project_qkv(self, x: torch.Tensor):
        B, S, _ = x.shape
        q = F.linear(x, self.q_proj).view(B, S, self.n_heads, self.D)          # [B, S, N, D]
        k = F.linear(x, self.k_proj).view(B, S, self.n_kv, self.D)             # [B, S, Nkv, D]
        v = F.linear(x, self.v_proj).view(B, S, self.n_kv, self.D)             # [B, S, Nkv, D]
        return q, k, v

    def forward(self, x, rope, input_pos, kv_len, k_cache, v_cache):
        """x [B, S, H] at positions input_pos [S]; kv_len (int) = cache positions valid afterwards."""
        B, S, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate_and_cache(q, k, v, rope, input_pos, k_cache, v_cache)
        out = self.attend(q, k, v, k_cache, v_cache, input_pos, kv_len)        # [B, S, N, D]
        return self.project_out(out.reshape(B, S, self.n_heads * self.D))

    def rotate_and_cache(self, q, k, v, rope, input_pos, k_cache, v_cache):
        """RoPE on q and k, then write k (rotated) and v (raw) at positions input_pos."""
        cos, sin = (t[:, None, :] for t in rope)                               # [S, 1, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache[:, input_pos] = k.flatten(2)                                   # [B, S, Nkv*D] rows
        v_cache[:, input_pos] = v.flatten(2)
        return q, k

    def attend(self, q, k, v, k_cache, v_cache, input_pos, kv_len):
        """softmax(q k^T / sqrt(D) + causal mask) v over the whole cache; unwritten slots are masked."""
        group = self.n_heads // self.n_kv
        B, S_max = k_cache.shape[:2]
        k = k_cache.view(B, S_max, self.n_kv, self.D).repeat_interleave(group, dim=2).transpose(1, 2)  # [B, N, S_max, D]
        v = v_cache.view(B, S_max, self.n_kv, self.D).repeat_interleave(group, dim=2).transpose(1, 2)  # [B, N, S_max, D]
        scores = q.transpose(1, 2) @ k.transpose(2, 3) * self.D ** -0.5        # [B, N, S, S_max]
        visible = torch.arange(k.shape[2], device=q.device)[None, :] <= input_pos[:, None]  # [S, S_max]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs @ v).transpose(1, 2)                                     # [B, S, N, D]

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        return F.linear(o, self.o_proj)                                        # [B, S, H]


class MoE(nn.Module):
    """Router (softmax, top-k, renormalise) and a loop over the experts that received tokens."""

    def __init__(self, cfg: ModelConfig, tp: TP):
        super().__init__()
        self.cfg, self.tp = cfg, tp

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        E = self.cfg.num_experts
        self.router = nn.Parameter(ckpt.get(prefix + "gate.weight", dtype), requires_grad=False)  # [E, H]
        stack = lambda proj: torch.stack([ckpt.get(f"{prefix}experts.{e}.{proj}.weight", dtype) for e in range(E)])
        self.w_gate = nn.Parameter(stack("gate_proj"), requires_grad=False)   # [E, I, H]
        self.w_up = nn.Parameter(stack("up_proj"), requires_grad=False)       # [E, I, H]
        self.w_down = nn.Parameter(stack("down_proj"), requires_grad=False)   # [E, H, I]

    def route(self, x: torch.Tensor):
        """Top-k experts per token and their weights (fp32 softmax, renormalised over the k)."""
        logits = F.linear(x, self.router)                                      # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)  # [T, K]
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        x = x.view(-1, H)                                                      # [T, H]
        weights, experts = self.route(x)                                       # [T, K]
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():                                    # the loop fused ops remove
            token, slot = (experts == e).nonzero(as_tuple=True)
            y = self.expert(x[token], e) * weights[token, slot, None]          # [T_e, H]
            out.index_add_(0, token, y)
        return out.view(B, S, H)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        h = F.silu(F.linear(x, self.w_gate[e])) * F.linear(x, self.w_up[e])   # [T_e, I]
        return F.linear(h, self.w_down[e])                                     # [T_e, H]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TP, parts: "Parts"):
        super().__init__()
        self.input_norm = parts.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = parts.attention(cfg, tp, norm=parts.norm)
        self.post_norm = parts.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = parts.moe(cfg, tp)

    def load(self, ckpt: Checkpoint, prefix: str, dtype: torch.dtype):
        self.input_norm.load(ckpt, prefix + "input_layernorm.weight", dtype)
        self.attn.load(ckpt, prefix + "self_attn.", dtype)
        self.post_norm.load(ckpt, prefix + "post_attention_layernorm.weight", dtype)
        self.moe.load(ckpt, prefix + "mlp.", dtype)

    def forward(self, x, rope, input_pos, kv_len, k_cache, v_cache):
        h = x + self.attn(self.input_norm(x), rope, input_pos, kv_len, k_cache, v_cache)
        return h + self.moe(self.post_norm(h))


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: "Parts | None" = None, tp: TP = TP(), max_len: int = DEFAULT_MAX_LEN,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        parts = parts or Parts()
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        self.cfg, self.parts, self.tp, self.max_len, self.dtype = cfg, parts, tp, max_len, dtype
        self.embed = parts.embedding(cfg, tp)
        self.layers = nn.ModuleList(parts.layer(cfg, tp, parts) for _ in range(cfg.num_hidden_layers))
        self.norm = parts.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = parts.lm_head(cfg, tp)
        self.rope = RotaryTable(cfg, max_len, dtype)
        self.cache: KVCache | None = None

    @torch.no_grad()
    def load(self, ckpt: Checkpoint) -> "Qwen3MoeModel":
        ckpt.validate()
        with ckpt.progress("loading weights", ckpt.total_bytes() // self.tp.size) as update:
            self.embed.load(ckpt, self.dtype)
            for i, layer in enumerate(self.layers):
                layer.load(ckpt, f"model.layers.{i}.", self.dtype)
                update()
            self.norm.load(ckpt, "model.norm.weight", self.dtype)
            self.lm_head.load(ckpt, self.dtype)
        return self

    def allocate_cache(self, batch: int = 1) -> KVCache:
        """Zeroed per-layer K/V buffers [B, max_len, Nkv_r*D] with this rank's KV heads."""
        n_kv = self.layers[0].attn.n_kv
        dev = self.norm.weight.device
        shape = (batch, self.max_len, n_kv * self.cfg.head_dim)
        self.cache = KVCache([torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers],
                             [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers])
        return self.cache

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits [B, V] (fp32) of the last position of `ids` [B, S] placed at `input_pos` [S];
        `kv_len` is the number of valid cache positions once these are written."""
        rope = self.rope(input_pos)
        x = self.embed(ids)                                                    # [B, S, H]
        return self.lm_head(self.trunk(x, rope, input_pos, kv_len))            # [B, V]

    def trunk(self, x, rope, input_pos, kv_len) -> torch.Tensor:
        """The decoder layers and the final norm; returns the last position's hidden state [B, H]."""
        for layer, k_cache, v_cache in zip(self.layers, self.cache.k, self.cache.v):
            x = layer(x, rope, input_pos, kv_len, k_cache, v_cache)
        return self.norm(x[:, -1])

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Fill the (fresh) cache with the prompt ids [B, S]; logits of the last prompt position."""
        S = ids.shape[1]
        if S > self.max_len:
            raise ValueError(f"prompt of {S} tokens does not fit the KV cache ({self.max_len} positions)")
        if self.cache is None or self.cache.k[0].shape[0] != ids.shape[0]:
            self.allocate_cache(ids.shape[0])
        else:                       # reuse the buffers: a captured graph holds their addresses
            for t in self.cache.k + self.cache.v:
                t.zero_()
        return self(ids, torch.arange(S, device=ids.device), S)

    def decode(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One new token per sequence, ids [B, 1], at position input_pos [1] (= kv_len - 1).

        Deliberately undecorated: this is the method graph mode compiles, and torchair's compile
        cache saves a graph only when the code dynamo recorded is this method's own `__code__` (a
        `@torch.no_grad()` wrapper would hide it). The caller enters no_grad, as the recipe's runner does."""
        return self(ids, input_pos, kv_len)

    def to_device(self, device) -> "Qwen3MoeModel":
        """Move the loaded model to `device`; on an NPU, then cast each part's matmul weights to
        FRACTAL_NZ, the cube unit's tiled layout, as the recipe does after its `to_device()`.

        The cast must come after the move: `npu_format_cast` of a CPU tensor is a no-op. Which weights
        are cast is declared by each part (`nz_weights`); the router, norms and embedding stay ND, and
        float32 linear weights stay ND as in the recipe's linear layers (grouped-matmul experts are
        cast in any dtype). One difference: the recipe also transposes its linear weights to
        [in, out] for `torch.matmul`; ours keep the checkpoint's [out, in] for `F.linear`, which hands
        the NPU's matmul the same weight as a transposed operand (vllm-ascend casts [out, in] linear
        weights to NZ the same way). Off the NPU the layout is the checkpoint's; values never change."""
        self.to(device)
        if torch.device(device).type != "npu":
            return self
        from . import ops

        torch.npu.config.allow_internal_format = True          # as the recipe's model runner sets it
        for module in self.modules():
            for name in getattr(module, "nz_weights", ()):
                w = getattr(module, name)
                if w.dim() == 2 and w.dtype == torch.float32:
                    continue
                setattr(module, name, nn.Parameter(ops.npu_format_cast(w.data.contiguous(), ACL_FORMAT_FRACTAL_NZ),
                                                   requires_grad=False))
        return self


@dataclass(frozen=True)
class Parts:
    """The classes a model is built from; each step of the ladder replaces one of them."""
    embedding: type = Embedding
    attention: type = Attention
    moe: type = MoE
    norm: type = RMSNorm
    layer: type = DecoderLayer
    lm_head: type = LMHead
    model: type = Qwen3MoeModel

    def build(self, cfg: ModelConfig, tp: TP = TP(), max_len: int = DEFAULT_MAX_LEN, dtype: torch.dtype = torch.float32):
        return self.model(cfg, self, tp, max_len=max_len, dtype=dtype)
