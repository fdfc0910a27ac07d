"""The optimization ladder: one ordered table of named steps (design.md section 2).

- A step is one small function `Recipe -> Recipe` that swaps one unit (a model part, the engine).
  "Up to step k" folds steps 1..k, so every step includes the ones before it.
- `build_runner` turns a recipe into something `generate.greedy_generate` can drive.
- No mode flags inside forward: what changes between steps is *which class* runs, never an `if`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model import Parts, Qwen3MoeModel
from .parallel import TP


@dataclass(frozen=True)
class Recipe:
    """What to build: the engine (transformers or ours), our model's parts, the enabled steps."""
    engine: str = "hf"
    parts: Parts = field(default_factory=Parts)
    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    name: str
    chapter: str
    summary: str
    apply: Callable[[Recipe], Recipe]


# ---- the steps, in order -------------------------------------------------------------------------
def hf_baseline(recipe: Recipe) -> Recipe:
    """transformers' Qwen3MoeForCausalLM with its naive per-expert loop (see hf.py)."""
    return dataclasses.replace(recipe, engine="hf")


def reference(recipe: Recipe) -> Recipe:
    """Our readable model (model.py): same math, static KV cache, prefill/decode split."""
    return dataclasses.replace(recipe, engine="ours", parts=Parts())


STEPS: tuple[Step, ...] = (
    Step("hf_baseline", "01_hf_baseline", "transformers Qwen3MoeForCausalLM, naive per-expert loop, no TP",
         hf_baseline),
    Step("reference", "02_reference_model", "our readable single-device model, static KV cache, "
         "prefill/decode split", reference),
)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)


def step(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise ValueError(f"unknown step {name!r}; the ladder is: {', '.join(STEP_NAMES)}")


def recipe_upto(name: str | None = None) -> Recipe:
    """The recipe with every step up to and including `name` (default: all steps)."""
    last = STEP_NAMES.index(step(name or STEP_NAMES[-1]).name)
    recipe = Recipe()
    for s in STEPS[: last + 1]:
        recipe = dataclasses.replace(s.apply(recipe), steps=recipe.steps + (s.name,))
    return recipe


def build_runner(recipe: Recipe, model_path: str, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tp: TP = TP(), max_len: int = 512):
    """Load the checkpoint into the recipe's engine; return a runner (generate.py protocol)."""
    from .generate import ModelRunner
    from .hf import HFRunner, load_hf_model
    from .weights import Checkpoint

    if recipe.engine == "hf":
        if tp.size != 1:
            raise ValueError("hf_baseline runs on one device; use --tp 1 (tensor parallelism starts at "
                             "the attention_tp step)")
        Checkpoint(model_path).validate()          # the same clear errors as our loader
        return HFRunner(load_hf_model(model_path, dtype=dtype, device=device))
    ckpt = Checkpoint(model_path)
    model = Qwen3MoeModel(ckpt.config, recipe.parts, tp, max_len=max_len, dtype=dtype).load(ckpt)
    return ModelRunner(model.to(device))
