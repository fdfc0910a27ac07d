"""Fused steps (chapters 06-08): same tokens as Hugging Face, and each fusion equals what it replaces."""
import pytest
import torch

from qwen3moe_tutorial import fused
from qwen3moe_tutorial.generate import greedy_generate
from qwen3moe_tutorial.hf import HFRunner, load_hf_model
from qwen3moe_tutorial.parallel import TP
from qwen3moe_tutorial.profile import ops_per_token, profile_decode
from qwen3moe_tutorial.launch import GenerationJob, build_runner, run
from qwen3moe_tutorial.steps import STEP_NAMES, recipe_upto
from qwen3moe_tutorial.weights import Checkpoint

PROMPT = [286, 1005, 905, 934, 293, 344, 399, 258, 526, 13]
FUSED = ("fused_routing_gmm", "fused_rmsnorm", "fused_attention")


def job(path, upto, n, tp, dtype=torch.float32):
    return GenerationJob(path, PROMPT, n, upto=upto, tp=tp, dtype=dtype, max_len=64)


@pytest.fixture(scope="module")
def hf_tokens(tiny_ckpt, other_ckpt):
    return {p: greedy_generate(HFRunner(load_hf_model(p)), PROMPT, 24).token_ids for p in (tiny_ckpt, other_ckpt)}


@pytest.mark.parametrize("upto", FUSED)
def test_each_fused_step_matches_hf_single_rank(upto, tiny_ckpt, other_ckpt, hf_tokens):
    for path in (tiny_ckpt, other_ckpt):
        runner = build_runner(recipe_upto(upto), path, max_len=64)
        assert greedy_generate(runner, PROMPT, 24).token_ids == hf_tokens[path]


@pytest.mark.parametrize("upto, size, n", [("fused_routing_gmm", 2, 8), ("fused_rmsnorm", 2, 8),
                                           ("fused_attention", 2, 8), ("fused_attention", 4, 6),
                                           ("fused_attention", 8, 3)])
def test_fused_steps_under_tp(upto, size, n, tiny_ckpt, hf_tokens):
    out = run(job(tiny_ckpt, upto, n, size))
    assert out["token_ids"] == hf_tokens[tiny_ckpt][:n]


def test_logits_match_hf_float32(tiny_ckpt):
    ours = build_runner(recipe_upto("fused_attention"), tiny_ckpt, max_len=64)
    theirs = HFRunner(load_hf_model(tiny_ckpt))
    ids = torch.tensor([PROMPT])
    worst = (ours.prefill(ids) - theirs.prefill(ids)).abs().max().item()
    token = torch.tensor([[5]])
    for pos in range(len(PROMPT), len(PROMPT) + 6):
        a, b = ours.decode(token, pos), theirs.decode(token, pos)
        worst = max(worst, (a - b).abs().max().item())
        token = b.argmax(-1, keepdim=True)
    assert worst <= 1e-4


def test_bfloat16_within_tolerance_of_hf_bfloat16(tiny_ckpt):
    """bf16: the fused ops round differently from HF (one rounding in norms, top-k on rounded
    probabilities), so compare logits with a tolerance and tokens on the embedded default."""
    ours = build_runner(recipe_upto("fused_attention"), tiny_ckpt, dtype=torch.bfloat16, max_len=64)
    theirs = HFRunner(load_hf_model(tiny_ckpt, dtype=torch.bfloat16))
    fp32 = HFRunner(load_hf_model(tiny_ckpt))                                  # the yardstick
    ids = torch.tensor([PROMPT])
    a, b, c = ours.prefill(ids), theirs.prefill(ids), fp32.prefill(ids)
    ours_err, hf_err = (a - c).abs().max().item(), (b - c).abs().max().item()
    assert ours_err <= 0.1 * c.abs().max().item()                              # bf16 rounding, not bugs
    assert ours_err <= 1.5 * hf_err + 0.01 * c.abs().max().item()              # no worse than HF's own bf16
    mine = greedy_generate(ours, PROMPT, 12).token_ids
    hf_bf16 = greedy_generate(theirs, PROMPT, 12).token_ids
    ref = greedy_generate(fp32, PROMPT, 12).token_ids
    agree = lambda t: next((i for i, (x, y) in enumerate(zip(t, ref)) if x != y), len(ref))
    assert agree(mine) >= max(agree(hf_bf16), 8)                 # follows fp32 at least as long as HF's bf16


def test_v1_and_v2_routing_give_the_same_moe_output(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    model = recipe_upto("fused_routing_gmm").parts.build(ckpt.config, TP(), max_len=16).load(ckpt)
    moe = model.layers[1].moe
    x = torch.randn(7, ckpt.config.hidden_size)
    v2 = moe(x.view(1, 7, -1)).view(7, -1)
    v1 = fused.moe_v1_path(moe, x)
    loop = recipe_upto("moe_tp_w13_swiglu").parts.build(ckpt.config, TP(), max_len=16).load(ckpt).layers[1].moe
    assert torch.allclose(v1, v2, atol=1e-5) and torch.allclose(v2, loop(x.view(1, 7, -1)).view(7, -1), atol=1e-5)


def test_residual_protocol_equals_plain_adds(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    norm = recipe_upto("fused_rmsnorm").parts.build(ckpt.config, TP(), max_len=16).load(ckpt).layers[0].post_norm
    plain = recipe_upto("reference").parts.build(ckpt.config, TP(), max_len=16).load(ckpt).layers[0].post_norm
    h, res = torch.randn(1, 3, 128), torch.randn(1, 3, 128)
    y, total = norm.add_norm(h, res)
    assert torch.equal(total, res + h) and torch.allclose(y, plain(res + h), atol=1e-6)
    y0, first = norm.add_norm(h, None)
    assert first is h and torch.allclose(y0, plain(h), atol=1e-6)


def test_operator_counts_fall_along_the_ladder(tiny_ckpt):
    counts = {}
    for step in STEP_NAMES[1:]:
        runner = build_runner(recipe_upto(step), tiny_ckpt, max_len=64)
        counts[step] = ops_per_token(profile_decode(runner, PROMPT, steps=2, warmup=1))[0]
    assert counts["merged_qkv"] < counts["attention_tp"]
    cfg = Checkpoint(tiny_ckpt).config
    loop_visits = cfg.num_hidden_layers * cfg.num_experts_per_tok
    assert counts["fused_routing_gmm"] <= counts["moe_tp_w13_swiglu"] - 4 * loop_visits   # the loop is gone
    assert counts["fused_rmsnorm"] < counts["fused_routing_gmm"]
    assert counts["fused_attention"] < counts["fused_rmsnorm"]


def test_nz_weights_are_exactly_the_matmul_weights(tiny_ckpt):
    """What Qwen3MoeModel.to_device casts to FRACTAL_NZ on an NPU, as the recipe does: the expert
    weights as [E, in, out], the q/k/v/o projections and lm_head; never the router, norms or embedding."""
    model = build_runner(recipe_upto("aiv"), tiny_ckpt, max_len=16).model
    declared = {f"{name}.{w}" if name else w: getattr(m, w) for name, m in model.named_modules()
                for w in getattr(m, "nz_weights", ())}
    kinds = {key.split(".")[-1] if "lm_head" not in key else "lm_head" for key in declared}
    assert kinds == {"qkv_proj", "o_proj", "w13", "w2", "lm_head"}
    assert len(declared) == 4 * 4 + 1 and all(w.dim() >= 2 for w in declared.values())
    cfg = model.cfg
    moe = model.layers[0].moe
    assert moe.w13.shape == (cfg.num_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size)   # [E, in, out]
    never = {id(p) for name, p in model.named_parameters() if "router" in name or "norm" in name or "embed" in name}
    assert not never & {id(w) for w in declared.values()}
    assert model.to_device("cpu") is model and moe.w13.data_ptr() == declared["layers.0.moe.w13"].data_ptr()


def test_quiet_stderr_holds_back_native_lines_but_never_an_error(capfd):
    import os

    from qwen3moe_tutorial.profile import quiet_native_stderr

    with quiet_native_stderr():
        os.write(2, b"profiler start line\n")
    assert "profiler start line" not in capfd.readouterr().err
    with pytest.raises(RuntimeError):
        with quiet_native_stderr():
            os.write(2, b"E: graph compilation failed in the compiler\n")
            raise RuntimeError("compile failed")
    assert "graph compilation failed" in capfd.readouterr().err        # replayed when the block fails
    with quiet_native_stderr(enabled=False):                             # on an NPU: passed through
        os.write(2, b"CANN says something\n")
    assert "CANN says something" in capfd.readouterr().err
