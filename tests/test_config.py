import json

import pytest
from transformers import Qwen3MoeConfig

from qwen3moe_tutorial.config import PRESETS, ConfigError, ModelConfig, preset


def hf_dict(**changes):
    d = preset("tiny").to_hf_dict()
    d.update(changes)
    return d


def test_released_presets_match_design():
    a, b = preset("qwen3-30b-a3b"), preset("qwen3-235b-a22b")
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads, a.head_dim) == \
        (2048, 48, 32, 4, 128)
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.num_key_value_heads, b.head_dim) == \
        (4096, 94, 64, 4, 128)
    for c, inter in ((a, 768), (b, 1536)):
        assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 8, inter)
        assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.norm_topk_prob) == (151936, 1e6, 1e-6, True)
        assert not c.tie_word_embeddings
        assert c.q_size != c.hidden_size            # head_dim is not hidden / heads


def test_round_trip_through_hf_config_json(tmp_path):
    for name, cfg in PRESETS.items():
        d = cfg.to_hf_dict()
        assert ModelConfig.from_hf_dict(d, name=name) == cfg
        hf = Qwen3MoeConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
        assert hf.head_dim == cfg.head_dim and hf.num_experts == cfg.num_experts
        # transformers 5 writes num_local_experts and rope_parameters; we read that form too
        hf.save_pretrained(tmp_path / name)
        assert ModelConfig.from_pretrained(str(tmp_path / name)).replace(name=name) == cfg


@pytest.mark.parametrize("changes, words", [
    ({"mlp_only_layers": [0, 2]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"shared_expert_intermediate_size": 256}, "shared experts"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"model_type": "qwen2_moe"}, "qwen3_moe"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"num_experts_per_tok": 17}, "exceeds num_experts"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
])
def test_unsupported_or_invalid_configs_are_rejected_by_name(changes, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_hf_dict(hf_dict(**changes))


def test_head_dim_is_never_derived():
    d = hf_dict()
    del d["head_dim"]
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig.from_hf_dict(d)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_dict(mlp_only_layers=[1])))
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="tiny, mini"):
        preset("huge")


def test_param_counts_count_only_activated_experts():
    c = preset("qwen3-235b-a22b").param_counts()
    assert 234e9 < c["total"] < 236e9                      # "235B"
    assert 21e9 < c["activated_per_token"] < 23e9          # "A22B"
    c30 = preset("qwen3-30b-a3b").param_counts()
    assert 30e9 < c30["total"] < 31.5e9 and 3e9 < c30["activated_per_token"] < 3.4e9
