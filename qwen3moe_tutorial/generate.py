"""Greedy generation under the book's timing protocol (README, "The result JSON").

- A runner (`Runner`) has `prefill(ids [B, S]) -> logits [B, V]`,
  `decode(ids [B, 1], pos: int) -> logits [B, V]` and three facts for the result record:
  our model (any step) or Hugging Face's.
- Timing: batch 1, the device is synchronised before every clock read, prefill and the first
  decode step (which includes any compilation) are reported separately, the decode figure is the
  median of the remaining steps.
- No sampling, no batching of different prompts, no streaming.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from .platform import now_ms


class Runner(Protocol):
    """What greedy_generate drives and what a result record reads from it."""
    compile_s: float            # seconds spent compiling so far (0 when decode is eager)
    bytes_read: int | None      # checkpoint bytes this rank read to build it (None: not counted)
    cache_hit: bool | None      # the compiled graph came from the compile cache (None: no cache)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor: ...


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]                                 # generated ids only
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)  # every decode step, first one included
    first_decode_ms: float | None = None                  # decode step 1 (compilation happens here)
    compile_s: float = 0.0                                # time spent compiling (0 when eager)

    @property
    def decode_ms_per_token(self) -> float | None:
        """Median decode step, excluding the first when there are others (it may include compile)."""
        steady = self.decode_ms[1:] if len(self.decode_ms) > 1 else self.decode_ms
        return statistics.median(steady) if steady else None

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_ms_per_token": self.decode_ms_per_token}


@torch.no_grad()
def greedy_generate(runner: Runner, prompt_ids: list[int], max_new_tokens: int, device_kind: str = "cpu",
                    eos_token_id: int | None = None, device: torch.device | str = "cpu",
                    on_token=None) -> Generation:
    """Generate up to `max_new_tokens` greedy tokens after the prompt (stopping after EOS, which is
    kept, as transformers' `generate` does)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    compiled_before = runner.compile_s
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)       # [1, S]
    t0 = now_ms(device_kind)
    logits = runner.prefill(ids)                                            # [1, V]
    token = int(logits.argmax(dim=-1)[0])
    prefill_ms = now_ms(device_kind) - t0
    gen = Generation(list(prompt_ids), [token], prefill_ms)
    if on_token:
        on_token(token)
    pos = len(prompt_ids)
    while len(gen.token_ids) < max_new_tokens and token != eos_token_id:
        step = torch.tensor([[token]], dtype=torch.long, device=device)     # [1, 1]
        t0 = now_ms(device_kind)
        logits = runner.decode(step, pos)
        token = int(logits.argmax(dim=-1)[0])                               # host copy: the step is done
        gen.decode_ms.append(now_ms(device_kind) - t0)
        gen.token_ids.append(token)
        pos += 1
        if on_token:
            on_token(token)
    gen.first_decode_ms = gen.decode_ms[0] if gen.decode_ms else None
    compiled_now = runner.compile_s
    gen.compile_s = compiled_now if compiled_now != compiled_before else 0.0   # this generation's compile only
    return gen


class ModelRunner:
    """Our model as a Runner, decode eager (positions as a tensor, so shapes stay static)."""

    def __init__(self, model, *, device_kind: str = "cpu", bytes_read: int | None = None):
        self.model, self.device_kind = model, device_kind
        self.compile_s, self.bytes_read, self.cache_hit = 0.0, bytes_read, None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(ids)

    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if pos >= self.model.max_len:
            raise ValueError(f"position {pos} is past the KV cache ({self.model.max_len} positions); "
                             f"use a shorter prompt or fewer new tokens")
        with torch.no_grad():                  # the runner, not model.decode, owns no_grad (as in the recipe)
            return self.model.decode(ids, torch.tensor([pos], device=ids.device), pos + 1)
