"""The benchmark: its target checks (issue 7's CPU targets) read measured summaries correctly; the
summary against the floor and the peers, and the one best-of-repeats function, give the fields the
result files have."""
import pytest

from qwen3moe_tutorial.benchmark import (HF_BEST, HF_EAGER, TARGETS, best_of_repeats, measure_peer, measure_step,
                                         summarize, target_checks)
from qwen3moe_tutorial.steps import STEP_NAMES


def summary(preset, **aiv):
    rows = [{"step": "hf_eager", "decode_ms_per_token": 12.0}, {"step": "graph_mode", "x_floor": 9.0},
            {"step": "aiv", **aiv}]
    return {"preset": preset, "rows": rows}


def test_mini_targets_use_the_last_measured_step_and_the_right_bounds():
    checks = {c["target"]: c for c in target_checks(summary("mini", x_floor=1.49, speedup_vs_hf_eager=1.6,
                                                            speedup_vs_hf_best=1.4))}
    assert set(checks) == {"x_floor", "speedup_vs_hf_eager", "speedup_vs_hf_best"}
    assert all(c["step"] == "aiv" for c in checks.values())
    assert checks["x_floor"]["met"] is True and checks["x_floor"]["bound"] == "<="
    assert checks["speedup_vs_hf_eager"]["met"] is True and checks["speedup_vs_hf_best"]["met"] is False
    assert checks["x_floor"]["measured"] == 1.49 and checks["speedup_vs_hf_best"]["limit"] == 1.5


def test_deep_targets_and_an_explicit_step():
    checks = target_checks(summary("deep", speedup_vs_hf_eager=3.0, speedup_vs_hf_best=1.99), step="graph_mode")
    assert [c["target"] for c in checks] == ["speedup_vs_hf_eager", "speedup_vs_hf_best"]
    assert all(c["step"] == "graph_mode" and c["measured"] is None and c["met"] is None for c in checks)
    checks = target_checks(summary("deep", speedup_vs_hf_eager=3.0, speedup_vs_hf_best=1.99))
    assert [c["met"] for c in checks] == [True, False]                  # 3.0 >= 3 holds, 1.99 >= 2 does not
    assert TARGETS["deep"]["speedup_vs_hf_best_at_least"] == 2.0


def test_presets_without_targets_have_no_checks():
    assert target_checks(summary("tiny", x_floor=1.0)) == []


def test_targets_are_for_tp_1_only():
    s = summary("mini", x_floor=1.0, speedup_vs_hf_eager=2.0, speedup_vs_hf_best=2.0)
    assert len(target_checks({**s, "tp": 1})) == 3 and target_checks({**s, "tp": 8}) == []


# ---- one best-of-repeats function, one summary ------------------------------------------------------
ROW_FIELDS = ["step", "tp", "token_ids", "prefill_ms", "decode_ms_per_token", "decode_ms", "first_decode_ms",
              "compile_s", "ops_per_token"]          # the per-step result files' own fields, in their order


def fake_runs(*medians):
    """A `generate` callable returning one canned Generation dict per call (run 1 compiles)."""
    runs = iter([{"token_ids": [i], "prefill_ms": 10.0 + i, "decode_ms_per_token": m, "decode_ms": [50.0, m],
                  "first_decode_ms": 50.0 if i == 0 else m, "compile_s": 4.0 if i == 0 else 0.0}
                 for i, m in enumerate(medians)])
    return lambda: next(runs)


def test_best_of_repeats_takes_the_fastest_run_and_run_1s_compile():
    best = best_of_repeats(fake_runs(3.0, 1.0, 2.0), 3)
    assert list(best) == ROW_FIELDS[2:-1]
    assert best["decode_ms_per_token"] == 1.0 and best["token_ids"] == [1] and best["prefill_ms"] == 11.0
    assert best["first_decode_ms"] == 50.0 and best["compile_s"] == 4.0       # run 1: the one that compiled


def test_best_of_repeats_calls_exactly_repeats_times_and_skips_untimed_runs():
    calls = []
    runs = fake_runs(None, 2.0)                # one new token: no decode step to time
    best = best_of_repeats(lambda: calls.append(1) or runs(), 2)
    assert len(calls) == 2 and best["decode_ms_per_token"] == 2.0
    with pytest.raises(ValueError, match="repeats"):
        best_of_repeats(fake_runs(1.0), 0)


def row(step, ms, tokens, compile_s=0.0, ops=None):
    return {"step": step, "tp": 1, "token_ids": tokens, "decode_ms_per_token": ms, "compile_s": compile_s,
            "ops_per_token": ops}


def test_summary_against_the_floor_and_the_peers():
    rows = [row(HF_EAGER, 2.0, [1, 2]), row(HF_BEST, 1.0, [1, 2], compile_s=5.0), row(STEP_NAMES[1], 0.5, [1, 3]),
            row(STEP_NAMES[-1], 0.8, [1, 2], ops=40)]
    s = summarize({"preset": "mini", "tp": 1}, rows, bytes_per_token=1_000_000, bandwidth_probes=[1e9, 2e9, 1.5e9])
    assert s["preset"] == "mini" and s["read_bandwidth_GBps"] == 2.0 and s["bytes_per_token"] == 1_000_000
    assert s["floor_ms"] == pytest.approx(0.5) and s["read_bandwidth_probes_GBps"] == [1.0, 2.0, 1.5]
    assert "best probe" in s["read_bandwidth_method"]
    by_step = {e["step"]: e for e in s["rows"]}
    assert list(by_step) == [r["step"] for r in rows]
    assert list(by_step[STEP_NAMES[-1]]) == ["step", "decode_ms_per_token", "compile_s", "ops_per_token", "x_floor",
                                             "tokens_ok", "speedup_vs_hf_eager", "speedup_vs_hf_best"]
    last, first_ours = by_step[STEP_NAMES[-1]], by_step[STEP_NAMES[1]]
    assert last["x_floor"] == pytest.approx(1.6) and last["ops_per_token"] == 40 and last["tokens_ok"] is True
    assert last["speedup_vs_hf_eager"] == pytest.approx(2.5) and last["speedup_vs_hf_best"] == pytest.approx(1.25)
    assert first_ours["tokens_ok"] is False and first_ours["x_floor"] == pytest.approx(1.0)
    assert by_step[HF_BEST]["compile_s"] == 5.0 and by_step[HF_EAGER]["speedup_vs_hf_eager"] == pytest.approx(1.0)
    checks = {c["target"]: c["met"] for c in target_checks(s)}     # what the targets read
    assert checks == {"x_floor": False, "speedup_vs_hf_eager": True, "speedup_vs_hf_best": False}


def test_summary_without_peers_checks_tokens_against_the_first_step():
    rows = [row(STEP_NAMES[0], 4.0, [7, 8]), row(STEP_NAMES[1], 2.0, [7, 8])]
    s = summarize({}, rows, 2_000_000, [1e9])
    assert [e["tokens_ok"] for e in s["rows"]] == [True, True]
    assert not any(k.startswith("speedup") for e in s["rows"] for k in e)
    s = summarize({}, [row(STEP_NAMES[1], 2.0, [7, 8])], 2_000_000, [1e9])
    assert s["rows"][0]["tokens_ok"] is None and s["rows"][0]["x_floor"] == pytest.approx(1.0)


def test_a_step_and_the_eager_peer_give_rows_of_the_same_shape(tiny_ckpt):
    prompt = [1, 5, 9, 13]
    ours = measure_step(STEP_NAMES[1], tiny_ckpt, prompt, 2, repeats=2, max_len=16)
    peer = measure_peer(HF_EAGER, tiny_ckpt, prompt, 2, repeats=1, max_len=16)
    assert list(ours) == list(peer) == ROW_FIELDS
    assert ours["token_ids"] == peer["token_ids"] and len(peer["token_ids"]) == 2
    assert ours["ops_per_token"] > 0 and peer["ops_per_token"] is None and peer["compile_s"] == 0.0
    with pytest.raises(ValueError, match="peers are"):
        measure_peer("hf_fast", tiny_ckpt, prompt, 3)


def test_llama_cpp_peer_reads_llama_bench_json(tmp_path):
    """scripts/llama_cpp_peer.py: ms per token from llama-bench's JSON (avg and each repetition), the
    build that measured it, and a command line without this machine's paths. A stand-in llama-bench
    prints what the real one prints (its README's JSON format)."""
    import importlib.util
    import json
    import stat
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "llama_cpp_peer", Path(__file__).parent.parent / "scripts" / "llama_cpp_peer.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    bin_dir = tmp_path / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "llama-bench"
    row = {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "model_type": "qwen3moe",
           "n_threads": 2, "avg_ts": 160.0, "samples_ns": [300_000_000, 325_000_000]}
    fake.write_text(f"#!/bin/sh\necho '{json.dumps([row])}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = peer.bench(str(tmp_path), str(tmp_path / "m.gguf"), threads=2, tokens=50, repeats=2)
    assert out["decode_ms_per_token"] == pytest.approx(1e3 / 160.0)
    assert out["samples_ms_per_token"] == pytest.approx([6.0, 6.5])           # 300 ms / 50 tokens, 325 / 50
    assert out["build_commit"] == "0c1e570" and out["threads"] == 2
    assert out["command"] == "llama-bench -m m.gguf -p 0 -n 50 -t 2 -r 2 -o json"
    with pytest.raises(SystemExit, match="build"):
        peer.bench(str(tmp_path / "nothing"), "m.gguf", 2, 50)
