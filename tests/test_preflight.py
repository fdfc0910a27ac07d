"""The preflight command on a CPU: rows, skips, bad input, bytes per rank against a real load, and the
logic of the NPU-only checks run with injected providers and devices."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from qwen3moe_tutorial import ops, preflight
from qwen3moe_tutorial.config import preset
from qwen3moe_tutorial.ops import reference
from qwen3moe_tutorial.parallel import TP
from qwen3moe_tutorial.steps import recipe_upto
from qwen3moe_tutorial.weights import Checkpoint

ROW_NAMES = ["version torch", "version torch_npu", "version CANN", "devices", "memory per rank", "launcher env",
             "fused ops", "all-reduce", "torchair cache"]
NPU_ROWS = ["version torch_npu", "version CANN", "devices", "fused ops", "all-reduce", "torchair cache"]


def parse_table(text: str) -> dict[str, tuple[str, str]]:
    """{check: (status, detail)} from the printed table, wrapped cells joined again."""
    lines = text.rstrip("\n").splitlines()
    s0, d0 = lines[0].index("status"), lines[0].index("detail")
    rows, name = {}, None
    for line in lines[1:]:
        if not line[:s0].isspace():
            name = line[:s0].strip()
            rows[name] = ("", "")
        status, detail = rows[name]
        rows[name] = (f"{status} {line[s0:d0].strip()}".strip(), f"{detail} {line[d0:].strip()}".strip())
    return rows


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """`python -m qwen3moe_tutorial.preflight` with no arguments, once (default checkpoint in a temp cache)."""
    env = {k: v for k, v in os.environ.items() if k != "HCCL_CONNECT_TIMEOUT"}
    env["QWEN3MOE_TUTORIAL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return subprocess.run([sys.executable, "-m", "qwen3moe_tutorial.preflight"], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture
def node(tiny_ckpt, monkeypatch):
    monkeypatch.delenv("HCCL_CONNECT_TIMEOUT", raising=False)
    return preflight.prepare(preflight.parse_args(["--model-path", tiny_ckpt]))


def test_cpu_run_passes_and_prints_every_row(cpu_run):
    assert cpu_run.returncode == 0, cpu_run.stderr
    assert "Traceback" not in cpu_run.stderr
    rows = parse_table(cpu_run.stdout)
    assert list(rows) == ROW_NAMES


def test_cpu_run_skips_the_npu_rows_with_a_reason(cpu_run):
    rows = parse_table(cpu_run.stdout)
    for name in NPU_ROWS:
        status = rows[name][0]
        assert status.startswith("skipped: ") and len(status) > len("skipped: ") + 5, (name, status)
    assert "not installed" in rows["version torch_npu"][0]
    assert "tests/test_compile.py" in rows["torchair cache"][0]


def test_cpu_run_checks_what_a_cpu_can(cpu_run):
    rows = parse_table(cpu_run.stdout)
    assert rows["version torch"] == ("ok", f"{torch.__version__} (pin 2.13.0)")
    status, detail = rows["memory per rank"]
    assert status == "ok" and "KV cache" in detail and "512 positions, float32" in detail
    assert "no HBM here" in detail
    assert rows["launcher env"][0] == "ok" and "HCCL_OP_EXPANSION_MODE=AIV" in rows["launcher env"][1]


def one_line_error(capsys, argv, *words):
    assert preflight.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_missing_model_path_is_one_error_line(tmp_path, capsys):
    one_line_error(capsys, ["--model-path", str(tmp_path / "missing")], "does not exist", "checkpoint directory")


def test_tp_that_cannot_split_the_heads_is_one_error_line(tiny_ckpt, capsys):
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--tp", "3"],
                   "num_attention_heads (8) is not divisible", "one of 1, 2, 4, 8")


def test_max_seq_len_beyond_the_model_is_one_error_line(tiny_ckpt, capsys):
    limit = preset("tiny").max_position_embeddings
    one_line_error(capsys, ["--model-path", tiny_ckpt, "--max-seq-len", str(limit + 1)], "max_position_embeddings")


def test_short_hccl_connect_timeout_fails(tiny_ckpt, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "60")
    assert preflight.main(["--model-path", tiny_ckpt, "--tp", "2", "--json", str(tmp_path / "r.json")]) == 1
    rows = parse_table(capsys.readouterr().out)
    assert rows["launcher env"][0].startswith("FAIL: HCCL_CONNECT_TIMEOUT=60 is below 600 s")
    record = json.load(open(tmp_path / "r.json"))
    assert record["ok"] is False and record["tp"] == 2 and record["versions"]["torch"] == torch.__version__
    assert [r["name"] for r in record["rows"]] == ROW_NAMES
    memory = record["rows"][ROW_NAMES.index("memory per rank")]
    assert memory["status"] == "ok" and len(memory["numbers"]["bytes_per_rank"]) == 2


def loaded_bytes(ckpt: Checkpoint, rank: int, size: int, dtype: torch.dtype, max_len: int) -> int:
    """What one rank really holds after loading the full recipe: parameters plus its KV cache."""
    model = recipe_upto("aiv").parts.build(ckpt.config, TP(rank, size), max_len=max_len, dtype=dtype).load(ckpt)
    cache = model.allocate_cache()
    return (sum(p.numel() * p.element_size() for p in model.parameters())
            + sum(t.numel() * t.element_size() for t in cache.k + cache.v))


@pytest.mark.parametrize("ckpt_name, size, dtype", [
    ("tiny_ckpt", 1, torch.float32), ("tiny_ckpt", 2, torch.bfloat16), ("tiny_ckpt", 2, torch.float32),
    ("tiny_ckpt", 4, torch.bfloat16),          # tp 4 > 2 KV heads: replicated
    ("other_ckpt", 2, torch.bfloat16),         # tied embeddings, no GQA
])
def test_bytes_per_rank_equals_the_real_load(request, ckpt_name, size, dtype):
    ckpt = Checkpoint(request.getfixturevalue(ckpt_name))
    predicted = preflight.bytes_per_rank(ckpt, size, dtype, 48)
    assert predicted == [loaded_bytes(ckpt, rank, size, dtype, 48) for rank in range(size)]


def test_memory_row_fails_when_a_rank_does_not_fit(node):
    need = max(preflight.bytes_per_rank(node.ckpt, 1, node.dtype, node.max_seq_len))
    assert preflight.check_memory(dataclasses.replace(node, hbm=[(int(need * 1.2), 64 << 30)])).status == "ok"
    row = preflight.check_memory(dataclasses.replace(node, hbm=[(int(need * 1.05), 64 << 30)]))
    assert row.status == "FAIL" and "larger --tp" in row.why


def test_devices_row_fails_when_tp_exceeds_the_devices(node):
    row = preflight.check_devices(dataclasses.replace(node, device_kind="npu", tp=2, hbm=[(60 << 30, 64 << 30)]))
    assert row.status == "FAIL" and "torchrun" in row.why and "smaller --tp" in row.why


def test_every_fused_op_has_a_case():
    assert set(preflight.op_calls(preflight.op_shapes(preset("tiny"), 2, 64))) == set(ops.OP_NAMES)


def test_fused_op_check_reference_against_reference_is_exact():
    results = preflight.fused_op_results(preflight.op_shapes(preset("tiny"), 2, 64), "cpu", reference)
    assert all(r["ok"] and r["max_abs_err"] == 0 for r in results.values()), results
    assert preflight.fused_ops_row(results).status == "ok"


class WrongKernels:
    """The reference, except for one op that is off by 10% and one that raises."""

    def __getattr__(self, name):
        return getattr(reference, name)

    @staticmethod
    def npu_swiglu(x, dim=-1):
        return reference.npu_swiglu(x, dim) * 1.1

    @staticmethod
    def npu_format_cast(x, acl_format):
        raise RuntimeError("format 29 not supported")


def test_fused_op_check_flags_a_wrong_op():
    results = preflight.fused_op_results(preflight.op_shapes(preset("tiny"), 2, 64), "cpu", WrongKernels())
    assert [n for n, r in results.items() if not r["ok"]] == ["npu_swiglu", "npu_format_cast"]
    assert results["npu_swiglu"]["max_abs_err"] > 0
    row = preflight.fused_ops_row(results)
    assert row.status == "FAIL" and row.shown().startswith("FAIL: npu_swiglu (")
    assert "format 29 not supported" in row.why and "12/14" in row.detail


def test_versions_fail_on_a_pin_that_differs(node, tmp_path):
    pins = tmp_path / "requirements-npu.txt"
    pins.write_text("# test pins\ntorch==0.0.1\ntorch-npu==2.13.0\n")
    rows = preflight.check_versions(dataclasses.replace(node, requirements=str(pins)))
    assert rows[0].name == "version torch" and rows[0].status == "FAIL"
    assert "pins 0.0.1" in rows[0].why and "pip install -r requirements-npu.txt" in rows[0].why
    pins.write_text("torch==2.13.0\n")
    assert preflight.check_versions(dataclasses.replace(node, requirements=str(pins)))[0].status == "ok"
    missing = preflight.check_versions(dataclasses.replace(node, requirements=str(tmp_path / "none.txt")))
    assert [r.status for r in missing] == ["skipped"] * 3


def test_torchair_verdict(tmp_path):
    (tmp_path / "key" / "rank0").mkdir(parents=True)
    first = {"compile_cache_hit": False, "compile_s": 40.0, "token_ids": [5, 6, 7, 8]}
    second = {"compile_cache_hit": True, "compile_s": 2.0, "token_ids": [5, 6, 7, 8]}
    row = preflight.torchair_row(first, second, str(tmp_path))
    assert row.status == "FAIL" and "no compiled_module" in row.why
    (tmp_path / "key" / "rank0" / "compiled_module").write_bytes(b"x")
    assert preflight.torchair_row(first, second, str(tmp_path)).status == "ok"
    row = preflight.torchair_row(first, {**second, "compile_cache_hit": False, "token_ids": [5]}, str(tmp_path))
    assert row.status == "FAIL" and "did not load the cache" in row.why and "different tokens" in row.why
