"""The benchmark's target checks (issue 7's CPU targets) read measured summaries correctly."""
from qwen3moe_tutorial.benchmark import TARGETS, target_checks


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
