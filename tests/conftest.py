"""Shared fixtures: small real checkpoints written once per test session."""
import os

import pytest
import torch

from qwen3moe_tutorial.config import ModelConfig, preset
from qwen3moe_tutorial.weights import make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A second architecture: as many KV heads as heads (no GQA), N*D = 256 != H = 96, tied embeddings,
# no top-k renormalisation, single-file checkpoint.
OTHER = ModelConfig(vocab_size=1100, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=48, norm_topk_prob=False, tie_word_embeddings=True,
                    rope_theta=10000.0, max_position_embeddings=512, name="other")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), "tiny", seed=0)


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("other")), OTHER, seed=1, max_shard_size="100MB")


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return preset("tiny")
