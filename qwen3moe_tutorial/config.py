"""The model configuration: one dataclass, read from any Hugging Face Qwen3-MoE config.json.

- Holds only what the decoder needs; unknown HF fields are ignored, unsupported ones are rejected
  by name (mlp_only_layers, shared experts, sliding window, RoPE scaling, biases, ...).
- head_dim is always read, never derived from hidden_size (Qwen3-MoE: heads * head_dim != hidden).
- Presets: `tiny` (tests, the embedded default), `mini` (CPU benchmarks), the two released models.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config.json that this package cannot model faithfully."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int                 # H
    num_hidden_layers: int           # L
    num_attention_heads: int         # N
    num_key_value_heads: int         # Nkv
    head_dim: int                    # D (not hidden_size // N)
    num_experts: int                 # E
    num_experts_per_tok: int         # K
    moe_intermediate_size: int       # I
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = True
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "custom"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "max_position_embeddings")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ConfigError(f"rope_theta and rms_norm_eps must be positive, got {self.rope_theta}, "
                              f"{self.rms_norm_eps}")

    # ---- derived sizes (all per full model, no parallelism) ----
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def param_counts(self) -> dict:
        """Parameter counts by part; `experts_activated` counts only the K experts a token uses."""
        H, L, I, E, K = (self.hidden_size, self.num_hidden_layers, self.moe_intermediate_size,
                         self.num_experts, self.num_experts_per_tok)
        attention = H * (self.q_size + 2 * self.kv_size) + self.q_size * H + 2 * self.head_dim
        expert = 3 * H * I                      # gate, up, down
        counts = {
            "embedding": self.vocab_size * H,
            "attention": L * attention,
            "router": L * E * H,
            "norms": L * 2 * H + H,
            "experts_total": L * E * expert,
            "experts_activated": L * K * expert,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * H,
        }
        counts["total"] = sum(v for k, v in counts.items() if k != "experts_activated")
        # One decode token reads one embedding row, not the table.
        counts["activated_per_token"] = (H + counts["attention"] + counts["router"] + counts["norms"]
                                         + counts["experts_activated"] + self.vocab_size * H)
        return counts

    # ---- conversion to and from Hugging Face config.json ----
    def to_hf_dict(self) -> dict:
        """A config.json dict in the released Qwen3-MoE format (loadable by transformers)."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 3 * self.moe_intermediate_size,  # dense MLP size, unused (no mlp_only_layers)
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": self.norm_topk_prob,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": 0.02,
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        """Validate a Hugging Face config dict and keep the fields the decoder uses."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "qwen3_moe":
            raise ConfigError(f"model_type is {model_type!r}; this package models only 'qwen3_moe' "
                              f"(Qwen3-30B-A3B, Qwen3-235B-A22B and checkpoints of the same architecture)")
        _reject_unsupported(d)
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "moe_intermediate_size", "num_experts_per_tok") if k not in d]
        if "head_dim" not in d:
            missing.append("head_dim")
        if "num_experts" not in d and "num_local_experts" not in d:
            missing.append("num_experts")
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}; Qwen3-MoE configs state these "
                              f"explicitly (head_dim is never derived from hidden_size here)")
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta") or d.get("rope_theta") or 10000.0  # HF's default
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=d["head_dim"], num_experts=d.get("num_experts", d.get("num_local_experts")),
            num_experts_per_tok=d["num_experts_per_tok"], moe_intermediate_size=d["moe_intermediate_size"],
            rope_theta=float(rope_theta), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos, name=name,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ModelConfig":
        """Read `<model_dir>/config.json`."""
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory needs config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=os.path.basename(os.path.normpath(model_dir)))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _reject_unsupported(d: dict) -> None:
    """Name every config feature that Qwen3-MoE does not use and this package does not model."""
    problems = []
    if d.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={d['mlp_only_layers']} (dense MLP layers; Qwen3-MoE has none)")
    if d.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={d['decoder_sparse_step']} (every layer must be MoE)")
    if d.get("shared_expert_intermediate_size") or d.get("n_shared_experts") or d.get("num_shared_experts"):
        problems.append("shared experts (a Qwen2-MoE / DeepSeek feature; Qwen3-MoE has none)")
    if d.get("use_sliding_window"):
        problems.append("use_sliding_window=true (Qwen3-MoE uses full attention)")
    if d.get("attention_bias"):
        problems.append("attention_bias=true (Qwen3-MoE projections have no bias)")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (the swiglu op is silu-gated)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ("default", None):
        problems.append(f"RoPE scaling {rope_type!r} (only plain rotate-half RoPE is implemented)")
    if problems:
        raise ConfigError("unsupported config: " + "; ".join(problems))


# ---- presets -----------------------------------------------------------------------------------
PRESETS: dict[str, ModelConfig] = {
    # Tests and the embedded default: divisible by TP 1/2/4/8, fewer KV heads than TP 4/8
    # (KV replication), N*D = 512 != H = 128, and shapes the NPU kernels accept (head_dim 64: the
    # RoPE kernel takes 64 or 128), so the default runs on an A3 as it is.
    "tiny": ModelConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                        moe_intermediate_size=64, max_position_embeddings=1024, name="tiny"),
    # CPU benchmarks: 128 experts, top-8, like the released models; a decode step is real work.
    "mini": ModelConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4, head_dim=64, num_experts=128, num_experts_per_tok=8,
                        moe_intermediate_size=256, max_position_embeddings=2048, name="mini"),
    # Overhead-bound CPU benchmark: Qwen3-30B-A3B's 48 layers, 128 experts and top-8, small matrices
    # (head_dim 64, the smallest the NPU's RoPE kernel takes); as on an NPU at batch 1, per-operator
    # dispatch dominates a decode step.
    "deep": ModelConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=48, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=64, num_experts=128, num_experts_per_tok=8,
                        moe_intermediate_size=64, max_position_embeddings=2048, name="deep"),
    # The released models (their config.json values; the book's chapter 0 lists them).
    "qwen3-30b-a3b": ModelConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                                 num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                 max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                                 name="qwen3-30b-a3b"),
    "qwen3-235b-a22b": ModelConfig(vocab_size=151936, hidden_size=4096, num_hidden_layers=94,
                                   num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                                   num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
                                   max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                                   name="qwen3-235b-a22b"),
}


def preset(name: str) -> ModelConfig:
    """A named preset; raises with the list of valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
