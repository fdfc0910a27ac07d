"""What only an A3 node can show: the NPU path runs as the recipe runs it (issue 13).

- the matmul weights really are FRACTAL_NZ on the device (cast after the move, not before);
- the GE-compiled decode gives the eager NPU model's tokens, with one graph for a whole generation;
- torchair's compile cache is written by one process and loaded, without compiling, by the next;
- TP 2 over HCCL gives TP 1's tokens.
- the book's fit check reads a die's memory and refuses 30B on one die; HF and ours on different dies.
Skipped where torch_npu or an NPU is missing; run on the node with `pytest -m npu tests/test_npu_a3.py`
(after `python -m qwen3moe_tutorial.preflight`). They use the embedded default checkpoint in bfloat16.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from qwen3moe_tutorial.generate import greedy_generate
from qwen3moe_tutorial.platform import device_count, npu_available
from qwen3moe_tutorial.launch import build_runner
from qwen3moe_tutorial.steps import recipe_upto

pytestmark = [pytest.mark.npu,
              pytest.mark.skipif(not npu_available(), reason="needs torch_npu and an Ascend NPU")]

PROMPT = [286, 1005, 905, 934, 293, 344, 399, 258, 526, 13]
NZ, ND = 29, 2                                                   # ACL formats (torch_npu.get_npu_format)


def runner(ckpt, upto, **kw):
    return build_runner(recipe_upto(upto), ckpt, dtype=torch.bfloat16, device="npu:0", max_len=64, **kw)


def run_final(tmp_path, name, *args, timeout=1800):
    out = tmp_path / f"{name}.json"
    p = subprocess.run([sys.executable, "-m", "qwen3moe_tutorial.final", "--device", "npu", "--dtype", "bfloat16",
                        "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--max-seq-len", "64",
                        "--json", str(out), *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_matmul_weights_are_nz_and_the_rest_nd(tiny_ckpt):
    import torch_npu

    model = runner(tiny_ckpt, "fused_attention").model
    moe, attn = model.layers[0].moe, model.layers[0].attn
    for name, w in (("w13", moe.w13), ("w2", moe.w2), ("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                    ("lm_head", model.lm_head.weight)):
        assert w.device.type == "npu" and torch_npu.get_npu_format(w) == NZ, name
    for name, w in (("router", moe.router), ("embedding", model.embed.weight), ("norm", model.norm.weight)):
        assert torch_npu.get_npu_format(w) != NZ, name


def test_ge_graph_decode_gives_the_eager_tokens_with_one_graph(tiny_ckpt):
    eager = greedy_generate(runner(tiny_ckpt, "fused_attention"), PROMPT, 12, "npu", device="npu:0").token_ids
    torch._dynamo.utils.counters.clear()
    graph = greedy_generate(runner(tiny_ckpt, "graph_mode"), PROMPT, 12, "npu", device="npu:0")
    assert graph.token_ids == eager
    assert graph.compile_s > 0 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1   # lengths symbolic


def test_torchair_cache_is_written_then_loaded_by_the_next_process(tmp_path, tiny_ckpt):
    cache = tmp_path / "cache"
    args = ("--model-path", tiny_ckpt, "--upto", "compile_cache", "--tp", "1", "--compile-cache", str(cache))
    first, second = run_final(tmp_path, "first", *args), run_final(tmp_path, "second", *args)
    saved = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f == "compiled_module"]
    assert len(saved) == 1                                                    # torchair's own file
    assert first["compile_cache_hit"] is False and second["compile_cache_hit"] is True
    assert second["compile_s"] < first["compile_s"] and second["token_ids"] == first["token_ids"]


@pytest.mark.skipif(device_count("npu") < 2 if npu_available() else True, reason="needs 2 NPUs")
def test_tp2_over_hccl_gives_the_tp1_tokens(tmp_path, tiny_ckpt):
    one = run_final(tmp_path, "tp1", "--model-path", tiny_ckpt, "--upto", "aiv", "--tp", "1")
    two = run_final(tmp_path, "tp2", "--model-path", tiny_ckpt, "--upto", "aiv", "--tp", "2")
    assert two["token_ids"] == one["token_ids"] and two["devices"] == 2
    assert two["env"]["HCCL_CONNECT_TIMEOUT"] and two["env"]["TASK_QUEUE_ENABLE"]      # the launcher's settings


def test_book_reads_a_die_and_keeps_30b_off_one_die(monkeypatch):
    """The book's fit check on the node (issue 18): a die's memory as torch_npu reports it, bfloat16,
    Qwen3-30B-A3B refused at TP 1 and before the experts are split, accepted at TP 8 after."""
    from qwen3moe_tutorial import book, platform
    from qwen3moe_tutorial.config import preset

    monkeypatch.delenv(platform.DEVICE_MEMORY_ENV, raising=False)
    die = platform.device_memory_bytes("npu")
    assert die == torch.npu.mem_get_info()[1] and die > 32 * 2**30
    chapter = book.Chapter(quiet=True)
    assert chapter.device_kind == "npu" and chapter.dtype == torch.bfloat16
    q30 = preset("qwen3-30b-a3b")
    assert not book.check_fit(q30, 1, dtype=torch.bfloat16, device_kind="npu").fits
    assert not book.check_fit(q30, 8, dtype=torch.bfloat16, device_kind="npu", step="merged_qkv").fits
    if device_count("npu") >= 8:
        assert book.check_fit(q30, 8, dtype=torch.bfloat16, device_kind="npu").fits


@pytest.mark.skipif(device_count("npu") < 2 if npu_available() else True, reason="needs 2 NPUs")
def test_book_pair_puts_hf_and_ours_on_different_dies():
    from qwen3moe_tutorial import book

    chapter = book.Chapter("reference", quiet=True)
    ours, hf, path = chapter.pair("reference")
    assert ours.device != hf.device
    ids = chapter.prompt_ids(path)
    scale = hf.prefill(torch.tensor([ids], device=hf.device)).float().abs().max().item()
    assert book.max_logit_diff(ours, hf, ids, n_steps=4) < 0.05 * scale      # bf16: chapter 2's bound
