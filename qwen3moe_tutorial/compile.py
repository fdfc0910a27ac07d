"""Graph mode and the compile cache (ladder steps graph_mode, compile_cache; chapters 09-10).

- `GraphRunner` compiles the decode step into one static graph: torchair's GE backend on an NPU
  (the recipe's CompilerConfig), CUDA graphs on a GPU, inductor on a CPU (with `DecodeGEMV`, which
  lets inductor generate the one-row matmuls itself); always fullgraph=True, so a graph break is
  an error, and the KV cache is marked static. Prefill stays eager.
- `CachedGraphRunner` keeps the compiled graph on disk for the next process, under a key that
  covers everything that changes the graph (config, steps, TP size and rank, dtype, package source,
  library versions): torchair hashes only the module repr and runs loaded graphs without guards.
- Without the cache every process compiles from scratch (a private inductor cache directory), so
  the two steps can be compared honestly.
"""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import platform
from .generate import ModelRunner
from .weights import cache_root, file_sha256

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "manifest.json"


# ---- compiling -----------------------------------------------------------------------------------
def npu_compiler_config(mode: str = "max-autotune"):
    """torchair's CompilerConfig as the recipe sets it (cann-recipes-infer `runner_qwen3_moe.py`, `graph_compile`)."""
    from torch_npu.dynamo import torchair

    config = torchair.CompilerConfig()
    config.experimental_config.frozen_parameter = True
    config.experimental_config.tiling_schedule_optimize = True
    config.experimental_config.topology_sorting_strategy = "StableRDFS"
    if mode == "reduce-overhead":                          # ACL graph capture instead of a GE graph
        config.mode = "reduce-overhead"
    return config


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for one row x as multiply-and-sum: inductor turns it into a single vectorized,
    multi-threaded reduction that streams w [out, in] along its contiguous `in` axis."""
    return (x.unsqueeze(-2) * w).sum(-1)


class DecodeGEMV(CustomGraphPass):
    """Inductor pre-grad pass (CPU only): every bias-free F.linear on a single row becomes `gemv`.

    At batch 1 each decode matmul is a matrix-vector product. Left alone, inductor hands it to the
    BLAS library, whose single-row kernel here reads weights at about half the memory bandwidth and
    on one core (chapter 09 measures both). The NPU needs no such pass: its matmul kernels are
    built for this shape. `uuid` puts the pass's source in inductor's cache key.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (torch._C._nn.linear, torch.nn.functional.linear):
                continue
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            val = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
            if bias is not None or val is None or not statically_known_true(val.numel() == val.shape[-1]):
                continue                                   # more than one row: BLAS is the right tool
            with graph.inserting_before(node):
                new = graph.call_function(gemv, (x, w))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)

    def uuid(self) -> str:
        return hashlib.sha256((inspect.getsource(DecodeGEMV) + inspect.getsource(gemv)).encode()).hexdigest()


def compile_decode(model, device_kind: str, npu_mode: str = "max-autotune"):
    """`model.decode` as one compiled graph for this device; collectives included (fullgraph)."""
    if device_kind == "npu":
        from torch_npu.dynamo import torchair

        torchair.patch_for_hcom()                          # in-place collectives traced into the graph
        backend = torchair.get_npu_backend(compiler_config=npu_compiler_config(npu_mode))
        return torch.compile(model.decode, dynamic=True, fullgraph=True, backend=backend)
    if device_kind == "cuda":
        return torch.compile(model.decode, dynamic=True, fullgraph=True, mode="reduce-overhead")
    return torch.compile(model.decode, dynamic=True, fullgraph=True, options={"pre_grad_custom_pass": DecodeGEMV()})


def mark_static(model) -> None:
    """The recipe marks every decode input static, the KV cache included: only the lengths stay symbolic."""
    for t in model.cache.k + model.cache.v:
        torch._dynamo.mark_static(t)


def fresh_compile_state(inductor_dir: str) -> None:
    """Forget every graph compiled earlier in this process and point inductor at `inductor_dir`.

    Dynamo shares one compiled graph between model instances of the same structure (their weights
    are graph inputs), so without this a second runner would silently reuse the first one's graph:
    its compile time would read ~0 and a compile cache would stay empty. Earlier runners in this
    process recompile on their next call."""
    import torch._dynamo
    from torch._inductor.utils import clear_caches

    global _compiles_in_process
    _compiles_in_process += 1
    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
    clear_caches()


_compiles_in_process = 0


@functools.lru_cache(maxsize=None)
def private_inductor_cache() -> str:
    """A fresh inductor cache directory for this process (removed at exit), so nothing leaks
    between processes except through our own, keyed compile cache."""
    path = tempfile.mkdtemp(prefix="qwen3moe-inductor-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class GraphRunner(ModelRunner):
    """Eager prefill; decode through a graph compiled on its first call (timed as compile_s)."""

    def __init__(self, model, *, device_kind: str = "cpu", bytes_read: int | None = None,
                 steps: tuple[str, ...] = (), compile_cache: str | None = None, npu_mode: str = "max-autotune"):
        super().__init__(model, device_kind=device_kind, bytes_read=bytes_read)
        self.steps = steps                      # the recipe's steps: part of the compile cache's key
        self.compile_cache = compile_cache or os.path.join(cache_root(), "compile")   # CachedGraphRunner's
        self.npu_mode = npu_mode                # GE graph ("max-autotune") or ACL graph ("reduce-overhead")
        self.compiled = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model.prefill(ids)                  # allocates (once) and fills the static cache
        mark_static(self.model)
        return logits

    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if pos >= self.model.max_len:
            raise ValueError(f"position {pos} is past the KV cache ({self.model.max_len} positions)")
        input_pos = torch.tensor([pos], device=ids.device)
        if self.compiled is None:
            t0 = platform.now_ms(self.device_kind)
            self.compiled = self.compile()
            with torch._dynamo.config.patch(specialize_float=True), torch.no_grad():   # eps become constants
                logits = self.compiled(ids, input_pos, pos + 1)        # the first call traces and compiles
            self.compile_s = (platform.now_ms(self.device_kind) - t0) / 1e3
            self.after_first_call()
            return logits
        with torch.no_grad():                  # the caller's no_grad: model.decode itself is undecorated
            return self.compiled(ids, input_pos, pos + 1)

    def compile(self):
        fresh_compile_state(private_inductor_cache())
        return compile_decode(self.model, self.device_kind, self.npu_mode)

    def after_first_call(self) -> None:
        pass


# ---- the compile cache ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def source_digest(root: str = PACKAGE_DIR) -> str:
    """sha256 over every .py file of the package (path and bytes): any code edit changes it."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def cache_key(model, steps, device_kind: str, npu_mode: str = "max-autotune") -> tuple[str, dict]:
    """The key of a compiled decode graph and the fields it covers."""
    v = platform.versions()
    fields = {
        "config": {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "name"},
        "steps": list(steps), "tp_size": model.tp.size, "tp_rank": model.tp.rank,
        "dtype": str(model.dtype), "max_len": model.max_len, "batch": model.cache.k[0].shape[0],
        "device_kind": device_kind, "npu_mode": npu_mode if device_kind == "npu" else None,
        "torch_threads": torch.get_num_threads(),           # inductor's CPU kernels depend on it
        "source_sha256": source_digest(), "torch": v["torch"], "torch_npu": v["torch_npu"],
        "cann": v["cann"], "python": v["python"],
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return key, fields


def _tree_digest(root: str) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = file_sha256(path)
    return out


def _graph_state() -> tuple[int, int]:
    """(fresh compile states, graphs dynamo has compiled) in this process: unchanged since a
    runner's first call means that runner's graph is still the only one."""
    return _compiles_in_process, torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CachedGraphRunner(GraphRunner):
    """GraphRunner whose compiled graph lives in `<cache_dir>/<key>/rank<r>` and is reused by the
    next process with the same key. A manifest records the key's fields and a checksum of every
    file; anything that does not verify is deleted and rebuilt, with a warning.

    Like torchair's cached graphs, the graph then runs without dynamo's guard checks (CPU and GPU;
    `skip_guards`): every decode call has the same input shapes, and what could still differ is
    checked here instead, cheaply. Guards are checked again as soon as any other graph has been
    compiled in the process, since dynamo then has more than one graph to choose from.
    """

    skip_guards = True
    signature = None                                     # the decode input the graph was built for

    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if self.signature is None or self.device_kind == "npu":      # torchair has no guards to skip
            logits = super().decode(ids, pos)
            self.signature, self.state = (tuple(ids.shape), ids.dtype, ids.device), _graph_state()
            return logits
        if (tuple(ids.shape), ids.dtype, ids.device) != self.signature:
            raise ValueError(f"decode ids {tuple(ids.shape)} {ids.dtype} on {ids.device} differ from the "
                             f"{self.signature[0]} {self.signature[1]} on {self.signature[2]} this runner's "
                             f"graph was compiled for; build a new runner for another batch size")
        if not self.skip_guards or _graph_state() != self.state:
            return super().decode(ids, pos)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return super().decode(ids, pos)

    def compile(self):
        self.fields = cache_key(self.model, self.steps, self.device_kind, self.npu_mode)
        self.cache_dir = os.path.join(self.compile_cache, self.fields[0], f"rank{self.model.tp.rank}")
        self._take_lock()                   # released once the cache is stored (after_first_call)
        self.cache_hit = self._verify()
        os.makedirs(self.cache_dir, exist_ok=True)
        if self.device_kind == "npu":
            fresh_compile_state(private_inductor_cache())
            return self._torchair_cache()
        fresh_compile_state(os.path.join(self.cache_dir, "inductor"))
        return compile_decode(self.model, self.device_kind)

    def _torchair_cache(self):
        from torch_npu.dynamo import torchair

        torchair.patch_for_hcom()
        return torchair.inference.cache_compile(self.model.decode, config=npu_compiler_config(self.npu_mode), dynamic=True,
                                                cache_dir=os.path.join(self.cache_dir, "torchair"),
                                                global_rank=self.model.tp.rank, tp_rank=self.model.tp.rank,
                                                ge_cache=self.npu_mode != "reduce-overhead")

    def _verify(self) -> bool:
        """True if the directory holds a complete cache for exactly this key; else clear it."""
        path = os.path.join(self.cache_dir, MANIFEST)
        if not os.path.isdir(self.cache_dir):
            return False
        try:
            with open(path) as f:
                manifest = json.load(f)
            files = self._checked_files()
            if manifest["fields"] != self.fields[1]:
                raise ValueError("its key fields differ from this run's")
            if manifest["files"] != files:
                raise ValueError("its files do not match their checksums")
            return True
        except Exception as e:                              # missing, partial, corrupt or foreign
            if os.path.exists(path) or os.listdir(self.cache_dir):
                warnings.warn(f"compile cache {self.cache_dir} is unusable ({type(e).__name__}: {e}); "
                              f"rebuilding it", stacklevel=3)
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            return False

    def _checked_files(self) -> dict[str, str]:
        """The files the manifest vouches for, with their sha256: every file of an inductor cache; on an
        NPU torchair's compiled modules only (GE keeps and validates its own cache beside them and may
        update it when it loads a graph, which must not make our manifest look corrupt)."""
        files = {k: v for k, v in _tree_digest(self.cache_dir).items() if k != MANIFEST}
        if self.device_kind == "npu":
            files = {k: v for k, v in files.items() if os.path.basename(k) == "compiled_module"}
        return files

    def _torchair_loaded(self) -> bool:
        """After the first call on an NPU: did torchair load a cached graph (True) or compile and
        record one (its ModelCacheSaver)? Only torchair knows: it silently recompiles a cache it
        cannot read, so our manifest alone cannot tell."""
        inner = getattr(self.compiled, "_compiled_model", None)
        return inner is not None and type(inner).__name__ != "ModelCacheSaver"

    def _take_lock(self) -> None:
        """One process at a time per key and rank, from checking the cache to storing it: a second
        process started at once waits, then loads what the first stored (instead of clearing a
        directory the first is still writing, or writing a manifest over half its files)."""
        os.makedirs(os.path.dirname(self.cache_dir), exist_ok=True)
        self._lock = open(self.cache_dir + ".lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def after_first_call(self) -> None:
        try:
            self._store()
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def _store(self) -> None:
        if self.device_kind == "npu":
            self.cache_hit = self._torchair_loaded()
        if self.cache_hit:
            return
        if _compiles_in_process > 1:      # kernels already in memory were not written out: incomplete
            warnings.warn(f"not storing {self.cache_dir}: this process compiled before, so the cache could be "
                          f"incomplete; the next fresh process will write it", stacklevel=2)
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            return
        files = self._checked_files()
        if not files:                                       # nothing was written: no cache to offer
            why = ("torchair saved no compiled module (it saves one only when dynamo recorded the compiled "
                   "method's own code, and drops it after a recompile)" if self.device_kind == "npu"
                   else "the compiler wrote nothing")
            warnings.warn(f"{why} under {self.cache_dir}; the next run will compile again", stacklevel=2)
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            return
        tmp = os.path.join(self.cache_dir, f".{MANIFEST}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"key": self.fields[0], "fields": self.fields[1], "files": files,
                       "written": time.time(), "argv": sys.argv}, f, indent=1)
        os.replace(tmp, os.path.join(self.cache_dir, MANIFEST))      # the cache exists once this lands
