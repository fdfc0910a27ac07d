"""The optimization ladder: one ordered table of named steps (README, the book's table of contents).

- A step is one row of `STEPS`: which recipe fields and model parts it swaps, and what it changes,
  declared as data (starts tensor parallelism, splits the experts, runs decode as a graph, the
  launcher environment it sets). Every other module asks the recipe these questions, never a
  step's name; adding a step is one row here and the part class it swaps in.
- "Up to step k" folds rows 1..k, so every step includes the ones before it.
- No mode flags inside forward: what changes between steps is *which class* runs, never an `if`.
- Running a recipe (loading, ranks, generation) lives in launch.py.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

from . import compile, fused, tp
from .generate import ModelRunner
from .model import Parts
from .parallel import TP

PART_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Parts))


@dataclass(frozen=True)
class Step:
    """One rung of the ladder: what it swaps (recipe fields `engine` / `runner`, or model parts by
    name) and what it changes, as flags that `Recipe` folds over the steps enabled so far."""
    name: str
    chapter: str
    summary: str
    swaps: tuple[tuple[str, object], ...] = ()
    tensor_parallel: bool = False     # from here on a recipe can run on several ranks (--tp > 1)
    splits_experts: bool = False      # every expert split over the ranks: an all-reduce after the MoE
    grouped_experts: bool = False     # the expert loop replaced by routing ops and grouped matmuls
    graph: bool = False               # decode runs as one compiled graph
    cached_graph: bool = False        # that graph is kept on disk for the next process
    env: tuple[tuple[str, str], ...] = ()   # variables the launcher sets for every rank

    def apply(self, recipe: "Recipe") -> "Recipe":
        """The recipe with this step's swaps made and its name appended."""
        parts = {k: v for k, v in self.swaps if k in PART_NAMES}
        fields = {k: v for k, v in self.swaps if k not in PART_NAMES}
        return dataclasses.replace(recipe, parts=dataclasses.replace(recipe.parts, **parts),
                                   steps=recipe.steps + (self.name,), **fields)

    def __str__(self) -> str:
        flags = [f.name for f in dataclasses.fields(self) if f.type == "bool" and getattr(self, f.name)]
        lines = [f"{self.name} (chapter {self.chapter}): {self.summary}"]
        lines += [f"  swaps {k:10s} -> {_label(v)}" for k, v in self.swaps]
        lines += [f"  declares {', '.join(flags)}"] if flags else []
        lines += [f"  sets {k}={v}" for k, v in self.env]
        return "\n".join(lines)


def swaps(**changes) -> tuple[tuple[str, object], ...]:
    """A step's swaps, written as keyword arguments: model parts (`attention=...`) or recipe fields."""
    unknown = set(changes) - set(PART_NAMES) - {"engine", "runner"}
    if unknown:
        raise ValueError(f"a step can swap the parts {', '.join(PART_NAMES)}, engine or runner; got {sorted(unknown)}")
    return tuple(changes.items())


def _label(value) -> str:
    return f"{value.__module__.rsplit('.', 1)[-1]}.{value.__qualname__}" if inspect.isclass(value) else repr(value)


STEPS: tuple[Step, ...] = (
    Step("hf_baseline", "01_hf_baseline", "transformers Qwen3MoeForCausalLM, naive per-expert loop, no TP",
         swaps(engine="hf")),
    Step("reference", "02_reference_model", "our readable single-device model, static KV cache, "
         "prefill/decode split", swaps(engine="ours")),
    Step("attention_tp", "03_attention_tp", "attention heads split over ranks, o_proj all-reduce, "
         "vocab-parallel embedding and lm_head",
         swaps(attention=tp.AttentionTP, embedding=tp.VocabParallelEmbedding, lm_head=tp.VocabParallelLMHead),
         tensor_parallel=True),
    Step("merged_qkv", "04_merged_qkv", "q/k/v projections merged into one matmul per rank",
         swaps(attention=tp.AttentionMergedQKV)),
    Step("moe_tp_w13_swiglu", "05_moe_tp_w13_swiglu", "experts split over ranks, gate+up merged into w13, "
         "swiglu op, all-reduce", swaps(moe=tp.MoETPW13), splits_experts=True),
    Step("fused_routing_gmm", "06_fused_routing_gmm", "gating top-k softmax, init routing, grouped matmul, "
         "finalize routing", swaps(moe=fused.FusedRoutingGMM), grouped_experts=True),
    Step("fused_rmsnorm", "07_fused_rmsnorm", "rms_norm / add_rms_norm with the residual add fused",
         swaps(norm=fused.FusedRMSNorm, layer=fused.FusedResidualLayer, model=fused.FusedResidualModel)),
    Step("fused_attention", "08_fused_attention", "fused infer attention score over the static KV cache, "
         "in-place RoPE, scatter_update_ cache writes", swaps(attention=fused.FusedAttention)),
    Step("graph_mode", "09_graph_mode", "decode as one static compiled graph: torchair GE on NPU, "
         "torch.compile elsewhere", swaps(runner=compile.GraphRunner), graph=True),
    Step("compile_cache", "10_compile_cache", "compiled graph cached on disk and reused by the next process",
         swaps(runner=compile.CachedGraphRunner), cached_graph=True),
    Step("aiv", "11_aiv_collectives", "HCCL_OP_EXPANSION_MODE=AIV set by the launcher: collectives "
         "orchestrated on the vector cores", env=(("HCCL_OP_EXPANSION_MODE", "AIV"),)),
)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)


def step(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise ValueError(f"unknown step {name!r}; the ladder is: {', '.join(STEP_NAMES)}")


def first_step(flag: str) -> Step:
    """The first step that declares `flag` (for example "tensor_parallel")."""
    return next(s for s in STEPS if getattr(s, flag))


class _Declared:
    """A Recipe attribute answered by the table: true once any enabled step declares the Step flag
    of the same name."""

    def __set_name__(self, owner, name):
        self.flag = name

    def __get__(self, recipe, owner=None):
        return self if recipe is None else any(getattr(step(name), self.flag) for name in recipe.steps)


@dataclass(frozen=True)
class Recipe:
    """What to build: the engine (transformers or ours), our model's parts, how decode is run
    (eager or a compiled graph), and the enabled steps, whose declarations it answers for."""
    engine: str = "hf"
    parts: Parts = field(default_factory=Parts)
    runner: type = ModelRunner
    steps: tuple[str, ...] = ()

    tensor_parallel = _Declared()           # each True once an enabled step declares it (Step's flags)
    splits_experts = _Declared()
    grouped_experts = _Declared()
    graph = _Declared()
    cached_graph = _Declared()

    @property
    def env(self) -> dict[str, str]:
        """What the enabled steps ask the launcher to set (launch.launcher_env adds the device's own)."""
        return {k: v for name in self.steps for k, v in step(name).env}

    def _ours_from(self) -> str:
        """The step that switched the engine to our model (it supplies every part not swapped since)."""
        return next(name for name in self.steps if ("engine", "ours") in step(name).swaps)

    def part_table(self) -> list[dict]:
        """Which class supplies each part of the model, the step that put it there, and which class
        defines each of its methods (the hooks the ladder overrides)."""
        set_by = {}
        for name in self.steps:
            set_by.update({k: name for k, _ in step(name).swaps if k in PART_NAMES})
        rows = []
        for part in PART_NAMES:
            cls = getattr(self.parts, part)
            hooks = {}
            for klass in reversed(cls.__mro__):
                if klass.__module__.startswith(__package__ + "."):
                    hooks.update({m: _label(klass) for m, v in vars(klass).items()
                                  if inspect.isfunction(v) and (not m.startswith("_") or m == "__init__")})
            rows.append({"part": part, "class": _label(cls), "set_by": set_by.get(part, self._ours_from()),
                         "bases": [_label(k) for k in cls.__mro__ if k.__module__.startswith(__package__ + ".")],
                         "hooks": hooks})
        return rows

    def summary(self) -> str:
        """The model this recipe builds, in one place: each part's class and the step that chose it,
        then, most derived first, the class each of its methods comes from."""
        last = self.steps[-1] if self.steps else "(no step)"
        if self.engine == "hf":
            return f"up to {last}: transformers' Qwen3MoeForCausalLM (no parts of ours)"
        lines = [f"up to {last}: runner {_label(self.runner)}"]
        for row in self.part_table():
            lines.append(f"  {row['part']:9s} {row['class']}  (from {row['set_by']})")
            by_class: dict[str, list[str]] = {}
            for method, owner in row["hooks"].items():
                by_class.setdefault(owner, []).append(method)
            for owner in sorted(by_class, key=row["bases"].index):
                lines.append(f"      {owner + ':':28s} {', '.join(by_class[owner])}")
        return "\n".join(lines)


def recipe_upto(name: str | None = None) -> Recipe:
    """The recipe with every step up to and including `name` (default: all steps)."""
    last = STEP_NAMES.index(step(name or STEP_NAMES[-1]).name)
    recipe = Recipe()
    for s in STEPS[: last + 1]:
        recipe = s.apply(recipe)
    return recipe


def check_parallel(recipe: Recipe, cfg, size: int) -> None:
    """Reject a TP size this recipe and config cannot run, before any process starts."""
    if size == 1:
        return
    if not recipe.tensor_parallel:
        first = first_step("tensor_parallel").name
        raise ValueError(f"--tp {size} needs tensor parallelism, which starts at the {first} step; "
                         f"'{recipe.steps[-1]}' runs on one device (use --tp 1 or --upto {first} or later)")
    for rank in range(size):
        tp.HeadPlan.of(cfg, TP(rank, size))
    TP(0, size).split(cfg.vocab_size, "vocab_size")
    if recipe.splits_experts:
        TP(0, size).split(cfg.moe_intermediate_size, "moe_intermediate_size")
