"""The analytic decode model: byte counts against the published model sizes, TP scaling, collectives."""
import ast
import time

import pytest

from qwen3moe_tutorial import roofline as rf, steps, tp as tp_py
from qwen3moe_tutorial.config import PRESETS, preset
from qwen3moe_tutorial.parallel import TP

GB = 1e9
Q235, Q30 = preset("qwen3-235b-a22b"), preset("qwen3-30b-a3b")


@pytest.mark.parametrize("cfg, tp, expected_gb", [
    (Q235, 1, 43.1), (Q235, 8, 5.58), (Q235, 16, 2.94),
    (Q30, 1, 6.1), (Q30, 8, 0.81),
])
def test_weights_read_per_token_match_design(cfg, tp, expected_gb):
    b = rf.bytes_per_token(cfg, tp=tp, dtype_bytes=2)
    assert b["weights"] / GB == pytest.approx(expected_gb, rel=0.01)
    assert b["total"] == b["weights"]                       # no context, no KV-cache bytes


@pytest.mark.parametrize("name", list(PRESETS))
def test_parts_sum_and_agree_with_param_counts(name):
    cfg = PRESETS[name]
    b = rf.bytes_per_token(cfg, tp=1, dtype_bytes=2, context_len=7)
    assert b["weights"] == sum(b[p] for p in rf.PARTS if p != "kv_cache")
    assert b["total"] == b["weights"] + b["kv_cache"]
    assert b["weights"] == 2 * cfg.param_counts()["activated_per_token"]
    assert rf.resident_bytes_per_rank(cfg, 1, 2) == 2 * cfg.param_counts()["total"]


def test_only_activated_experts_are_read():
    b = rf.bytes_per_token(Q235, tp=1, dtype_bytes=1)
    H, I, L = Q235.hidden_size, Q235.moe_intermediate_size, Q235.num_hidden_layers
    assert b["experts"] == L * Q235.num_experts_per_tok * 3 * H * I          # 8 of 128 experts
    assert b["embedding"] == H                                             # one row, not the table
    assert b["lm_head"] == Q235.vocab_size * H


def test_head_dim_is_read_not_derived():
    # 235B: N * D = 8192 != H = 4096; a hidden_size // N head_dim would halve q/o bytes
    b = rf.bytes_per_token(Q235, tp=1, dtype_bytes=1)
    assert b["attention_q_o"] == Q235.num_hidden_layers * 2 * 64 * 128 * 4096
    assert Q235.num_attention_heads * Q235.head_dim != Q235.hidden_size


@pytest.mark.parametrize("cfg", [Q235, Q30, preset("tiny")])
def test_split_parts_scale_as_one_over_tp(cfg):
    one = rf.bytes_per_token(cfg, tp=1)
    for tp in (2, 4):
        b = rf.bytes_per_token(cfg, tp=tp)
        for part in ("attention_q_o", "experts", "lm_head"):
            assert b[part] * tp == one[part], (part, tp)
        for part in ("router", "norms", "embedding"):                       # replicated
            assert b[part] == one[part], (part, tp)


def test_kv_heads_replicated_when_tp_exceeds_kv_heads():
    cfg = Q235                                                             # Nkv = 4
    assert [tp_py.HeadPlan.of(cfg, TP(0, tp)).n_kv for tp in (1, 2, 4, 8, 16)] == [4, 2, 1, 1, 1]
    kv = {tp: rf.bytes_per_token(cfg, tp=tp)["attention_k_v"] for tp in (1, 2, 4, 8, 16)}
    assert kv[2] * 2 == kv[1] and kv[4] * 4 == kv[1]
    assert kv[8] == kv[4] == kv[16]                                         # one whole head per rank
    ctx = {tp: rf.bytes_per_token(cfg, tp=tp, context_len=1000)["kv_cache"] for tp in (4, 16)}
    assert ctx[4] == ctx[16] == cfg.num_hidden_layers * 2 * 1 * 128 * 1000 * 2
    with pytest.raises(ValueError, match="exceeds num_key_value_heads .4. and is not a multiple of it"):
        rf.bytes_per_token(cfg.replace(num_attention_heads=48), tp=6)   # the head plan's own error


def test_uneven_split_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        rf.bytes_per_token(Q235, tp=3)


def test_collectives_per_token():
    assert rf.collectives_per_token(Q235, 1)["count"] == 0
    for cfg in (Q235, Q30):
        for tp in (2, 8, 16):
            c = rf.collectives_per_token(cfg, tp)
            L = cfg.num_hidden_layers
            assert c["all_reduce"] == 2 * L + 1 and c["all_gather"] == 1
            assert c["count"] == 2 * L + 2
            ar = [m for m in c["messages"] if m.op == "all_reduce"]
            assert {m.bytes for m in ar} == {cfg.hidden_size * 2}
            (ag,) = [m for m in c["messages"] if m.op == "all_gather"]
            assert ag.bytes == cfg.vocab_size // tp * 2
    assert rf.collectives_per_token(Q235, 16)["count"] == 190                 # 2 per layer + embedding and lm_head


def test_flops_per_byte_is_about_one_at_batch_one():
    for cfg in (Q235, Q30):
        for tp in (1, 8):
            ratio = rf.flops_per_token(cfg, tp)["total"] / rf.bytes_per_token(cfg, tp)["total"]
            assert ratio == pytest.approx(1.0, abs=0.01)


def test_hardware_table_has_sources():
    for name in rf.HARDWARE_KINDS[:-1]:
        hw = rf.hardware(name)
        assert hw.source and hw.bandwidth_Bps > 0 and hw.memory_bytes > 0
    assert rf.HARDWARE["a3-die"].devices_per_package == 2
    assert (rf.HARDWARE["a3-die"].memory_bytes, rf.HARDWARE["a3-die"].bandwidth_Bps) == (64e9, 1.6e12)
    with pytest.raises(ValueError, match="unknown hardware"):
        rf.hardware("a4")


def test_measured_cpu_bandwidth_is_plausible_and_quick():
    t0 = time.perf_counter()
    hw = rf.hardware("this-cpu")
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert 5e8 < hw.bandwidth_Bps < 2e12                                    # 0.5 GB/s .. 2 TB/s
    assert "measured" in hw.source
    assert rf.this_cpu(bandwidth_Bps=1e10).bandwidth_Bps == 1e10


def test_predicted_ladder_for_the_released_models():
    for name, tp in (("qwen3-235b-a22b", 8), ("qwen3-235b-a22b", 16), ("qwen3-30b-a3b", 8)):
        cfg = preset(name)
        rows = {r["step"]: r for r in rf.predict_ladder(cfg, tp)}
        assert list(rows) == list(steps.STEP_NAMES)
        for r in rows.values():
            assert r["total_ms"] == pytest.approx(sum(r[t] for t in rf.TERMS))
            assert min(r[t] for t in rf.TERMS) >= 0
        assert rows["aiv"]["total_ms"] < rows["graph_mode"]["total_ms"] < rows["fused_attention"]["total_ms"]
        assert rows["fused_attention"]["total_ms"] < rows["fused_rmsnorm"]["total_ms"] \
            < rows["fused_routing_gmm"]["total_ms"] < rows["moe_tp_w13_swiglu"]["total_ms"]
        assert rows["compile_cache"]["total_ms"] == rows["graph_mode"]["total_ms"]   # it saves compile time only
        assert rows["aiv"]["fits"] and rows["aiv"]["collectives"] == 2 * cfg.num_hidden_layers + 2
        assert rows["attention_tp"]["collectives"] == cfg.num_hidden_layers + 2
        assert rows["reference"]["tp"] == 1 and rows["reference"]["collectives"] == 0
        assert rows["graph_mode"]["dispatch_ms"] < rows["fused_attention"]["dispatch_ms"]
    big = {r["step"]: r for r in rf.predict_ladder(Q235, 16)}
    assert big["aiv"]["total_ms"] < rf.WRITEUP_TARGET_MS
    assert not big["reference"]["fits"] and not big["merged_qkv"]["fits"]     # 470 GB does not fit a 64 GB die
    assert big["moe_tp_w13_swiglu"]["fits"]


def test_prediction_terms_follow_their_definitions():
    """Graph mode: every kernel max(bytes / achievable bandwidth, floor), one graph launch, collectives
    at the recipe's HCCL latency. Eager: each kernel at least the host's dispatch cost."""
    a = rf.Assumptions(kernel_floor_us=10.0, host_dispatch_us=20.0, graph_launch_us=40.0,
                       allreduce_us={"AI_CPU": 30.0, "AIV": 6.0}, bandwidth_efficiency=0.5)
    g = rf.predict_step(Q235, 16, "aiv", assumptions=a)
    heavy = rf.weight_kernels(Q235, 16, steps.recipe_upto("aiv"))
    bw = 1.6e12 * 0.5
    assert g["memory_ms"] == pytest.approx(sum(n * b for _, n, b in heavy) / bw * 1e3)
    light = g["kernels"] - sum(n for _, n, _ in heavy)
    device = sum(n * max(b / bw * 1e6, 10.0) for _, n, b in heavy) + light * 10.0
    assert g["memory_ms"] + g["kernel_floor_ms"] == pytest.approx(device / 1e3)
    assert g["dispatch_ms"] == pytest.approx(0.04) and g["collectives_ms"] == pytest.approx(190 * 6e-3)
    e = rf.predict_step(Q235, 16, "fused_attention", assumptions=a)
    assert e["kernels"] == g["kernels"] and e["collectives_ms"] == pytest.approx(190 * 30e-3)
    assert e["total_ms"] >= e["kernels"] * 20e-3                              # host-bound: 20 µs a kernel at least
    assert e["graph_ms"] == pytest.approx(e["total_ms"] - e["dispatch_ms"] - e["collectives_ms"] + 0.04 + 190 * 30e-3)


def test_a_step_that_does_not_touch_the_experts_saves_the_same_whatever_k():
    """The K-scaling fault, gone: only the expert loop grows with top-k, so a step that leaves the
    experts alone predicts the same saving on two models that differ only in K."""
    k4 = Q30.replace(num_experts_per_tok=4)
    for cfg_a, cfg_b in ((Q30, k4),):
        a, b = ({r["step"]: r for r in rf.predict_ladder(c, 8)} for c in (cfg_a, cfg_b))
        names = list(steps.STEP_NAMES)
        for step in ("attention_tp", "merged_qkv", "fused_rmsnorm", "fused_attention", "aiv"):
            prev = names[names.index(step) - 1]
            for key in ("total_ms", "graph_ms"):
                assert a[prev][key] - a[step][key] == pytest.approx(b[prev][key] - b[step][key]), (step, key)
        assert a["reference"]["kernels"] - b["reference"]["kernels"] > 0          # the loop does grow with K


def test_kernel_counts_are_the_models_own(tiny_ckpt):
    """kernels_per_token counts on a twin; the tiny checkpoint's own profiled count must agree."""
    from qwen3moe_tutorial.launch import build_runner
    from qwen3moe_tutorial.profile import ops_per_token, profile_decode

    cfg = preset("tiny")
    for step in ("reference", "moe_tp_w13_swiglu", "fused_routing_gmm", "fused_attention"):
        runner = build_runner(steps.recipe_upto(step), tiny_ckpt, max_len=32)
        measured = ops_per_token(profile_decode(runner, [1, 2, 3, 4], steps=1, warmup=1))[0]
        assert rf.kernels_per_token(cfg, 1, step).total(cfg.num_hidden_layers) == measured, step
    assert rf.kernels_per_token(cfg, 1, "aiv") == rf.kernels_per_token(cfg, 1, "fused_attention")


def test_calibration_against_published_runs():
    rows = rf.calibration()
    comparable = [r for r in rows if r["comparable"]]
    assert len(comparable) >= 2 and all(r["reason"] for r in rows)
    for r in comparable:
        assert 0.7 <= r["ratio"] <= 1.3, r["config"]
    assert all(r["predicted_ms"] is None for r in rows if not r["comparable"])
    assert rf.calibration("low")[0]["predicted_ms"] < rows[0]["predicted_ms"] < rf.calibration("high")[0]["predicted_ms"]


def test_stored_calibration_table_is_current():
    """results/a3-calibration.json (which the book renders) is what the model computes now
    (regenerate it with scripts/a3_calibration.py)."""
    import json
    from pathlib import Path

    stored = json.loads((Path(__file__).parent.parent / "results" / "a3-calibration.json").read_text())
    assert stored == rf.calibration()


def test_sensitivity_moves_the_way_its_parameter_does():
    sweeps = rf.sensitivity(Q235, 16, points=3)
    assert set(sweeps) == {"kernel_floor_us", "allreduce_us", "bandwidth_efficiency"}
    for name, points in sweeps.items():
        totals = [ms for _, ms in points]
        assert totals == (sorted(totals, reverse=True) if name == "bandwidth_efficiency" else sorted(totals)), name


def test_ladder_asks_the_recipe_not_step_names():
    """No step name is written in the roofline or TP code: what a step changes comes from its
    recipe's declarations (steps.recipe_upto), so renaming or adding a step needs no edit here."""
    for module in (rf, tp_py):
        constants = {n.value for n in ast.walk(ast.parse(open(module.__file__).read()))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not constants & set(steps.STEP_NAMES), module.__name__
    for row in rf.predict_ladder(Q30, 8):
        recipe = steps.recipe_upto(row["step"])
        assert row["tp"] == (8 if recipe.tensor_parallel else 1)
        assert row["launch"] == ("graph" if recipe.graph else "eager")
        assert row["hccl"] == recipe.env.get("HCCL_OP_EXPANSION_MODE", "AI_CPU")
