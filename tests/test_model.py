"""The reference model equals transformers' Qwen3MoeForCausalLM (issue 2's invariant)."""
import pytest
import torch

from qwen3moe_tutorial.generate import ModelRunner, greedy_generate
from qwen3moe_tutorial.hf import HFRunner, load_hf_model
from qwen3moe_tutorial.model import Qwen3MoeModel
from qwen3moe_tutorial.weights import Checkpoint

PROMPT = [286, 1005, 905, 934, 293, 344, 399, 258, 526, 13]


def ours(path, dtype=torch.float32, max_len=128):
    ckpt = Checkpoint(path)
    return Qwen3MoeModel(ckpt.config, max_len=max_len, dtype=dtype).load(ckpt)


@pytest.mark.parametrize("which", ["tiny_ckpt", "other_ckpt"])
def test_logits_match_hf_float32(which, request):
    path = request.getfixturevalue(which)
    model, hf = ours(path), HFRunner(load_hf_model(path))
    ids = torch.tensor([PROMPT])
    worst = (model.prefill(ids) - hf.prefill(ids)).abs().max().item()
    token = torch.tensor([[7]])
    for pos in range(len(PROMPT), len(PROMPT) + 8):                       # decode over the cache
        a = model.decode(token, torch.tensor([pos]), pos + 1)
        b = hf.decode(token, pos)
        worst = max(worst, (a - b).abs().max().item())
        token = b.argmax(-1, keepdim=True)
    assert worst <= 1e-4


@pytest.mark.parametrize("which", ["tiny_ckpt", "other_ckpt"])
def test_greedy_tokens_match_hf_for_40_steps(which, request):
    path = request.getfixturevalue(which)
    a = greedy_generate(ModelRunner(ours(path)), PROMPT, 40)
    b = greedy_generate(HFRunner(load_hf_model(path)), PROMPT, 40)
    assert len(a.token_ids) == 40 and a.token_ids == b.token_ids
    if which == "tiny_ckpt":
        assert len(set(a.token_ids)) > 5                                   # not a degenerate repeat


def test_bfloat16_close_to_hf_bfloat16(tiny_ckpt):
    model = ours(tiny_ckpt, torch.bfloat16)
    hf = HFRunner(load_hf_model(tiny_ckpt, dtype=torch.bfloat16))
    ref = HFRunner(load_hf_model(tiny_ckpt))                                # float32 yardstick
    ids = torch.tensor([PROMPT])
    a, b, c = model.prefill(ids), hf.prefill(ids), ref.prefill(ids)
    assert a.dtype == torch.float32 and model.embed.weight.dtype == torch.bfloat16
    scale = c.abs().max().item()
    ours_err, hf_err = (a - c).abs().max().item(), (b - c).abs().max().item()
    assert ours_err <= 0.1 * scale                                          # bf16 rounding, not bugs
    assert ours_err <= 1.5 * hf_err + 0.01 * scale                          # no farther from fp32 than HF's bf16
    assert a.argmax(-1).item() == b.argmax(-1).item() == c.argmax(-1).item()


def test_cache_capacity_is_enforced(tiny_ckpt):
    model = ours(tiny_ckpt, max_len=16)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        model.prefill(torch.zeros(1, 17, dtype=torch.long))
    runner = ModelRunner(model)
    with pytest.raises(ValueError, match="past the KV cache"):
        greedy_generate(runner, PROMPT, 10)


def test_stops_after_eos_like_generate(tiny_ckpt):
    full = greedy_generate(ModelRunner(ours(tiny_ckpt)), PROMPT, 12)
    eos = full.token_ids[5]
    cut = greedy_generate(ModelRunner(ours(tiny_ckpt)), PROMPT, 12, eos_token_id=eos)
    assert cut.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]


def test_model_file_stays_readable():
    import inspect

    import qwen3moe_tutorial.model as m
    assert len(inspect.getsource(m).splitlines()) < 400
