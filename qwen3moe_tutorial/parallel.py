"""Tensor-parallel bookkeeping and multi-rank execution.

- `TP` is a small value object handed to every model part; a single process is `TP()` (size 1).
- Collectives are plain functions called visibly in `forward` (never hooks); with one rank they
  return their input untouched.
- `run_on_ranks` runs a package function on N ranks: under torchrun it just joins the job;
  otherwise it spawns N worker processes (gloo on CPU, one device per rank on NPU/GPU) and returns
  rank 0's result. If a rank fails, the others are stopped and the error names the failed rank.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import platform

# How long a collective may wait for the slowest rank. On an NPU ranks load tens of GB each before
# their first collective after the warm-up, so the process-group timeout is longer there.
COLLECTIVE_TIMEOUT_S = {"npu": 3600, "cuda": 600, "cpu": 300}
TIMEOUT_ENV = "QWEN3MOE_COLLECTIVE_TIMEOUT"


def collective_timeout_s(device_kind: str) -> int:
    """The process-group timeout for this device kind; $QWEN3MOE_COLLECTIVE_TIMEOUT wins."""
    return int(os.environ.get(TIMEOUT_ENV) or COLLECTIVE_TIMEOUT_S[device_kind])


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


class RankError(RuntimeError):
    """A rank of a multi-rank run failed; the message names it."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank


# ---- collectives -----------------------------------------------------------------------------
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


# ---- joining a job ---------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def init_distributed(device_kind: str, store=None, rank: int | None = None, world_size: int | None = None) -> TP:
    """Join the process group (HCCL / NCCL / gloo by device), pin this rank's device (and on an NPU its
    CPUs, as the recipe's launcher does), and run one small all-reduce so the links exist before any
    rank spends minutes loading its shard: a rank that cannot connect fails here, not at layer 0."""
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device_kind == "npu":
        torch.npu.set_device(local_rank)
        platform.pin_rank_cpus(local_rank, local_world)
    elif device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    else:   # share the cores: N ranks on a few CPUs must not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    kwargs = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
    dist.init_process_group(platform.dist_backend(device_kind),
                            timeout=datetime.timedelta(seconds=collective_timeout_s(device_kind)), **kwargs)
    tp = TP(rank=dist.get_rank(), size=dist.get_world_size())
    all_reduce(torch.ones(1, device=platform.torch_device(device_kind, local_rank)), tp)   # links up now
    return tp


# ---- running a function on N ranks -----------------------------------------------------------
def _exit_if_orphaned(parent: int) -> None:
    """Worker-side watchdog: leave as soon as the launching process is gone (no orphans)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def _worker(fn, rank: int, world_size: int, store_path: str, device_kind: str, args: tuple, results) -> None:
    threading.Thread(target=_exit_if_orphaned, args=(os.getppid(),), daemon=True).start()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        store = dist.FileStore(store_path, world_size)
        tp = init_distributed(device_kind, store=store, rank=rank, world_size=world_size)
        value = fn(tp, *args)
        results.put(("ok", rank, value if rank == 0 else None))
    except BaseException as e:                       # report, never hang the others
        detail = str(e) if isinstance(e, (ValueError, RuntimeError, OSError)) and str(e) else \
            "".join(traceback.format_exception(e)[-3:]).strip()
        results.put(("error", rank, f"{type(e).__name__}: {detail}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def spawn(fn, world_size: int, args: tuple = (), device_kind: str = "cpu", timeout_s: float = 900):
    """Run `fn(tp, *args)` in `world_size` fresh processes; return rank 0's value.

    `fn` must be importable (a package function): workers are started with the "spawn" method.
    The first rank to fail stops the run: every worker is terminated and RankError names it."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if device_kind != "cpu" and world_size > platform.device_count(device_kind):
        raise ValueError(f"{world_size} ranks need {world_size} {device_kind} devices; "
                         f"{platform.device_count(device_kind)} are visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="qwen3moe-rdzv-") as tmp:
        procs = [ctx.Process(target=_worker, daemon=True, name=f"qwen3moe-rank{r}",
                             args=(fn, r, world_size, os.path.join(tmp, "store"), device_kind, args, results))
                 for r in range(world_size)]
        try:
            with _sigint_blocked():
                for p in procs:
                    p.start()
            return _collect(procs, results, timeout_s)
        finally:
            _stop(procs)


@contextlib.contextmanager
def _sigint_blocked():
    """Start workers with SIGINT blocked: they inherit the mask and never see Ctrl-C (a rank interrupted
    while it imports torch would print a traceback); the launcher gets it as soon as the mask is
    restored, and stops them (`_stop`)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "pair.cc", "Timed out")


def _collect(procs, results, timeout_s: float):
    done, value = set(), None
    deadline = time.monotonic() + timeout_s
    while len(done) < len(procs):
        try:
            status, rank, payload = results.get(timeout=0.2)
        except queue.Empty:
            if any(r not in done and p.exitcode not in (None, 0) for r, p in enumerate(procs)):
                _raise_root_cause(procs, results, {})
            if time.monotonic() > deadline:
                missing = sorted(set(range(len(procs))) - done)
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s") from None
            continue
        if status == "error":
            _raise_root_cause(procs, results, {rank: payload})
        done.add(rank)
        if rank == 0:
            value = payload
    return value


def _raise_root_cause(procs, results, errors: dict):
    """One rank failed: gather what the others report for a moment, then blame the root cause —
    a rank that died without a word, else one whose error is not just a lost peer."""
    time.sleep(1.0)
    while True:
        try:
            status, rank, payload = results.get(timeout=0.2)
        except queue.Empty:
            break
        if status == "error":
            errors.setdefault(rank, payload)
    silent = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in errors]
    if silent:
        rank, message = silent[0], (f"process exited with code {procs[silent[0]].exitcode} "
                                    f"(killed or crashed) without reporting an error")
    else:
        own = [r for r, m in errors.items() if not any(w in m for w in PEER_LOSS)]
        rank = min(own) if own else min(errors)
        message = errors[rank]
    others = sorted(set(errors) - {rank})
    if others:
        message += f" (then ranks {others} lost their peers)"
    raise RankError(rank, message) from None


def run_on_ranks(fn, world_size: int, args: tuple = (), device_kind: str = "cpu"):
    """`fn(tp, *args)` on `world_size` ranks: in-process for one rank, as part of the job under
    torchrun, spawned workers otherwise. Returns rank 0's value (None on other torchrun ranks)."""
    if launched_by_torchrun():
        tp = init_distributed(device_kind)
        if tp.size != world_size:
            raise ValueError(f"--tp {world_size} but torchrun started {tp.size} processes; "
                             f"use --nproc-per-node {world_size} (times --nnodes)")
        try:
            value = fn(tp, *args)
        finally:
            dist.destroy_process_group()
        return value if tp.rank == 0 else None
    if world_size == 1:
        return fn(TP(), *args)
    return spawn(fn, world_size, args, device_kind)


def allreduce_selftest(tp: TP, fail_rank: int | None = None, crash_rank: int | None = None) -> dict:
    """Each rank contributes rank+1; returns the sum seen by rank 0. `fail_rank` raises and
    `crash_rank` dies abruptly (os._exit) after the first collective: used to test failure paths."""
    x = torch.tensor([float(tp.rank + 1)])
    all_reduce(x, tp)
    if tp.rank == fail_rank:
        raise ValueError(f"injected failure on rank {tp.rank}")
    if tp.rank == crash_rank:
        os._exit(13)
    all_reduce(x, tp)                                 # survivors block here until stopped
    return {"world_size": tp.size, "sum": x.item()}


def allreduce_benchmark(tp: TP, sizes_bytes: list[int], iters: int = 50, warmup: int = 5,
                        dtype: torch.dtype = torch.bfloat16, device_kind: str = "cpu") -> dict:
    """Median latency (µs) of an all-reduce per message size, measured on every rank; rank 0's
    numbers are returned with the environment that chose the algorithm (HCCL_OP_EXPANSION_MODE)."""
    if device_kind == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32 if not _gloo_supports(dtype) else dtype
    device = platform.torch_device(device_kind, int(os.environ.get("LOCAL_RANK", tp.rank)))
    element = torch.tensor([], dtype=dtype).element_size()
    out = {"sizes_bytes": [], "median_us": [], "dtype": str(dtype), "world_size": tp.size,
           "env": platform.relevant_env()}
    for size in sizes_bytes:
        x = torch.ones(max(1, size // element), dtype=dtype, device=device)
        times = []
        for i in range(warmup + iters):
            all_reduce(x, tp)                          # the clock reads below synchronise the device
            t0 = platform.now_ms(device_kind)
            all_reduce(x, tp)
            if i >= warmup:
                times.append((platform.now_ms(device_kind) - t0) * 1e3)
        times.sort()
        out["sizes_bytes"].append(x.numel() * element)
        out["median_us"].append(times[len(times) // 2])
    return out


def _gloo_supports(dtype: torch.dtype) -> bool:
    try:
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        dist.all_reduce(torch.ones(1, dtype=dtype), group=group)
        return True
    except (RuntimeError, TypeError):
        return False
