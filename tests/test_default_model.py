"""The trained embedded default (qwen3moe_tutorial/data/tiny-trained): it speaks, and every step and TP
size gives Hugging Face's tokens on it, with margins that rounding cannot flip."""
import json

import pytest
import torch

from qwen3moe_tutorial import launch
from qwen3moe_tutorial.final import DEFAULT_PROMPT
from qwen3moe_tutorial.generate import greedy_generate
from qwen3moe_tutorial.hf import HFRunner, load_hf_model
from qwen3moe_tutorial.steps import STEP_NAMES, recipe_upto
from qwen3moe_tutorial.weights import default_checkpoint

N = 16


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:                                # a fresh copy, for this module only
        m.setenv("QWEN3MOE_TUTORIAL_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = default_checkpoint(quiet=True)
    from transformers import AutoTokenizer
    prompt = AutoTokenizer.from_pretrained(path)(DEFAULT_PROMPT)["input_ids"]
    hf = load_hf_model(path)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    return path, prompt, out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0]   # [N, V]


def test_the_default_reads_as_text(default):
    from transformers import AutoTokenizer
    path, _, tokens, _ = default
    text = AutoTokenizer.from_pretrained(path).decode(tokens)
    words = text.split()
    assert len(words) >= 5 and "\ufffd" not in text                       # whole words, no broken bytes
    assert sum(w.strip('.,:;"()').isalpha() for w in words) >= len(words) // 2, text
    assert json.load(open(f"{path}/config.json"))["model_type"] == "qwen3_moe"


def test_margins_are_far_above_rounding(default):
    """The winning logit leads the runner-up at every step by far more than our float32 model differs
    from HF's, so equal tokens are not luck."""
    path, prompt, tokens, hf_logits = default
    top2 = hf_logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    runner = launch.build_runner(recipe_upto("reference"), path, max_len=64)
    logits = runner.prefill(torch.tensor([prompt]))[0]                       # [V]: the last position
    ours = [logits]
    for i, t in enumerate(tokens[:-1]):
        ours.append(runner.decode(torch.tensor([[t]]), len(prompt) + i)[0])
    diff = (torch.stack(ours) - hf_logits).abs().max()
    assert gaps.min() > 100 * diff, (gaps.min(), diff)


@pytest.mark.parametrize("upto", STEP_NAMES[1:])
def test_every_step_gives_hf_tokens_on_the_default(upto, default, tmp_path):
    path, prompt, tokens, _ = default
    runner = launch.build_runner(recipe_upto(upto), path, max_len=64, compile_cache=str(tmp_path))
    assert greedy_generate(runner, prompt, N).token_ids == tokens


@pytest.mark.parametrize("size, upto", [(2, "fused_attention"), (4, "fused_attention"),
                                        (8, "fused_attention"), (2, "aiv")])
def test_tp_sizes_give_hf_tokens_on_the_default(size, upto, default, tmp_path):
    path, prompt, tokens, _ = default
    n = 8 if size == 8 else N
    job = launch.GenerationJob(path, prompt, n, upto=upto, tp=size, device_kind="cpu", dtype=torch.float32,
                               max_len=64, compile_cache=str(tmp_path))
    assert launch.run(job)["token_ids"] == tokens[:n]
