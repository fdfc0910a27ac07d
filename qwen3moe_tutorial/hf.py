"""The `hf_baseline` step: transformers' own Qwen3MoeForCausalLM, as a user would run it.

- Experts run through transformers' naive per-expert loop (`experts_implementation="eager"`).
- A DynamicCache and one forward per token: what `model.generate` does, minus sampling logic,
  so it can be timed step by step under the same protocol as our model.
- Single device only; this is the yardstick, not something we optimise.
"""
from __future__ import annotations

import torch

from .platform import now_ms


def load_hf_model(model_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  experts_implementation: str = "eager"):
    """transformers' Qwen3MoeForCausalLM from a checkpoint directory, in eval mode."""
    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model = Qwen3MoeForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                    experts_implementation=experts_implementation)
    finally:
        if shown:                                  # leave the caller's setting as it was
            logging.enable_progress_bar()
    return model.to(device).eval()


class HFRunner:
    """Runner protocol (see generate.py) over a transformers model and its DynamicCache."""

    def __init__(self, model, device_kind: str = "cpu"):
        self.model, self.device_kind = model, device_kind
        self.cache = None
        # the Runner facts: eager, so nothing compiled; transformers reads the checkpoint, we do not
        # count its bytes; no compile cache
        self.compile_s, self.bytes_read, self.cache_hit = 0.0, None, None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()                                   # [B, V]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True)
        return out.logits[:, -1].float()                                   # [B, V]


class HFCompiledRunner(HFRunner):
    """Hugging Face at its fastest on this machine: grouped_mm experts (load with
    experts_implementation="grouped_mm"), a StaticCache and the decode forward under torch.compile.
    The peer our benchmark must beat, measured by the same protocol."""

    def __init__(self, model, max_len: int = 512, device_kind: str = "cpu"):
        from .compile import fresh_compile_state, private_inductor_cache

        super().__init__(model, device_kind)
        self.max_len = max_len
        fresh_compile_state(private_inductor_cache())      # compile from scratch, like our graph steps
        self.compiled = torch.compile(model.forward, fullgraph=True)
        self.first = True

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import StaticCache

        if self.cache is None:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        else:
            self.cache.reset()
        positions = torch.arange(ids.shape[1], device=ids.device)
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, cache_position=positions, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        # the compile is timed like every other timer: the device synchronised before each clock read
        t0 = now_ms(self.device_kind) if self.first else None
        out = self.compiled(input_ids=ids, cache=self.cache, use_cache=True,
                            cache_position=torch.tensor([pos], device=ids.device))
        if self.first:
            self.compile_s, self.first = (now_ms(self.device_kind) - t0) / 1e3, False
        return out.logits[:, -1].float()
