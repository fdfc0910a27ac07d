"""Tensor-parallel bookkeeping: which rank am I, which slice is mine, and the explicit collectives.

- `TP` is a small value object handed to every model part; a single process is `TP()` (size 1).
- Collectives are plain functions called visibly in `forward` (never hooks); with one rank they
  return their input untouched, so the reference model pays nothing for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TP:
    rank: int = 0
    size: int = 1
    group: object = None            # a torch.distributed ProcessGroup, or None for the default group

    def split(self, total: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `total` items; a clear error if uneven."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({self.size})")
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n


def all_reduce(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Sum `x` over the TP group in place (and return it)."""
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor, tp: TP) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension, in rank order."""
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)
