"""Tensor parallelism: layouts, shard arithmetic, per-rank reads, and the invariant for tp 1/2/4/8."""
import dataclasses
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from qwen3moe_tutorial import launch, parallel, tp as tp_py
from qwen3moe_tutorial.config import preset
from qwen3moe_tutorial.generate import ModelRunner, greedy_generate
from qwen3moe_tutorial.hf import HFRunner, load_hf_model
from qwen3moe_tutorial.parallel import TP, RankError
from qwen3moe_tutorial.steps import check_parallel, recipe_upto
from qwen3moe_tutorial.weights import Checkpoint

PROMPT = [286, 1005, 905, 934, 293, 344, 399, 258, 526, 13]


def job(path, upto, n, size, prompt=PROMPT):
    return launch.GenerationJob(path, prompt, n, upto=upto, tp=size, device_kind="cpu", dtype=torch.float32,
                                max_len=64)


@pytest.fixture(scope="module")
def hf_tokens(tiny_ckpt, other_ckpt):
    return {path: greedy_generate(HFRunner(load_hf_model(path)), PROMPT, 8).token_ids
            for path in (tiny_ckpt, other_ckpt)}


def test_head_plan_matches_the_recipe():
    a30 = preset("qwen3-30b-a3b")            # 32 heads, 4 KV heads
    plans = [tp_py.HeadPlan.of(a30, TP(r, 8)) for r in range(8)]
    assert [p.kv_heads for p in plans] == [(r // 2,) for r in range(8)]           # KV head r // 2
    assert plans[5].q_heads == (20, 21, 22, 23) and plans[5].replication == 2
    assert (plans[5].n_heads, plans[5].n_kv) == (4, 1)
    assert tp_py.HeadPlan.of(a30, TP(1, 4)) == tp_py.HeadPlan((8, 9, 10, 11, 12, 13, 14, 15), (1,), 1)
    b235 = preset("qwen3-235b-a22b")
    assert [tp_py.HeadPlan.of(b235, TP(r, 16)).kv_heads[0] for r in range(16)] == [r // 4 for r in range(16)]
    assert tp_py.HeadPlan.of(b235, TP(1, 2)).kv_heads == (2, 3)                   # Nkv_r = 2, no replication
    assert tp_py.HeadPlan.of(preset("tiny"), TP(0, 1)).kv_heads == (0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plans[0].replication = 1


@pytest.mark.parametrize("cfg_changes, size, words", [
    ({"num_attention_heads": 12, "num_key_value_heads": 4}, 8, "num_attention_heads (12) is not divisible"),
    ({}, 16, "num_attention_heads (8) is not divisible"),
    ({"num_key_value_heads": 4, "num_attention_heads": 12}, 3, "num_key_value_heads (4) is not divisible"),
    ({"vocab_size": 1020}, 8, "vocab_size (1020) is not divisible"),
    ({"moe_intermediate_size": 60}, 8, "moe_intermediate_size (60) is not divisible"),
])
def test_bad_parallel_configs_are_rejected(cfg_changes, size, words):
    cfg = preset("tiny").replace(**cfg_changes)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_parallel(recipe_upto("moe_tp_w13_swiglu"), cfg, size)


def test_tp_needs_a_tp_step():
    with pytest.raises(ValueError, match="starts at the attention_tp step"):
        check_parallel(recipe_upto("reference"), preset("tiny"), 2)


def shards(path, upto, size):
    ckpt = Checkpoint(path)
    return [recipe_upto(upto).parts.build(ckpt.config, TP(r, size), max_len=16).load(ckpt)
            for r in range(size)]


def test_merged_qkv_layout_round_trip(tiny_ckpt):
    """[q_r | k_r | v_r] of every rank computes exactly the unfused per-rank projections."""
    ref = shards(tiny_ckpt, "reference", 1)[0].layers[1].attn
    x = torch.randn(1, 3, 128)
    q, k, v = ref.project_qkv(x)                                  # [1, 3, N, D], [1, 3, Nkv, D] x 2
    for rank, model in enumerate(shards(tiny_ckpt, "merged_qkv", 4)):
        attn = model.layers[1].attn
        assert attn.qkv_proj.shape == ((2 + 2 * 1) * 64, 128)     # N_r = 2, Nkv_r = 1 (replicated), D = 64
        qr, kr, vr = attn.project_qkv(x)
        assert (attn.n_heads, attn.n_kv) == (attn.plan.n_heads, attn.plan.n_kv) == (2, 1)
        assert torch.allclose(qr, q[:, :, list(attn.plan.q_heads)], atol=1e-6)
        assert torch.allclose(kr, k[:, :, list(attn.plan.kv_heads)], atol=1e-6)
        assert torch.allclose(vr, v[:, :, list(attn.plan.kv_heads)], atol=1e-6)


def test_w13_layout_and_partial_sums(tiny_ckpt):
    """w13_r = [gate_r | up_r]; swiglu(x w13_r^T) w2_r^T summed over ranks is the full expert."""
    ref = shards(tiny_ckpt, "reference", 1)[0].layers[2].moe
    x = torch.randn(5, 128)
    ranks = [m.layers[2].moe for m in shards(tiny_ckpt, "moe_tp_w13_swiglu", 4)]
    for e in (0, 7, 15):
        gate_up = F.linear(x, ranks[1].w13[e])                   # [5, 2*I_r]
        assert torch.allclose(gate_up[:, :16], F.linear(x, ref.w_gate[e][16:32]), atol=1e-6)
        assert torch.allclose(gate_up[:, 16:], F.linear(x, ref.w_up[e][16:32]), atol=1e-6)
        total = sum(m.expert(x, e) for m in ranks)
        assert torch.allclose(total, ref.expert(x, e), atol=1e-5)


def expected_rank_bytes(cfg, size, dtype_bytes=2):
    """Independent count of what one rank must read: its shards plus the replicated tensors."""
    H, D, L, E = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers, cfg.num_experts
    n_r, n_kv_r = cfg.num_attention_heads // size, max(cfg.num_key_value_heads // size, 1)
    per_layer = (n_r * D * H * 2                                   # q rows, o columns
                 + 2 * n_kv_r * D * H                              # k, v rows (replicated when tp > Nkv)
                 + 2 * D + 2 * H + E * H                           # q/k norms, layer norms, router
                 + E * 3 * (cfg.moe_intermediate_size // size) * H)
    return dtype_bytes * (2 * cfg.vocab_size * H // size + H + L * per_layer)


def test_each_rank_reads_only_its_share(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    cfg, on_disk = ckpt.config, ckpt.total_bytes()
    for size in (1, 2, 4, 8):
        for r in range(size):
            c = Checkpoint(tiny_ckpt)
            recipe_upto("moe_tp_w13_swiglu").parts.build(cfg, TP(r, size), max_len=16).load(c)
            assert c.bytes_read == expected_rank_bytes(cfg, size)
        print(size, c.bytes_read / on_disk)
        assert c.bytes_read < on_disk / size * 1.25 + 0.05 * on_disk    # ~1/tp plus the replicated part


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_invariant_full_tp_ladder(size, tiny_ckpt, hf_tokens):
    n = 8 if size < 8 else 4
    tokens = launch.run(job(tiny_ckpt, "moe_tp_w13_swiglu", n, size))["token_ids"]
    assert tokens == hf_tokens[tiny_ckpt][:n]


@pytest.mark.parametrize("upto", ["attention_tp", "merged_qkv"])
def test_invariant_intermediate_steps(upto, tiny_ckpt, hf_tokens):
    for size in (2, 8):
        n = 6 if size == 2 else 3
        out = launch.run(job(tiny_ckpt, upto, n, size))
        assert out["token_ids"] == hf_tokens[tiny_ckpt][:n]


def test_invariant_other_architecture(other_ckpt, hf_tokens):
    """No GQA, tied embeddings, no top-k renormalisation, N*D != H."""
    for size in (2, 4):
        out = launch.run(job(other_ckpt, "moe_tp_w13_swiglu", 6, size))
        assert out["token_ids"] == hf_tokens[other_ckpt][:6]


def test_failing_rank_is_named_and_others_stop():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 2 failed: ValueError: injected failure on rank 2"):
        parallel.spawn(parallel.allreduce_selftest, 4, (2, None))
    with pytest.raises(RankError, match="rank 1 failed: process exited with code 13"):
        parallel.spawn(parallel.allreduce_selftest, 4, (None, 1))
    assert time.monotonic() - t0 < 60
    assert children_of(os.getpid()) == []                  # every worker was stopped and reaped


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                with open(f"/proc/{entry}/cmdline") as f:
                    if "resource_tracker" not in f.read():      # multiprocessing's own helper, not a rank
                        out.append(int(entry))
    return out


def test_missing_shard_on_a_rank_fails_cleanly(tmp_path, tiny_ckpt):
    """Slices of one file are read only by the ranks that need them: a broken file fails those ranks."""
    broken = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    os.remove(broken / "model-00003-of-00003.safetensors")
    with pytest.raises(Exception, match="model-00003-of-00003.safetensors"):
        launch.run(job(str(broken), "moe_tp_w13_swiglu", 2, 2))


def test_torchrun_path(tmp_path, tiny_ckpt, hf_tokens):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "r.json"
    p = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "qwen3moe_tutorial.final", "--model-path",
                        tiny_ckpt, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6", "--tp", "2",
                        "--upto", "moe_tp_w13_swiglu", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    import json
    result = json.load(open(out))
    assert result["token_ids"] == hf_tokens[tiny_ckpt][:6] and result["launcher"] == "torchrun"
    assert result["world_size"] == 2 and len(result["bytes_read_per_rank"]) == 2


def test_collective_timeout_and_cpu_pinning(monkeypatch):
    monkeypatch.delenv(parallel.TIMEOUT_ENV, raising=False)
    assert parallel.collective_timeout_s("npu") > parallel.collective_timeout_s("cpu") >= 300
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "42")
    assert parallel.collective_timeout_s("npu") == 42
    code = ("import os; from qwen3moe_tutorial.platform import pin_rank_cpus; "
            "allowed = sorted(os.sched_getaffinity(0)); n = len(allowed); "
            "mine = pin_rank_cpus(n - 1, n); assert mine == [allowed[-1]] == sorted(os.sched_getaffinity(0)), mine; "
            "assert pin_rank_cpus(0, n + 1) is None; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
