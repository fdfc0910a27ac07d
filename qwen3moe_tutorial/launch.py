"""Running a recipe: one generation job, from the launcher's environment to every rank's tokens.

- `GenerationJob` says what to run (checkpoint, prompt, ladder step, TP size, device, cache size);
  `run(job)` is the one launch path: it sets the launcher's environment for the job's recipe and
  device (`launcher_env`), starts the ranks (parallel.run_on_ranks) and returns rank 0's result.
  The CLI, the benchmark, the book and the tests all go through it.
- `build_runner` loads a checkpoint into a recipe's engine: a runner (generate.Runner) that
  `generate.greedy_generate` drives; `generate_on_rank` is one rank's share of a job.
- What each step changes is steps.py's business; this module only asks the recipe.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from . import parallel, platform
from .generate import Generation, Runner, greedy_generate
from .model import DEFAULT_MAX_LEN
from .parallel import TP
from .steps import STEP_NAMES, Recipe, check_parallel, recipe_upto, step


@dataclass(frozen=True)
class GenerationJob:
    """One greedy generation: what every rank needs to load its slices and generate."""
    model_path: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    upto: str = STEP_NAMES[-1]                # the last ladder step enabled
    tp: int = 1                               # ranks (tensor-parallel size)
    device_kind: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_len: int = DEFAULT_MAX_LEN            # KV-cache positions
    eos_token_id: int | None = None           # stop after this token (None: never)
    compile_cache: str | None = None          # compiled-graph cache directory (None: the default)
    profile_dir: str | None = None            # write a profiler trace per rank here
    progress: bool = False                    # a progress bar on rank 0

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        step(self.upto)                       # an unknown step fails here, with the ladder's names

    @property
    def recipe(self) -> Recipe:
        return recipe_upto(self.upto)


def launcher_env(recipe: Recipe, device_kind: str = "cpu") -> dict:
    """Environment variables the launcher sets for this recipe on this device; the user's own
    settings win. On an NPU: the recipe's HCCL, task-queue and allocator settings
    (`platform.NPU_LAUNCH_ENV`), then the steps' own (the aiv step's HCCL_OP_EXPANSION_MODE)."""
    wanted = {**(platform.NPU_LAUNCH_ENV if device_kind == "npu" else {}), **recipe.env}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


@contextlib.contextmanager
def launch_environment(recipe: Recipe, device_kind: str = "cpu"):
    """`launcher_env` in os.environ while the job's ranks start and run (spawned ranks inherit it;
    under torchrun it is in place before the process group is created); taken back afterwards."""
    added = platform.apply_env(launcher_env(recipe, device_kind))
    try:
        yield added
    finally:
        for k in added:
            os.environ.pop(k, None)


def run(job: GenerationJob) -> dict | None:
    """Launch `job`: the launcher's environment, then its ranks. Returns rank 0's result
    (`generate_on_rank`); None on torchrun ranks other than 0."""
    with launch_environment(job.recipe, job.device_kind):
        return parallel.run_on_ranks(generate_on_rank, job.tp, (job,), job.device_kind)


def build_runner(recipe: Recipe, model_path: str, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tp_ctx: TP = TP(), max_len: int = DEFAULT_MAX_LEN,
                 compile_cache: str | None = None) -> Runner:
    """Load the checkpoint into the recipe's engine; return a runner (generate.Runner)."""
    from .hf import HFRunner, load_hf_model
    from .weights import Checkpoint

    ckpt = Checkpoint(model_path)
    check_parallel(recipe, ckpt.config, tp_ctx.size)
    if recipe.engine == "hf":
        ckpt.validate()                            # the same clear errors as our loader
        return HFRunner(load_hf_model(model_path, dtype=dtype, device=device))
    model = recipe.parts.build(ckpt.config, tp_ctx, max_len=max_len, dtype=dtype).load(ckpt)
    graph = dict(steps=recipe.steps, compile_cache=compile_cache) if recipe.graph else {}   # the cache key's
    return recipe.runner(model.to_device(device), device_kind=torch.device(device).type,
                         bytes_read=ckpt.bytes_read, **graph)


def generate_on_rank(tp_ctx: TP, job: GenerationJob) -> dict:
    """One rank's share of a job (run by parallel.run_on_ranks): load this rank's slices, generate
    greedily, and return the generation with every rank's checkpoint bytes and the environment
    the rank ran with."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() != platform.dist_backend(job.device_kind):
        raise ValueError(f"the job runs on {job.device_kind} but the process group uses {dist.get_backend()}; "
                         f"pass device_kind={job.device_kind!r} to run_on_ranks")
    device = platform.torch_device(job.device_kind, int(os.environ.get("LOCAL_RANK", tp_ctx.rank)))
    runner = build_runner(job.recipe, job.model_path, dtype=job.dtype, device=device, tp_ctx=tp_ctx,
                          max_len=job.max_len, compile_cache=job.compile_cache)

    def generate(on_token=None) -> Generation:
        return greedy_generate(runner, list(job.prompt_ids), job.max_new_tokens, job.device_kind,
                               eos_token_id=job.eos_token_id, device=device, on_token=on_token)

    summary = None
    if job.profile_dir:
        gen, summary = profiled_generation(generate, job, os.path.join(job.profile_dir, f"rank{tp_ctx.rank}"))
    elif job.progress and tp_ctx.rank == 0:
        from tqdm.auto import tqdm
        with tqdm(total=job.max_new_tokens, desc="generating", unit="tok", leave=False) as bar:
            gen = generate(on_token=lambda _: bar.update(1))
    else:
        gen = generate()
    bytes_read = [runner.bytes_read]
    if tp_ctx.size > 1:
        bytes_read = [None] * tp_ctx.size
        dist.all_gather_object(bytes_read, runner.bytes_read)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {**gen.to_dict(), "bytes_read_per_rank": bytes_read, "compile_cache_hit": runner.cache_hit,
            "profile": summary, "cpu_affinity": affinity, "env": platform.relevant_env()}


def profiled_generation(generate, job: GenerationJob, out_dir: str):
    """Run `generate` under the profiler: the prefill and the first decode step (compilation) are
    skipped, up to 10 decode steps are recorded; one trace and one summary per rank in out_dir."""
    from . import ops
    from .profile import generation_profiler, quiet_native_stderr, summarize

    n = job.max_new_tokens
    skip = min(2, n - 1)
    active = max(1, min(10, n - skip))
    quiet = job.device_kind != "npu"      # on an NPU, CANN's compile-time messages must reach the user
    with quiet_native_stderr(quiet), ops.annotate_ops(), generation_profiler(out_dir, job.device_kind, active,
                                                                             skip) as prof:
        gen = generate(on_token=lambda _: prof.step())
    try:
        summary = summarize(prof, active, out_dir)
    except Exception as e:            # the NPU profiler parses offline; its summary may not be in memory
        summary = {"error": f"no in-memory summary ({type(e).__name__}: {e}); see the trace in {out_dir}"}
    summary["trace_dir"] = out_dir
    return gen, summary
