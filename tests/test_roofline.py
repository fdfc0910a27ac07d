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


def test_prediction_terms_and_assumptions():
    hw = rf.HARDWARE["a3-die"]
    p = rf.predict_decode_ms(Q235, hw, 16, collective_latency_us=30.0, ops_per_token=1000, dispatch_us=2.0,
                             bandwidth_efficiency=0.5)
    assert p["memory_ms"] == pytest.approx(rf.bytes_per_token(Q235, 16)["total"] / (0.5 * 1.6e12) * 1e3)
    assert p["collectives_ms"] == pytest.approx(190 * 30e-3)
    assert p["dispatch_ms"] == pytest.approx(2.0)
    assert p["total_ms"] == pytest.approx(p["memory_ms"] + p["collectives_ms"] + p["dispatch_ms"])
    assert p["assumptions"]["collective_latency_us"] == 30.0
    overlapped = rf.predict_decode_ms(Q235, hw, 16, collective_latency_us=30.0, ops_per_token=1000,
                                      dispatch_us=2.0, bandwidth_efficiency=0.5, overlap_dispatch=True)
    assert overlapped["total_ms"] == pytest.approx(p["memory_ms"] + p["collectives_ms"])
    # a link-bandwidth term adds time; tp == 1 has no collectives at all
    assert rf.predict_decode_ms(Q235, hw, 16, link_bandwidth_Bps=1e9)["collectives_ms"] > \
        rf.predict_decode_ms(Q235, hw, 16)["collectives_ms"]
    assert rf.predict_decode_ms(Q30, "h100-sxm", 1)["collectives_ms"] == 0
    assert rf.predict_decode_ms(Q235, hw, 16)["ops_per_token"] == rf.fused_ops_per_token(Q235)


def test_scenarios_are_ordered():
    totals = [rf.predict_decode_ms(Q235, "a3-die", 16, **rf.scenario_kwargs(s))["total_ms"] for s in rf.SCENARIOS]
    assert totals == sorted(totals, reverse=True)                            # each change helps
    lo, hi = (rf.predict_decode_ms(Q235, "a3-die", 16, **rf.scenario_kwargs("graph, AIV", w))["total_ms"]
              for w in ("low", "high"))
    assert lo < hi


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
    from qwen3moe_tutorial.config import preset
    from qwen3moe_tutorial.roofline import WRITEUP_TARGET_MS, predict_ladder

    measured = {"hf_baseline": 469, "reference": 428, "attention_tp": 435, "merged_qkv": 431,
                "moe_tp_w13_swiglu": 399, "fused_routing_gmm": 267, "fused_rmsnorm": 174, "fused_attention": 114}
    for name, tp in (("qwen3-235b-a22b", 8), ("qwen3-235b-a22b", 16), ("qwen3-30b-a3b", 8)):
        rows = {r["step"]: r for r in predict_ladder(preset(name), tp, measured, preset("tiny"))}
        assert rows["aiv"]["total_ms"] < rows["graph_mode"]["total_ms"] < rows["fused_attention"]["total_ms"]
        assert rows["fused_routing_gmm"]["total_ms"] < rows["moe_tp_w13_swiglu"]["total_ms"]
        assert rows["aiv"]["total_ms"] < WRITEUP_TARGET_MS and rows["aiv"]["fits"]
        assert rows["aiv"]["collectives"] == 2 * preset(name).num_hidden_layers + 2
        assert rows["attention_tp"]["collectives"] == preset(name).num_hidden_layers + 2
        assert rows["reference"]["tp"] == 1 and rows["reference"]["collectives"] == 0
    big = {r["step"]: r for r in predict_ladder(preset("qwen3-235b-a22b"), 16, measured, preset("tiny"))}
    assert not big["reference"]["fits"] and not big["merged_qkv"]["fits"]     # 470 GB does not fit a 64 GB die
    assert big["moe_tp_w13_swiglu"]["fits"]


def test_ladder_asks_the_recipe_not_step_names():
    """No step name is written in the roofline or TP code: what a step changes comes from its
    recipe's declarations (steps.recipe_upto), so renaming or adding a step needs no edit here."""
    for module in (rf, tp_py):
        constants = {n.value for n in ast.walk(ast.parse(open(module.__file__).read()))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not constants & set(steps.STEP_NAMES), module.__name__
    measured = dict.fromkeys(steps.STEP_NAMES, 100)
    rows = rf.predict_ladder(Q30, 8, measured, preset("tiny"))
    for row in rows:
        recipe = steps.recipe_upto(row["step"])
        assert row["tp"] == (8 if recipe.tensor_parallel else 1)
        assert row["assumptions"]["launch"] == ("graph" if recipe.graph else "eager")
        assert row["assumptions"]["hccl"] == recipe.env.get("HCCL_OP_EXPANSION_MODE", "AI_CPU")
    subset = rf.predict_ladder(Q30, 8, measured, preset("tiny"), steps=(rows[-1]["step"], rows[0]["step"]))
    assert [r["total_ms"] for r in subset] == [rows[-1]["total_ms"], rows[0]["total_ms"]]
