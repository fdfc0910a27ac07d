"""Graph mode, compile cache and the aiv launcher step (chapters 09-11)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from qwen3moe_tutorial import compile as compile_py, parallel
from qwen3moe_tutorial.generate import greedy_generate
from qwen3moe_tutorial.hf import HFRunner, load_hf_model
from qwen3moe_tutorial.launch import GenerationJob, build_runner, launch_environment, launcher_env, run
from qwen3moe_tutorial.steps import recipe_upto

PROMPT = [286, 1005, 905, 934, 293, 344, 399, 258, 526, 13]


@pytest.fixture(scope="module")
def hf_tokens(tiny_ckpt):
    return greedy_generate(HFRunner(load_hf_model(tiny_ckpt)), PROMPT, 12).token_ids


def test_graph_mode_single_graph_same_tokens(tiny_ckpt, hf_tokens):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = build_runner(recipe_upto("graph_mode"), tiny_ckpt, max_len=64)
    gen = greedy_generate(runner, PROMPT, 12)
    assert gen.token_ids == hf_tokens
    assert gen.compile_s > 0 and gen.first_decode_ms >= 1e3 * gen.compile_s * 0.99
    assert not torch._dynamo.utils.counters["graph_break"]                   # fullgraph: one graph
    assert sum(torch._dynamo.utils.counters["stats"].get(k, 0) for k in ("unique_graphs",)) == 1
    again = greedy_generate(runner, PROMPT, 12)                               # no recompile on reuse
    assert again.token_ids == hf_tokens and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # torchair's cache watcher saves a graph only if dynamo recorded the compiled method's own code:
    # no decorator (such as @torch.no_grad()) may wrap the decode method graph mode compiles
    recorded = set(torch._dynamo.utils.orig_code_map.values.values())
    decode = type(runner.model).decode
    assert decode.__code__ in recorded and not hasattr(decode, "__wrapped__")


def test_decorated_decode_would_hide_its_code_from_torchairs_watcher(tiny_ckpt):
    """The failure the test above guards against: compiled through torch.no_grad()'s wrapper, the
    code dynamo records is not the method's own, so torchair would save nothing."""
    runner = build_runner(recipe_upto("fused_attention"), tiny_ckpt, max_len=64)
    runner.prefill(torch.tensor([PROMPT]))
    plain = type(runner.model).decode
    wrapped = torch.no_grad()(plain).__get__(runner.model)
    torch._dynamo.reset()
    torch.compile(wrapped, backend="eager", dynamic=True, fullgraph=True)(
        torch.tensor([[1]]), torch.tensor([len(PROMPT)]), len(PROMPT) + 1)
    assert wrapped.__code__ not in set(torch._dynamo.utils.orig_code_map.values.values())


def test_graph_mode_with_collectives_in_the_graph(tiny_ckpt, hf_tokens):
    out = run(GenerationJob(tiny_ckpt, PROMPT, 5, upto="graph_mode", tp=2, max_len=64))
    assert out["token_ids"] == hf_tokens[:5] and out["compile_s"] > 0


def run_final(*args):
    p = subprocess.run([sys.executable, "-m", "qwen3moe_tutorial.final", *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_compile_cache_across_processes(tmp_path, tiny_ckpt, other_ckpt, hf_tokens):
    cache = tmp_path / "cache"
    common = ["--upto", "compile_cache", "--compile-cache", str(cache), "--prompt-ids", ",".join(map(str, PROMPT)),
              "--max-new-tokens", "12", "--max-seq-len", "64", "--tp", "1"]
    results = []
    for i in range(2):
        run_final("--model-path", tiny_ckpt, *common, "--json", str(tmp_path / f"r{i}.json"))
        results.append(json.load(open(tmp_path / f"r{i}.json")))
    first, second = results
    assert first["token_ids"] == second["token_ids"] == hf_tokens
    assert first["compile_cache_hit"] is False and second["compile_cache_hit"] is True
    assert second["compile_s"] < first["compile_s"]
    keys = os.listdir(cache)
    assert len(keys) == 1 and os.path.isfile(cache / keys[0] / "rank0" / "manifest.json")
    # another config: a new key, never the old graph
    run_final("--model-path", other_ckpt, *common, "--json", str(tmp_path / "other.json"))
    other = json.load(open(tmp_path / "other.json"))
    assert other["compile_cache_hit"] is False and len(os.listdir(cache)) == 2
    ref = greedy_generate(HFRunner(load_hf_model(other_ckpt)), PROMPT, 12).token_ids
    assert other["token_ids"] == ref


def test_cache_key_covers_what_changes_the_graph(tmp_path, tiny_ckpt, other_ckpt, monkeypatch):
    def key(path, upto="compile_cache", dtype=torch.float32, max_len=64):
        runner = build_runner(recipe_upto(upto), path, dtype=dtype, max_len=max_len)
        runner.model.allocate_cache(1)
        return compile_py.cache_key(runner.model, recipe_upto(upto).steps, "cpu")[0]

    base = key(tiny_ckpt)
    assert key(tiny_ckpt) == base
    assert key(other_ckpt) != base
    assert key(tiny_ckpt, dtype=torch.bfloat16) != base
    assert key(tiny_ckpt, max_len=32) != base
    assert key(tiny_ckpt, upto="aiv") != base
    # a source edit changes the digest, hence the key
    copy = shutil.copytree(compile_py.PACKAGE_DIR, tmp_path / "pkg", ignore=shutil.ignore_patterns("__pycache__"))
    assert compile_py.source_digest(str(copy)) == compile_py.source_digest()
    edited_copy = shutil.copytree(copy, tmp_path / "edited")
    with open(edited_copy / "model.py", "a") as f:
        f.write("\n# an edit\n")
    edited = compile_py.source_digest(str(edited_copy))
    assert edited != compile_py.source_digest()
    monkeypatch.setattr(compile_py, "source_digest", lambda root=None: edited)
    assert key(tiny_ckpt) != base


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, tiny_ckpt, hf_tokens):
    cache = tmp_path / "cache"
    args = ["--model-path", tiny_ckpt, "--upto", "compile_cache", "--compile-cache", str(cache), "--tp", "1",
            "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--max-seq-len", "64"]
    run_final(*args, "--json", str(tmp_path / "a.json"))                    # a fresh process writes the cache
    victim = next(os.path.join(d, f) for d, _, fs in sorted(os.walk(cache)) for f in sorted(fs)
                  if f.endswith((".py", ".so", ".cpp")))
    with open(victim, "a") as f:
        f.write("garbage")
    p = run_final(*args, "--json", str(tmp_path / "b.json"))
    rebuilt = json.load(open(tmp_path / "b.json"))
    assert "unusable" in p.stderr and "rebuilding" in p.stderr
    assert rebuilt["compile_cache_hit"] is False and rebuilt["token_ids"] == hf_tokens
    run_final(*args, "--json", str(tmp_path / "c.json"))                    # and the rebuilt cache is reused
    assert json.load(open(tmp_path / "c.json"))["compile_cache_hit"] is True


def test_aiv_sets_the_launcher_environment(monkeypatch):
    for name in ("HCCL_OP_EXPANSION_MODE", *compile_py.platform.NPU_LAUNCH_ENV):
        monkeypatch.delenv(name, raising=False)
    assert launcher_env(recipe_upto("aiv")) == {"HCCL_OP_EXPANSION_MODE": "AIV"}
    assert launcher_env(recipe_upto("compile_cache")) == {}
    on_npu = launcher_env(recipe_upto("aiv"), "npu")                          # the recipe's launcher settings
    assert on_npu == {"HCCL_CONNECT_TIMEOUT": "1200", "HCCL_EXEC_TIMEOUT": "1200", "TASK_QUEUE_ENABLE": "2",
                      "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "HCCL_OP_EXPANSION_MODE": "AIV"}
    monkeypatch.setenv("HCCL_OP_EXPANSION_MODE", "AI_CPU")                   # the user's choice wins
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "1800")
    assert launcher_env(recipe_upto("aiv")) == {"HCCL_OP_EXPANSION_MODE": "AI_CPU"}
    assert launcher_env(recipe_upto("aiv"), "npu")["HCCL_CONNECT_TIMEOUT"] == "1800"


def test_the_launch_path_sets_the_recipes_environment_for_every_rank_and_takes_it_back(tiny_ckpt, tmp_path,
                                                                                       monkeypatch):
    """launch.run is the one launch path: every rank of an aiv job sees HCCL_OP_EXPANSION_MODE=AIV
    (spawned ranks inherit it; under torchrun it is set before the process group), and the caller's
    environment is as it was afterwards."""
    monkeypatch.delenv("HCCL_OP_EXPANSION_MODE", raising=False)
    out = run(GenerationJob(tiny_ckpt, PROMPT, 2, upto="aiv", tp=2, max_len=64, compile_cache=str(tmp_path)))
    assert out["env"]["HCCL_OP_EXPANSION_MODE"] == "AIV"
    assert "HCCL_OP_EXPANSION_MODE" not in os.environ
    before = run(GenerationJob(tiny_ckpt, PROMPT, 2, upto="compile_cache", tp=1, max_len=64,
                               compile_cache=str(tmp_path)))
    assert "HCCL_OP_EXPANSION_MODE" not in before["env"]
    with launch_environment(recipe_upto("aiv")) as added:
        assert added == {"HCCL_OP_EXPANSION_MODE": "AIV"} and os.environ["HCCL_OP_EXPANSION_MODE"] == "AIV"
    assert "HCCL_OP_EXPANSION_MODE" not in os.environ


def test_allreduce_benchmark_runs_on_gloo():
    out = parallel.spawn(parallel.allreduce_benchmark, 2, ([256, 4096], 3, 1))
    assert out["world_size"] == 2 and out["sizes_bytes"] == [256, 4096]
    assert all(t > 0 for t in out["median_us"])


def test_compiled_cache_write_touches_only_the_new_rows():
    """scatter_update_ under compile writes the new rows into the cache in place: no copy of the
    whole cache per step (inductor's code for a scatter_ copied it out, updated and copied it back)."""
    from torch._inductor.utils import run_and_get_code

    from qwen3moe_tutorial.ops import reference

    def write(cache, pos, new):
        reference.scatter_update_(cache, pos, new, -2)
        return new * 2

    cache = torch.randn(1, 97, 40)                                           # 3880 values, an odd size
    want = cache.clone()
    want[0, 13] = torch.arange(40.0)
    new = torch.arange(40.0).view(1, 1, 40)
    torch._dynamo.reset()
    _, (code, *_) = run_and_get_code(torch.compile(write, fullgraph=True), cache, torch.tensor([13]), new)
    assert torch.equal(cache, want)                                          # written in place, one row
    loop_bounds = set(re.findall(r"<\s*static_cast<int64_t>\((\d+)L\)", code))
    assert loop_bounds and not loop_bounds & {"3880", "97"}, loop_bounds   # no loop over the whole cache


def test_cached_graph_skips_guards_only_while_it_is_the_only_graph(tmp_path, tiny_ckpt, hf_tokens, monkeypatch):
    skipped = []
    real = torch.compiler.set_stance

    def spy(*args, **kwargs):
        skipped.append(kwargs.get("skip_guard_eval_unsafe", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", spy)
    a = build_runner(recipe_upto("compile_cache"), tiny_ckpt, max_len=64, compile_cache=str(tmp_path))
    assert greedy_generate(a, PROMPT, 12).token_ids == hf_tokens
    assert skipped == [True] * 10                         # decode steps 2-11 ran the graph without guards
    with pytest.raises(ValueError, match="differ from"):  # what the guards would have caught: a new batch size
        a.decode(torch.tensor([[1], [2]]), 20)
    b = build_runner(recipe_upto("graph_mode"), tiny_ckpt, max_len=64)
    assert greedy_generate(b, PROMPT, 12).token_ids == hf_tokens
    skipped.clear()
    assert greedy_generate(a, PROMPT, 12).token_ids == hf_tokens   # two graphs now: guards choose
    assert skipped == []


def test_npu_manifest_vouches_for_torchairs_compiled_module_only(tmp_path):
    """On an NPU the manifest covers torchair's compiled_module files; GE's own cache beside them may
    change when GE loads a graph, and must not make a good cache look corrupt. Elsewhere: every file."""
    torchair_dir = tmp_path / "torchair" / "Qwen3MoeModel_dynamic_gecache_0123" / "decode"
    torchair_dir.mkdir(parents=True)
    (torchair_dir / "compiled_module").write_bytes(b"graph")
    (torchair_dir.parent / "ge_cache.idx").write_bytes(b"ge index")
    runner = compile_py.CachedGraphRunner.__new__(compile_py.CachedGraphRunner)
    runner.cache_dir = str(tmp_path)
    runner.device_kind = "npu"
    assert list(runner._checked_files()) == [os.path.join("torchair", "Qwen3MoeModel_dynamic_gecache_0123", "decode",
                                                          "compiled_module")]
    assert os.path.isfile(os.path.join(str(tmp_path), *runner._checked_files()))        # torchair's own file
    runner.device_kind = "cpu"
    assert len(runner._checked_files()) == 2


def test_two_processes_started_at_once_share_one_cache(tmp_path, tiny_ckpt, hf_tokens):
    """Same key, same cache directory, started together: both give HF's tokens, and the cache they
    leave is valid (the next process loads it without a warning)."""
    cache = tmp_path / "cache"
    args = ["--model-path", tiny_ckpt, "--upto", "compile_cache", "--compile-cache", str(cache), "--tp", "1",
            "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "12", "--max-seq-len", "64"]
    procs = [subprocess.Popen([sys.executable, "-m", "qwen3moe_tutorial.final", *args, "--json", str(tmp_path / f"{i}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    runs = [json.load(open(tmp_path / f"{i}.json")) for i in range(2)]
    assert all(r["token_ids"] == hf_tokens for r in runs)
    assert sorted(r["compile_cache_hit"] for r in runs) == [False, True]     # one compiled, the other waited
    assert not any("unusable" in err for _, err in outs)
    third = run_final(*args, "--json", str(tmp_path / "third.json"))
    assert "unusable" not in third.stderr and json.load(open(tmp_path / "third.json"))["compile_cache_hit"] is True
