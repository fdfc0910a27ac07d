"""Device and backend detection: which accelerator is here, how to synchronise it, how to time.

- One place decides "npu", "cuda" or "cpu"; everything else asks this module.
- torch_npu is imported only when asked for and only if it is installed; a CPU box never needs it.
- Not a device abstraction layer: code that differs per device lives in ops/ and compile.py.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import time

import torch

DEVICE_KINDS = ("npu", "cuda", "cpu")


_NPU_ENV_ADDED: dict[str, str] = {}        # what torch_npu_module set before the import


@functools.lru_cache(maxsize=None)
def torch_npu_module():
    """Return the imported torch_npu module, or None if it is not installed or cannot load.

    This is the one place the package imports torch_npu, so the launcher's NPU settings
    (`NPU_LAUNCH_ENV`, read when the NPU runtime starts) go into the environment just before it,
    for every caller: the CLI, the benchmark, the book. They are taken back if no NPU turns up
    (`detect_device`), so a CPU run does not claim them."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    _NPU_ENV_ADDED.update(apply_env(NPU_LAUNCH_ENV))
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and torch.ops.npu)
    except Exception:  # installed but the CANN runtime is missing or broken
        _take_back_npu_env()
        return None
    return torch_npu


def _take_back_npu_env() -> None:
    for k, v in _NPU_ENV_ADDED.items():
        if os.environ.get(k) == v:
            del os.environ[k]
    _NPU_ENV_ADDED.clear()


def torch_npu_installed() -> bool:
    """True when a torch_npu package is installed (found without importing it)."""
    return importlib.util.find_spec("torch_npu") is not None


def npu_available() -> bool:
    """True when torch_npu imports and at least one Ascend device is visible."""
    mod = torch_npu_module()
    return mod is not None and hasattr(torch, "npu") and torch.npu.is_available()


def detect_device(requested: str = "auto") -> str:
    """Resolve "auto" to the best device kind here; check an explicit request is possible."""
    if requested not in ("auto", *DEVICE_KINDS):
        raise ValueError(f"device must be one of auto, npu, cuda, cpu; got {requested!r}")
    if requested == "auto":
        kind = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    elif requested == "npu" and not npu_available():
        _take_back_npu_env()
        raise RuntimeError("--device npu was requested but torch_npu is not installed or sees no NPU "
                           "(install requirements-npu.txt and source CANN's set_env.sh)")
    elif requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
    else:
        kind = requested
    if kind != "npu":
        _take_back_npu_env()
    return kind


def torch_device(kind: str, local_rank: int = 0) -> torch.device:
    """The torch.device for this process: one accelerator per rank, the CPU otherwise."""
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, local_rank)


def dist_backend(kind: str) -> str:
    """torch.distributed backend for a device kind: HCCL on NPU, NCCL on CUDA, gloo on CPU."""
    return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[kind]


def synchronize(kind: str) -> None:
    """Wait for queued device work; every timer read is preceded by this (timing protocol)."""
    if kind == "npu":
        torch.npu.synchronize()
    elif kind == "cuda":
        torch.cuda.synchronize()


def device_count(kind: str) -> int:
    if kind == "npu":
        return torch.npu.device_count()
    if kind == "cuda":
        return torch.cuda.device_count()
    return 1


DEVICE_MEMORY_ENV = "QWEN3MOE_DEVICE_MEMORY"     # pretend each device holds this much ("16GB", "512MiB", bytes)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """"64GB", "1.5 GiB", "4096" -> bytes; one clear ValueError for anything else."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{DEVICE_MEMORY_ENV}={text!r} is not a size; expected a positive number of bytes "
                         f"with an optional unit, e.g. 64GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def device_memory_bytes(kind: str) -> int:
    """Memory of ONE device of this kind: an NPU die's or a GPU's total memory, a CPU's physical RAM
    (every CPU rank shares it). $QWEN3MOE_DEVICE_MEMORY overrides it, so the book's fit checks can
    be exercised on a machine with more memory than the device they plan for."""
    if os.environ.get(DEVICE_MEMORY_ENV):
        return parse_bytes(os.environ[DEVICE_MEMORY_ENV])
    if kind == "npu":
        return int(torch.npu.mem_get_info()[1])
    if kind == "cuda":
        return int(torch.cuda.mem_get_info()[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def now_ms(kind: str) -> float:
    """Milliseconds on a monotonic clock, after synchronising the device."""
    synchronize(kind)
    return time.perf_counter() * 1e3


def versions() -> dict:
    """Versions that a result record must name (the timing protocol of `generate.py`)."""
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "python": ".".join(map(str, __import__("sys").version_info[:3]))}
    npu = torch_npu_module()
    out["torch_npu"] = getattr(npu, "__version__", None) if npu else None
    out["cann"] = os.environ.get("ASCEND_TOOLKIT_HOME") and _cann_version()
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    return out


def _cann_version() -> str | None:
    home = os.environ.get("ASCEND_TOOLKIT_HOME", "")
    for name in ("version.cfg", "ascend_toolkit_install.info"):
        path = os.path.join(home, name)
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if "version" in line.lower() and "=" in line:
                        return line.split("=", 1)[1].strip()
    return None


def git_commit() -> str | None:
    """HEAD of the package's git checkout, with "-dirty" when tracked files differ (None outside git)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def provenance(env: dict | None = None) -> dict:
    """What every result record names (the CLI's JSON and the benchmark's files): commit, library
    versions, the performance-relevant environment (`env`: a rank's own, when it was recorded
    there), the host and a UTC timestamp."""
    import datetime
    import platform as _p

    cpu = _p.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"commit": git_commit(), "versions": versions(), "env": relevant_env() if env is None else env,
            "host": {"hostname": _p.node(), "machine": _p.machine(), "cpu": cpu, "cpus": os.cpu_count(),
                     "torch_threads": torch.get_num_threads()},
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# What the recipe's launcher sets on an A3 node (cann-recipes-infer `executor/scripts/function.sh`
# and `models/qwen3_moe/models/model_setting.py`): HCCL builds its links
# at the first collective with a 120 s default timeout, shorter than ranks may drift apart while each
# loads tens of GB; TASK_QUEUE_ENABLE=2 is the recipe's task queue for GE graph mode; the expandable
# allocator avoids fragmentation across the KV cache and weights. The user's own settings win.
NPU_LAUNCH_ENV = {
    "HCCL_CONNECT_TIMEOUT": "1200",
    "HCCL_EXEC_TIMEOUT": "1200",
    "TASK_QUEUE_ENABLE": "2",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
}


def apply_env(env: dict) -> dict:
    """Set each variable that is not already set (the user's value wins); return what was added."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    return added


def pin_rank_cpus(local_rank: int, local_world: int) -> list[int] | None:
    """Pin this process to its own block of the CPUs it may use, as the recipe's launcher does with
    `taskset` (cores / ranks per node, contiguous). Returns the CPUs, or None where it cannot pin
    (fewer CPUs than ranks, or no sched_setaffinity)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))        # a user's own taskset narrows this set first
    per_rank = len(allowed) // max(local_world, 1)
    if per_rank < 1:
        return None
    mine = allowed[local_rank * per_rank:(local_rank + 1) * per_rank]
    os.sched_setaffinity(0, mine)
    return mine


ENV_PREFIXES = ("HCCL_", "TASK_QUEUE", "PYTORCH_NPU", "ASCEND_", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "TORCHINDUCTOR_", "NCCL_", "CUDA_VISIBLE", "MASTER_", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def relevant_env() -> dict:
    """The environment variables that change performance or placement, as recorded in results."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def describe(kind: str | None = None) -> str:
    """One line naming the hardware and software that produced a notebook's outputs."""
    import platform as _p

    kind = kind or detect_device()
    v = versions()
    if kind == "npu":
        what = f"NPU {torch.npu.get_device_name(0)} x{device_count(kind)}, torch_npu {v['torch_npu']}, CANN {v['cann']}"
    elif kind == "cuda":
        what = f"GPU {torch.cuda.get_device_name(0)} x{device_count(kind)}"
    else:
        n = torch.get_num_threads()
        what = f"CPU ({_p.machine()}, {os.cpu_count()} cores, {n} torch thread{'s' * (n != 1)}), reference kernels"
    return f"{what}; torch {v['torch']}, transformers {v['transformers']}"
