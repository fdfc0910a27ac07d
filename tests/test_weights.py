import json
import os
import re
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from qwen3moe_tutorial import weights
from qwen3moe_tutorial.config import ConfigError, ModelConfig, preset
from qwen3moe_tutorial.weights import (MANIFEST, SHIPPED_DIR, Checkpoint, CheckpointError, default_checkpoint,
                                       expected_shapes, generated_checkpoint, make_tiny_checkpoint, read_manifest,
                                       tensor_digest, verify_manifest)


def test_checkpoint_is_real_hf_format(tiny_ckpt, tiny_config):
    files = set(os.listdir(tiny_ckpt))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"} <= files
    ckpt = Checkpoint(tiny_ckpt)
    assert len({f for f in ckpt.weight_map.values()}) > 1           # sharded
    assert "model.layers.3.mlp.experts.15.down_proj.weight" in ckpt.keys()   # per-expert keys
    assert set(ckpt.keys()) == set(expected_shapes(tiny_config))
    ckpt.validate()
    config = json.load(open(os.path.join(tiny_ckpt, "config.json")))
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == 16 and config["head_dim"] == 64


def test_tokenizer_loads_with_autotokenizer(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = tok("The expert loop is slow. Ünïcode ✓")["input_ids"]
    assert tok.decode(ids) == "The expert loop is slow. Ünïcode ✓"
    assert tok.convert_tokens_to_ids("<|im_start|>") > tok.convert_tokens_to_ids("<|endoftext|>") > 900
    assert len(tok) <= 1024


def test_deterministic(tmp_path, tiny_ckpt):
    again = make_tiny_checkpoint(str(tmp_path / "again"), "tiny", seed=0)
    assert tensor_digest(Checkpoint(again)) == tensor_digest(Checkpoint(tiny_ckpt))
    other_seed = make_tiny_checkpoint(str(tmp_path / "seed1"), "tiny", seed=1)
    assert tensor_digest(Checkpoint(other_seed)) != tensor_digest(Checkpoint(tiny_ckpt))


def test_generated_checkpoint_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWEN3MOE_TUTORIAL_CACHE", str(tmp_path))
    path = generated_checkpoint("tiny", 0)
    assert path.startswith(str(tmp_path)) and "Creating" in capsys.readouterr().err
    assert generated_checkpoint("tiny", 0) == path and capsys.readouterr().err == ""   # second call: no work
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []               # no temp dirs left


def test_get_slice_reads_only_the_slice(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    full = ckpt.get("model.layers.0.self_attn.q_proj.weight")                 # [512, 128] bf16
    before = ckpt.bytes_read
    rows = ckpt.get_slice("model.layers.0.self_attn.q_proj.weight", 0, 64, 128)
    cols = ckpt.get_slice("model.layers.0.self_attn.o_proj.weight", 1, 32, 64)
    assert torch.equal(rows, full[64:128])
    assert cols.shape == (128, 32)
    assert ckpt.bytes_read - before == (64 * 128 + 128 * 32) * 2
    with pytest.raises(CheckpointError, match="outside"):
        ckpt.get_slice("model.layers.0.self_attn.q_proj.weight", 0, 400, 600)


def copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_directory_and_files(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(str(tmp_path / "nowhere"))
    d = copy(tiny_ckpt, tmp_path / "noshard")
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing"):
        Checkpoint(d)
    d = copy(tiny_ckpt, tmp_path / "noweights")
    for f in os.listdir(d):
        if "safetensors" in f:
            os.remove(os.path.join(d, f))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        Checkpoint(d)


def test_missing_key_and_wrong_shape(tmp_path, tiny_ckpt):
    d = copy(tiny_ckpt, tmp_path / "mismatch")
    cfg = json.load(open(os.path.join(d, "config.json")))
    json.dump({**cfg, "num_hidden_layers": 5}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="missing model.layers.4"):
        Checkpoint(d).validate()
    json.dump({**cfg, "moe_intermediate_size": 32}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight: checkpoint \[64, 128\], config implies \[32, 128\]"):
        Checkpoint(d).validate()
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.9"):
        Checkpoint(d).get("model.layers.9.mlp.gate.weight")


def test_corrupt_safetensors(tmp_path, tiny_ckpt):
    d = copy(tiny_ckpt, tmp_path / "corrupt")
    path = os.path.join(d, "model-00001-of-00003.safetensors")
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)                                                  # clobber the header
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        Checkpoint(d).validate()
    d = copy(tiny_ckpt, tmp_path / "badindex")
    open(os.path.join(d, "model.safetensors.index.json"), "w").write("{")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Checkpoint(d)


def test_single_file_checkpoint_and_tied_embeddings(other_ckpt):
    ckpt = Checkpoint(other_ckpt)
    assert set(ckpt.weight_map.values()) == {"model.safetensors"}
    assert "lm_head.weight" not in expected_shapes(ckpt.config)
    ckpt.validate()


def test_vocab_smaller_than_tokenizer_is_rejected(tmp_path, tiny_config):
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        make_tiny_checkpoint(str(tmp_path / "x"), tiny_config.replace(vocab_size=200))


# ---- the shipped, trained default ----------------------------------------------------------------
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "tie_word_embeddings", "max_position_embeddings", "rope_theta")


def test_shipped_checkpoint_is_the_tiny_preset_in_hf_format():
    cfg = ModelConfig.from_pretrained(SHIPPED_DIR)
    tiny = preset("tiny")
    assert {f: getattr(cfg, f) for f in SHAPE_FIELDS} == {f: getattr(tiny, f) for f in SHAPE_FIELDS}
    ckpt = Checkpoint(SHIPPED_DIR, tiny)
    assert set(ckpt.keys()) == set(expected_shapes(tiny))           # per-expert keys, nothing else
    ckpt.validate()
    assert {ckpt.get(name).dtype for name in ckpt.keys()} == {torch.bfloat16}
    config = json.load(open(os.path.join(SHIPPED_DIR, "config.json")))
    tok = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert config["torch_dtype"] == "bfloat16" and config["bos_token_id"] == config["eos_token_id"] == eos
    assert len(tok) <= tiny.vocab_size
    sums = read_manifest(SHIPPED_DIR)
    assert set(sums) == set(os.listdir(SHIPPED_DIR)) - {MANIFEST}
    assert sum(os.path.getsize(os.path.join(SHIPPED_DIR, f)) for f in sums) < 12e6
    verify_manifest(SHIPPED_DIR)


def test_sha256_mismatch_is_one_clear_error(tmp_path):
    d = copy(SHIPPED_DIR, tmp_path / "shipped")
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]
    with open(os.path.join(d, shard), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(d, shard)) - 8)
        f.write(b"\x00" * 8)                                            # a weight, not the header
    with pytest.raises(CheckpointError, match=f"{shard} has sha256 .*corrupt or was changed") as e:
        verify_manifest(d)
    assert len(str(e.value).splitlines()) == 1
    shutil.copyfile(os.path.join(SHIPPED_DIR, shard), os.path.join(d, shard))
    verify_manifest(d)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        verify_manifest(d)
    open(os.path.join(d, MANIFEST), "w").write("not a sum\n")
    with pytest.raises(CheckpointError, match="is not a SHA256SUMS file"):
        verify_manifest(d)


def test_default_checkpoint_copies_the_shipped_one_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QWEN3MOE_TUTORIAL_CACHE", str(tmp_path))
    path = default_checkpoint()
    assert os.path.dirname(path) == str(tmp_path) and "Copying" in capsys.readouterr().err
    assert os.path.basename(path).startswith(f"tiny-trained-v{weights.DEFAULT_FORMAT}-")
    assert sorted(os.listdir(path)) == sorted(os.listdir(SHIPPED_DIR))
    assert tensor_digest(Checkpoint(path)) == tensor_digest(Checkpoint(SHIPPED_DIR))
    assert default_checkpoint() == path and capsys.readouterr().err == ""          # second call: no copy
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []          # no temp dirs left
    with open(os.path.join(path, "config.json"), "a") as f:                     # the cached copy changed
        f.write(" ")
    again = f"config.json has sha256 .* \\(delete {re.escape(path)} to copy it again\\)"
    with pytest.raises(CheckpointError, match=again):
        default_checkpoint()


def test_a_corrupt_shipped_checkpoint_is_not_copied(tmp_path, monkeypatch):
    shipped = copy(SHIPPED_DIR, tmp_path / "shipped")
    with open(os.path.join(shipped, "generation_config.json"), "a") as f:
        f.write(" ")
    monkeypatch.setattr(weights, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("QWEN3MOE_TUTORIAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="generation_config.json has sha256"):
        default_checkpoint(quiet=True)
    assert not os.path.isdir(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []
