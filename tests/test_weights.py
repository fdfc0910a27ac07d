import json
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from qwen3moe_tutorial.config import ConfigError
from qwen3moe_tutorial.weights import (Checkpoint, CheckpointError, expected_shapes, generated_checkpoint,
                                       make_tiny_checkpoint, tensor_digest)


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
