"""What the book's chapters share: the chapter's device, dtype and checkpoint, the fit check that
keeps a cell inside one device's memory, and the small measurements every chapter makes.

- `Chapter(step)` is a notebook's first cell: the device and dtype (bfloat16 on an NPU or GPU,
  float32 on a CPU), the book's checkpoint ($QWEN3MOE_MODEL_PATH or the embedded default) and the
  prompt. `chapter.model_for(tp, copies)` is the checkpoint a cell can run: the book's where its
  resident bytes per rank fit one device, else the embedded default, with a visible note why.
  `run`, `build`, `pair` and `ladder` go through it, so no cell loads a 30B model onto one die,
  and the Hugging Face model and ours never share a device.
- `max_logit_diff`, `ops_of`, `op_histogram`: the correctness and operator counts of the chapters.
- `show_table` prints the Markdown tables `tests/test_book_consistency.py` reads back; `human`
  formats numbers for people.
- Not a second launcher: runs go through `launch` and `benchmark`, as the CLI's do.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass

import torch

from . import launch, platform, roofline
from .config import ModelConfig, preset
from .final import DTYPES, default_dtype
from .parallel import TP
from .steps import STEP_NAMES, STEPS, recipe_upto, step as ladder_step

PROMPT = "The Ascend NPU decodes one token at a time."
HEADROOM = 0.85        # weights may take this fraction of a device: the rest is the KV cache, workspace, runtime


# ---- fitting a cell onto the devices ----------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """Whether `copies` models of `cfg` at TP `tp` fit this machine's devices, and why not."""
    tp: int
    copies: int                   # models resident at once (HF and ours: 2), each on its own devices
    bytes_per_rank: int           # weights one rank holds (roofline.resident_bytes_at_step)
    bytes_per_device: int         # what the fullest device must hold
    device_bytes: int             # one device's memory (platform.device_memory_bytes)
    devices_needed: int
    devices: int
    reason: str | None            # None when it fits

    @property
    def fits(self) -> bool:
        return self.reason is None


def check_fit(cfg: ModelConfig, tp: int = 1, *, copies: int = 1, dtype: torch.dtype = torch.float32,
              device_kind: str = "cpu", step: str = STEP_NAMES[-1]) -> Fit:
    """Resident weight bytes per rank with the ladder up to `step` (roofline.resident_bytes_at_step:
    before `moe_tp_w13_swiglu` every rank holds every expert whole) against one device's memory
    (times HEADROOM). On an NPU or GPU
    each rank has a device of its own and each copy its own ranks' devices; on a CPU every rank of
    every copy shares the one RAM, unless $QWEN3MOE_DEVICE_MEMORY is set: then each CPU rank plays
    one device of that size (how the decision is rehearsed without an accelerator)."""
    per_rank = roofline.resident_bytes_at_step(cfg, tp, step, torch.finfo(dtype).bits // 8)
    device_bytes = platform.device_memory_bytes(device_kind)
    shared = device_kind == "cpu" and not os.environ.get(platform.DEVICE_MEMORY_ENV)
    per_device = per_rank * tp * copies if shared else per_rank
    needed = 1 if shared else tp * copies
    have = needed if device_kind == "cpu" else platform.device_count(device_kind)
    reason = None
    if per_device > HEADROOM * device_bytes:
        what = f"{copies} models at TP {tp}" if copies > 1 else f"TP {tp}"
        reason = (f"{what} in {str(dtype).removeprefix('torch.')} needs {human(per_device, 'B')} of weights per "
                  f"{'machine' if shared else 'device'}, more than {HEADROOM:.0%} of this {device_kind}'s "
                  f"{human(device_bytes, 'B')}")
    elif needed > have:
        reason = f"{copies} models at TP {tp} need {needed} devices, one per rank and model; {have} are visible"
    return Fit(tp, copies, per_rank, per_device, device_bytes, needed, have, reason)


# ---- a chapter's setting -------------------------------------------------------------------------------
class Chapter:
    """A notebook's device, dtype, checkpoint and prompt; prints them as the chapter's first output."""

    def __init__(self, step: str | None = None, prompt: str = PROMPT, quiet: bool = False):
        from .weights import MODEL_PATH_ENV, Checkpoint, book_checkpoint, default_checkpoint

        if step is not None:
            ladder_step(step)                                  # an unknown step fails here
        self.step = step
        self.prompt = prompt
        self.device_kind = platform.detect_device()
        self.device = platform.torch_device(self.device_kind)
        self.dtype = DTYPES[default_dtype(self.device_kind)]       # the CLI's rule: bf16 on an accelerator
        self.model_path = book_checkpoint()
        self.embedded_path = default_checkpoint(quiet=True)
        self.embedded = os.path.realpath(self.model_path) == os.path.realpath(self.embedded_path)
        self.ckpt = Checkpoint(self.model_path)
        self.cfg = self.ckpt.config
        if not quiet:
            print(platform.describe(self.device_kind))
            source = "the embedded default" if self.embedded else f"${MODEL_PATH_ENV}"
            print(f"model: {self.cfg.name} ({source}); dtype {str(self.dtype).removeprefix('torch.')}; "
                  f"each device holds {human(platform.device_memory_bytes(self.device_kind), 'B')}")
        self.notes: list[str] = []

    # the checkpoint a cell can run -----------------------------------------------------------------
    def model_for(self, tp: int = 1, copies: int = 1, dtype: torch.dtype | None = None, step: str | None = None) -> str:
        """The book's checkpoint if `copies` of it fit at TP `tp` with the ladder up to `step` (default:
        the chapter's), else the embedded default; the fallback prints one note saying why (once per
        reason)."""
        fit = check_fit(self.cfg, tp, copies=copies, dtype=dtype or self.dtype, device_kind=self.device_kind,
                        step=step or self.step or STEP_NAMES[-1])
        if fit.fits or self.embedded:
            return self.model_path
        note = f"Note: this cell runs on the embedded model, not {self.cfg.name}: {fit.reason}."
        if note not in self.notes:
            self.notes.append(note)
            print(note)
        return self.embedded_path

    @functools.lru_cache(maxsize=None)
    def tokenizer(self, model_path: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)

    def prompt_ids(self, model_path: str | None = None) -> list[int]:
        """The chapter's prompt, tokenized by `model_path`'s tokenizer (default: the book's model)."""
        return list(self.tokenizer(model_path or self.model_path)(self.prompt)["input_ids"])

    def decode_text(self, ids, model_path: str | None = None) -> str:
        return self.tokenizer(model_path or self.model_path).decode(list(ids))

    # running a step -------------------------------------------------------------------------------
    def run(self, upto: str, tp: int = 1, n_new: int = 16, model_path: str | None = None, **job) -> dict:
        """Greedy tokens of the ladder up to `upto` on `tp` ranks (launch.run): rank 0's record, with
        the checkpoint it ran on under "model_path"."""
        path = model_path or self.model_for(tp, step=upto)
        prompt_ids = self.prompt_ids(path)
        job = launch.GenerationJob(path, prompt_ids, n_new, upto=upto, tp=tp, device_kind=self.device_kind,
                                   dtype=job.pop("dtype", self.dtype), max_len=job.pop("max_len", 64), **job)
        return {**launch.run(job), "model_path": path}

    def build(self, upto: str, tp_ctx: TP = TP(), model_path: str | None = None, device=None,
              dtype: torch.dtype | None = None, max_len: int = 64):
        """One rank's runner of the ladder up to `upto`, in this process."""
        path = model_path or self.model_for(tp_ctx.size, step=upto)
        device = torch.device(device or self.device)
        runner = launch.build_runner(recipe_upto(upto), path, dtype=dtype or self.dtype, device=device,
                                     tp_ctx=tp_ctx, max_len=max_len)
        runner.device = device                        # where max_logit_diff sends its inputs
        return runner

    def pair(self, upto: str, other: str = STEP_NAMES[0]):
        """Runners of `upto` and `other` (the ladder's first step, Hugging Face's model, by default), both resident for a side-by-side
        comparison: on an accelerator each on its own device, on the book's model if two copies fit,
        else on the embedded one. Returns (ours, theirs, model_path)."""
        path = self.model_for(1, copies=2, step=upto)
        two = self.device_kind != "cpu" and platform.device_count(self.device_kind) > 1
        second = platform.torch_device(self.device_kind, 1) if two else self.device   # the tiny model may share
        return self.build(upto, model_path=path), self.build(other, model_path=path, device=second), path

    def ladder(self, upto: str | None = None, new_tokens: int = 16) -> list[dict]:
        """The book's cumulative table up to `upto` (default: this chapter's step), one row per step,
        at TP 1 on the checkpoint that fits one device: tokens equal to Hugging Face's, operators per
        decode token, and the A3 prediction for the book's two configurations."""
        from . import benchmark

        upto = upto or self.step or STEP_NAMES[-1]
        path = self.model_for(1, copies=1, step=upto)
        rows = benchmark.ladder_table(path, self.prompt_ids(path), upto=upto, new_tokens=new_tokens,
                                      device_kind=self.device_kind, dtype=self.dtype, repeats=1)
        return [{"step": r["step"], "tokens_ok": r["tokens_ok"], "ops_per_token": r["ops_per_token"],
                 "token_ids": r["token_ids"], "model": os.path.basename(os.path.normpath(path))} for r in rows]


# ---- the predicted A3 ladder ---------------------------------------------------------------------------
def a3_columns() -> dict[str, dict[str, float]]:
    """Column header -> {step: predicted A3 ms per token}, for the book's configurations (roofline)."""
    cols = {}
    first_tp = next(s.name for s in STEPS if s.tensor_parallel)
    for name, tp in roofline.BOOK_CONFIGS:
        label = name.removeprefix("qwen3-").upper()
        cols[f"predicted A3 ms/token, {label} (TP {tp} from {first_tp})"] = {
            r["step"]: r["total_ms"] for r in roofline.predict_ladder(preset(name), tp)}
    return cols


def show_ladder(rows: list[dict]) -> None:
    """The cumulative table: measured tokens and operators per token next to the predicted A3 rows."""
    a3 = a3_columns()
    header = ["step", "tokens == HF", f"ops/token ({rows[0]['model']}, TP 1)", *a3]
    table = [[r["step"], "yes" if r["tokens_ok"] else "NO",
              "-" if r["ops_per_token"] is None else f"{r['ops_per_token']:.0f}",
              *(f"{col[r['step']]:.1f}" for col in a3.values())] for r in rows]
    show_table(header, table)


# ---- correctness and operator counts ----------------------------------------------------------------------
def max_logit_diff(a, b, prompt_ids: list[int], n_steps: int = 16, device="cpu") -> float:
    """Largest |logit difference| between runners `a` and `b` fed the same tokens (b's greedy choices):
    a prefill of the prompt, then `n_steps` decode steps. Logits are compared on the CPU in float32, so
    two runners on different devices can be compared."""
    ids = torch.tensor([prompt_ids])
    dev = lambda r: getattr(r, "device", None) or device
    la, lb = a.prefill(ids.to(dev(a))), b.prefill(ids.to(dev(b)))
    f32 = lambda t: t.detach().float().cpu()
    diff = (f32(la) - f32(lb)).abs().max().item()
    for pos in range(len(prompt_ids), len(prompt_ids) + n_steps):
        token = f32(lb).argmax(-1, keepdim=True)
        la, lb = a.decode(token.to(dev(a)), pos), b.decode(token.to(dev(b)), pos)
        diff = max(diff, (f32(la) - f32(lb)).abs().max().item())
    return diff


def ops_of(fn, *args) -> tuple[float, Counter]:
    """(operators, histogram) of one call of fn, counted as profile.ops_per_token counts a decode
    step (a fused op is one operator: it is one kernel on the NPU)."""
    from torch.profiler import ProfilerActivity, profile

    from . import ops
    from .profile import ops_per_token, quiet_native_stderr

    fn(*args)                                                       # warm-up
    with torch.no_grad(), quiet_native_stderr(), ops.annotate_ops(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    prof.steps = 1
    return ops_per_token(prof)


def op_histogram(runner, prompt_ids: list[int], device="cpu", steps: int = 2) -> Counter:
    """Operators per decode token by name (profile.profile_decode over `steps` decode steps)."""
    from .profile import ops_per_token, profile_decode

    prof = profile_decode(runner, prompt_ids, steps=steps, warmup=1, device=device)
    return Counter({name: n / prof.steps for name, n in ops_per_token(prof)[1].items()})


# ---- tables and numbers for people ----------------------------------------------------------------------
def show_table(header: list[str], rows: list[list], caption: str | None = None) -> None:
    """A Markdown table as a cell's output (and as plain text where Markdown does not render). A
    caption goes on the line above in italics; the consistency test keys a table's values by it."""
    from IPython.display import Markdown, display

    cell = lambda v: str(v).replace("|", "\\|")
    lines = ([f"*{caption}*", ""] if caption else []) + [
        "| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(map(cell, r)) + " |" for r in rows)]
    display(Markdown("\n".join(lines)))


def human(x: float, unit: str = "", digits: int = 3) -> str:
    """2172000 -> "2.17 M"; with unit "B", bytes in SI units ("61.1 GB")."""
    x = float(x)
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()
