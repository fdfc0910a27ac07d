"""The optimization ladder: one ordered table of named steps (README, the book's table of contents).

- A step is one small function `Recipe -> Recipe` that swaps one unit (a model part, the engine).
  "Up to step k" folds steps 1..k, so every step includes the ones before it.
- `build_runner` turns a recipe into something `generate.greedy_generate` can drive.
- No mode flags inside forward: what changes between steps is *which class* runs, never an `if`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import compile, fused, tp
from .generate import ModelRunner
from .model import Parts
from .parallel import TP


@dataclass(frozen=True)
class Recipe:
    """What to build: the engine (transformers or ours), our model's parts, how decode is run
    (eager or a compiled graph), the launcher's environment, and the enabled steps."""
    engine: str = "hf"
    parts: Parts = field(default_factory=Parts)
    runner: type = ModelRunner
    env: tuple[tuple[str, str], ...] = ()
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


def attention_tp(recipe: Recipe) -> Recipe:
    """Heads split over ranks (o_proj all-reduce); embedding and lm_head split over the vocabulary."""
    parts = dataclasses.replace(recipe.parts, attention=tp.AttentionTP, embedding=tp.VocabParallelEmbedding,
                                lm_head=tp.VocabParallelLMHead)
    return dataclasses.replace(recipe, parts=parts)


def merged_qkv(recipe: Recipe) -> Recipe:
    """q, k and v projections of a rank merged into one matmul."""
    return dataclasses.replace(recipe, parts=dataclasses.replace(recipe.parts, attention=tp.AttentionMergedQKV))


def moe_tp_w13_swiglu(recipe: Recipe) -> Recipe:
    """Every expert split along its intermediate dim, gate+up merged into w13, swiglu, all-reduce."""
    return dataclasses.replace(recipe, parts=dataclasses.replace(recipe.parts, moe=tp.MoETPW13))


def fused_routing_gmm(recipe: Recipe) -> Recipe:
    """The expert loop replaced by gating top-k, init routing, two grouped matmuls and finalize."""
    return dataclasses.replace(recipe, parts=dataclasses.replace(recipe.parts, moe=fused.FusedRoutingGMM))


def fused_rmsnorm(recipe: Recipe) -> Recipe:
    """rms_norm / add_rms_norm, with the residual carried through the norms (the recipe's protocol)."""
    parts = dataclasses.replace(recipe.parts, norm=fused.FusedRMSNorm, layer=fused.FusedResidualLayer,
                                model=fused.FusedResidualModel)
    return dataclasses.replace(recipe, parts=parts)


def fused_attention(recipe: Recipe) -> Recipe:
    """In-place RoPE op, scatter_update_ cache writes, fused infer attention score (prefill and decode)."""
    return dataclasses.replace(recipe, parts=dataclasses.replace(recipe.parts, attention=fused.FusedAttention))


def graph_mode(recipe: Recipe) -> Recipe:
    """Decode compiled into one static graph (torchair GE on NPU, torch.compile elsewhere)."""
    return dataclasses.replace(recipe, runner=compile.GraphRunner)


def compile_cache(recipe: Recipe) -> Recipe:
    """The compiled graph cached on disk under a key that covers code, config and versions."""
    return dataclasses.replace(recipe, runner=compile.CachedGraphRunner)


def aiv(recipe: Recipe) -> Recipe:
    """The launcher sets HCCL_OP_EXPANSION_MODE=AIV: collectives orchestrated on the vector cores."""
    return dataclasses.replace(recipe, env=recipe.env + (("HCCL_OP_EXPANSION_MODE", "AIV"),))


STEPS: tuple[Step, ...] = (
    Step("hf_baseline", "01_hf_baseline", "transformers Qwen3MoeForCausalLM, naive per-expert loop, no TP",
         hf_baseline),
    Step("reference", "02_reference_model", "our readable single-device model, static KV cache, "
         "prefill/decode split", reference),
    Step("attention_tp", "03_attention_tp", "attention heads split over ranks, o_proj all-reduce, "
         "vocab-parallel embedding and lm_head", attention_tp),
    Step("merged_qkv", "04_merged_qkv", "q/k/v projections merged into one matmul per rank", merged_qkv),
    Step("moe_tp_w13_swiglu", "05_moe_tp_w13_swiglu", "experts split over ranks, gate+up merged into w13, "
         "swiglu op, all-reduce", moe_tp_w13_swiglu),
    Step("fused_routing_gmm", "06_fused_routing_gmm", "gating top-k softmax, init routing, grouped matmul, "
         "finalize routing", fused_routing_gmm),
    Step("fused_rmsnorm", "07_fused_rmsnorm", "rms_norm / add_rms_norm with the residual add fused", fused_rmsnorm),
    Step("fused_attention", "08_fused_attention", "fused infer attention score over the static KV cache, "
         "in-place RoPE, scatter_update_ cache writes", fused_attention),
    Step("graph_mode", "09_graph_mode", "decode as one static compiled graph: torchair GE on NPU, "
         "torch.compile elsewhere", graph_mode),
    Step("compile_cache", "10_compile_cache", "compiled graph cached on disk and reused by the next process",
         compile_cache),
    Step("aiv", "11_aiv_collectives", "HCCL_OP_EXPANSION_MODE=AIV set by the launcher", aiv),
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


def check_parallel(recipe: Recipe, cfg, size: int) -> None:
    """Reject a TP size this recipe and config cannot run, before any process starts."""
    if size == 1:
        return
    if "attention_tp" not in recipe.steps:
        raise ValueError(f"--tp {size} needs tensor parallelism, which starts at the attention_tp step; "
                         f"'{recipe.steps[-1]}' runs on one device (use --tp 1 or --upto attention_tp or later)")
    for rank in range(size):
        tp.head_plan(cfg, TP(rank, size))
    TP(0, size).split(cfg.vocab_size, "vocab_size")
    if "moe_tp_w13_swiglu" in recipe.steps:
        TP(0, size).split(cfg.moe_intermediate_size, "moe_intermediate_size")


def build_runner(recipe: Recipe, model_path: str, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tp_ctx: TP = TP(), max_len: int = 512,
                 compile_cache: str | None = None):
    """Load the checkpoint into the recipe's engine; return a runner (generate.py protocol)."""
    from .hf import HFRunner, load_hf_model
    from .weights import Checkpoint

    ckpt = Checkpoint(model_path)
    check_parallel(recipe, ckpt.config, tp_ctx.size)
    if recipe.engine == "hf":
        ckpt.validate()                            # the same clear errors as our loader
        return HFRunner(load_hf_model(model_path, dtype=dtype, device=device))
    model = recipe.parts.build(ckpt.config, tp_ctx, max_len=max_len, dtype=dtype).load(ckpt)
    runner = recipe.runner(model.to_device(device), device_kind=torch.device(device).type, steps=recipe.steps,
                           compile_cache=compile_cache)
    runner.bytes_read = ckpt.bytes_read
    return runner


def launcher_env(recipe: Recipe, device_kind: str = "cpu") -> dict:
    """Environment variables the launcher sets for this recipe on this device; the user's own
    settings win. On an NPU: the recipe's HCCL, task-queue and allocator settings
    (`platform.NPU_LAUNCH_ENV`), then the steps' own (the aiv step's HCCL_OP_EXPANSION_MODE)."""
    from . import platform

    wanted = {**(platform.NPU_LAUNCH_ENV if device_kind == "npu" else {}), **dict(recipe.env)}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def generate_on_rank(tp_ctx: TP, job: dict) -> dict:
    """One rank's share of a generation job (run by parallel.run_on_ranks): load this rank's
    slices, generate greedily, and return the generation with every rank's checkpoint bytes."""
    import torch.distributed as dist

    from . import platform
    from .generate import greedy_generate

    if dist.is_initialized() and dist.get_backend() != platform.dist_backend(job["device_kind"]):
        raise ValueError(f"the job runs on {job['device_kind']} but the process group uses {dist.get_backend()}; "
                         f"pass device_kind={job['device_kind']!r} to run_on_ranks")
    device = platform.torch_device(job["device_kind"], int(os.environ.get("LOCAL_RANK", tp_ctx.rank)))
    runner = build_runner(recipe_upto(job["upto"]), job["model_path"], dtype=job["dtype"], device=device,
                          tp_ctx=tp_ctx, max_len=job["max_len"], compile_cache=job.get("compile_cache"))
    generate = lambda on_token=None: greedy_generate(runner, job["prompt_ids"], job["max_new_tokens"],
                                                     job["device_kind"], eos_token_id=job["eos_token_id"],
                                                     device=device, on_token=on_token)
    summary = None
    if job.get("profile_dir"):
        gen, summary = profiled_generation(generate, job, os.path.join(job["profile_dir"], f"rank{tp_ctx.rank}"))
    elif job.get("progress") and tp_ctx.rank == 0:
        from tqdm.auto import tqdm
        with tqdm(total=job["max_new_tokens"], desc="generating", unit="tok", leave=False) as bar:
            gen = generate(on_token=lambda _: bar.update(1))
    else:
        gen = generate()
    bytes_read = [getattr(runner, "bytes_read", None)]
    if tp_ctx.size > 1:
        bytes_read = [None] * tp_ctx.size
        dist.all_gather_object(bytes_read, getattr(runner, "bytes_read", None))
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {**gen.to_dict(), "bytes_read_per_rank": bytes_read,
            "compile_cache_hit": getattr(runner, "cache_hit", None), "profile": summary, "cpu_affinity": affinity}


def profiled_generation(generate, job: dict, out_dir: str):
    """Run `generate` under the profiler: the prefill and the first decode step (compilation) are
    skipped, up to 10 decode steps are recorded; one trace and one summary per rank in out_dir."""
    from . import ops
    from .profile import generation_profiler, quiet_native_stderr, summarize

    n = job["max_new_tokens"]
    skip = min(2, n - 1)
    active = max(1, min(10, n - skip))
    quiet = job["device_kind"] != "npu"      # on an NPU, CANN's compile-time messages must reach the user
    with quiet_native_stderr(quiet), ops.annotate_ops(), generation_profiler(out_dir, job["device_kind"], active,
                                                                             skip) as prof:
        gen = generate(on_token=lambda _: prof.step())
    try:
        summary = summarize(prof, active, out_dir)
    except Exception as e:            # the NPU profiler parses offline; its summary may not be in memory
        summary = {"error": f"no in-memory summary ({type(e).__name__}: {e}); see the trace in {out_dir}"}
    summary["trace_dir"] = out_dir
    return gen, summary
