"""Preflight: `python -m qwen3moe_tutorial.preflight`, the first command to run on an A3 node.

- Checks versions, devices, HBM per rank, the launcher's environment, every fused op against its
  reference, an all-reduce and the torchair compile cache; prints one table and exits 1 on a FAIL.
- Where there is no NPU it runs what it can (versions, bytes per rank, environment) and says why it
  skips the rest. It loads no weights: bytes per rank come from the safetensors headers.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field

import torch
from packaging.version import Version
from safetensors import safe_open

from . import launch, ops, parallel, platform
from .config import ConfigError, ModelConfig, preset
from .final import UsageError, resolve_device
from .model import DEFAULT_MAX_LEN
from .ops import reference
from .parallel import TP
from .steps import STEP_NAMES, Recipe, check_parallel, recipe_upto
from .tp import HeadPlan
from .weights import Checkpoint, CheckpointError, default_checkpoint, expected_shapes, make_tiny_checkpoint

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(os.path.dirname(PACKAGE_DIR), "requirements-npu.txt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HBM_MARGIN = 0.10             # activations, workspaces, the rotary tables and the allocator's slack
MIN_CONNECT_TIMEOUT_S = 600
BF16_TOL = {"rtol": 1e-2, "atol": 1e-2}
NO_NPU = "no NPU: the reference kernels are what runs here"


@dataclass
class Row:
    name: str
    status: str                  # "ok", "FAIL" or "skipped"
    why: str = ""                # FAIL: "<why>, <what to do>"; skipped: why
    detail: str = ""
    numbers: dict = field(default_factory=dict)

    def shown(self) -> str:
        return self.status if self.status == "ok" else f"{self.status}: {self.why}"


@dataclass
class Node:
    """This machine and the planned run: what every check looks at."""
    device_kind: str
    ckpt: Checkpoint
    recipe: Recipe
    tp: int
    dtype: torch.dtype
    max_seq_len: int
    hbm: list = field(default_factory=list)      # (free, total) bytes per visible NPU
    user_env: tuple = ()                         # launcher variables the user had set before the launch
    requirements: str = REQUIREMENTS


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ---- 1. versions ---------------------------------------------------------------------------------
def read_pins(path: str) -> dict[str, str]:
    """`name==version` lines of a requirements file, names normalised (torch-npu -> torch_npu)."""
    with open(path) as f:
        pairs = [line.split("#", 1)[0].split("==", 1) for line in f if "==" in line.split("#", 1)[0]]
    return {name.strip().lower().replace("-", "_"): version.strip() for name, version in pairs}


def _pin_row(name: str, installed: str, pins: dict) -> Row:
    """Compare release numbers only: the CPU wheel's 2.13.0+cpu is torch 2.13.0."""
    pin = pins.get(name, installed)
    numbers, detail = {"installed": installed, "pin": pins.get(name)}, f"{installed} (pin {pins.get(name)})"
    if Version(installed).release != Version(pin).release:
        return Row(f"version {name}", "FAIL", f"{installed} is installed but requirements-npu.txt pins {pin}, "
                   f"pip install -r requirements-npu.txt", detail, numbers)
    return Row(f"version {name}", "ok", detail=detail, numbers=numbers)


def check_versions(node: Node) -> list[Row]:
    """torch and torch_npu against the pins of requirements-npu.txt; the CANN toolkit torch_npu runs on."""
    if not os.path.isfile(node.requirements):
        why = f"no {os.path.basename(node.requirements)} beside the package (not an editable install), no pins"
        return [Row(f"version {n}", "skipped", why) for n in ("torch", "torch_npu", "CANN")]
    pins = read_pins(node.requirements)
    rows = [_pin_row("torch", torch.__version__, pins)]
    npu = platform.torch_npu_module()
    if importlib.util.find_spec("torch_npu") is None:
        return rows + [Row("version torch_npu", "skipped", "not installed"),
                       Row("version CANN", "skipped", "torch_npu not installed")]
    if npu is None:
        return rows + [Row("version torch_npu", "FAIL", "installed but does not import (CANN not found), "
                           "source /usr/local/Ascend/ascend-toolkit/set_env.sh"),
                       Row("version CANN", "skipped", "torch_npu does not import")]
    rows.append(_pin_row("torch_npu", npu.__version__, pins))
    cann = platform.versions()["cann"]
    if not cann:
        return rows + [Row("version CANN", "FAIL", "torch_npu is installed but no CANN toolkit was found "
                           "(ASCEND_TOOLKIT_HOME), source /usr/local/Ascend/ascend-toolkit/set_env.sh")]
    return rows + [Row("version CANN", "ok", detail=cann, numbers={"installed": cann})]


# ---- 2. devices ----------------------------------------------------------------------------------
def check_devices(node: Node) -> Row:
    if node.device_kind != "npu" and platform.torch_npu_module() is not None:
        return Row("devices", "FAIL", "torch_npu imports but sees no NPU, check `npu-smi info` and "
                   "ASCEND_RT_VISIBLE_DEVICES")
    if node.device_kind != "npu":
        return Row("devices", "skipped", NO_NPU)
    free, total = [f for f, _ in node.hbm], [t for _, t in node.hbm]
    numbers = {"count": len(node.hbm), "hbm_free": free, "hbm_total": total}
    detail = f"{len(node.hbm)} NPUs, HBM free {_size(min(free))} .. {_size(max(free))} of {_size(max(total))}"
    if node.tp > len(node.hbm):
        return Row("devices", "FAIL", f"--tp {node.tp} needs {node.tp} devices but {len(node.hbm)} are visible "
                   f"on this node, launch with torchrun over several nodes (--nnodes) or use a smaller --tp",
                   detail, numbers)
    return Row("devices", "ok", detail=detail, numbers=numbers)


# ---- 3. bytes per rank ---------------------------------------------------------------------------
def rank_layout(cfg: ModelConfig, tp: TP) -> dict[str, tuple[int, int]]:
    """(dim, rows kept) of each sharded kind of checkpoint tensor on rank tp.rank (tp.py's layout); any
    other tensor (norms, router) is replicated. KV heads count once per rank, replicated when tp > Nkv."""
    plan, D = HeadPlan.of(cfg, tp), cfg.head_dim
    q, kv = plan.n_heads * D, plan.n_kv * D
    i0, i1 = tp.split(cfg.moe_intermediate_size, "moe_intermediate_size")
    v0, v1 = tp.split(cfg.vocab_size, "vocab_size")
    return {"q_proj": (0, q), "k_proj": (0, kv), "v_proj": (0, kv), "o_proj": (1, q), "gate_proj": (0, i1 - i0),
            "up_proj": (0, i1 - i0), "down_proj": (1, i1 - i0), "embed_tokens": (0, v1 - v0), "lm_head": (0, v1 - v0)}


def _kept(shape: tuple, rule: tuple[int, int] | None) -> int:
    dims = list(shape)
    if rule:
        dims[rule[0]] = rule[1]
    return math.prod(dims)


def kv_cache_bytes(cfg: ModelConfig, tp: int, dtype: torch.dtype, max_seq_len: int) -> int:
    """One rank's K and V caches: per layer 2 * S_max * Nkv_r * D elements (batch 1)."""
    n_kv = HeadPlan.of(cfg, TP(0, tp)).n_kv
    return cfg.num_hidden_layers * 2 * max_seq_len * n_kv * cfg.head_dim * dtype.itemsize


def bytes_per_rank(ckpt: Checkpoint, tp: int, dtype: torch.dtype, max_seq_len: int) -> list[int]:
    """HBM each rank needs for its weights (at `dtype`) and KV cache, from the safetensors headers only."""
    cfg = ckpt.config
    shapes = {name: ckpt.shape(name) for name in expected_shapes(cfg)}
    shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])   # tied: lm_head holds a copy
    kinds = {name: name.split(".")[-2] for name in shapes}                    # q_proj, gate_proj, norm, ...
    kv = kv_cache_bytes(cfg, tp, dtype, max_seq_len)
    layouts = [rank_layout(cfg, TP(r, tp)) for r in range(tp)]
    return [kv + dtype.itemsize * sum(_kept(s, layout.get(kinds[n])) for n, s in shapes.items()) for layout in layouts]


def checkpoint_dtype(ckpt: Checkpoint) -> str:
    name = "model.embed_tokens.weight"
    with safe_open(os.path.join(ckpt.dir, ckpt.weight_map[name]), framework="pt") as f:
        return f.get_slice(name).get_dtype()


def check_memory(node: Node) -> Row:
    per_rank = bytes_per_rank(node.ckpt, node.tp, node.dtype, node.max_seq_len)
    kv = kv_cache_bytes(node.ckpt.config, node.tp, node.dtype, node.max_seq_len)
    need = max(per_rank)
    numbers = {"bytes_per_rank": per_rank, "kv_cache_bytes": kv, "tp": node.tp, "max_seq_len": node.max_seq_len,
               "dtype": str(node.dtype).removeprefix("torch."), "checkpoint_dtype": checkpoint_dtype(node.ckpt)}
    detail = (f"{_size(need)} on the fullest rank (tp {node.tp}): weights {_size(need - kv)} + KV cache {_size(kv)} "
              f"({node.max_seq_len} positions, {numbers['dtype']}; checkpoint {numbers['checkpoint_dtype']})")
    if not node.hbm:
        return Row("memory per rank", "ok", detail=detail + "; no HBM here to compare", numbers=numbers)
    free = [f for f, _ in node.hbm[:node.tp]]
    numbers["min_free_hbm"] = min(free)
    if need * (1 + HBM_MARGIN) > min(free):
        return Row("memory per rank", "FAIL", f"a rank needs {_size(need)} + {HBM_MARGIN:.0%} but device "
                   f"{free.index(min(free))} has {_size(min(free))} free, use a larger --tp (or free the device)",
                   detail, numbers)
    return Row("memory per rank", "ok", detail=f"{detail}; fits {_size(min(free))} free", numbers=numbers)


# ---- 4. launcher environment ---------------------------------------------------------------------
def check_launcher_env(node: Node) -> Row:
    env = launch.launcher_env(node.recipe, node.device_kind)
    mine = sorted(k for k in env if k in node.user_env)
    numbers = {"env": env, "user_set": mine}
    detail = ", ".join(f"{k}={v}" + (" (yours)" if k in mine else "") for k, v in sorted(env.items())) or "none"
    timeout = os.environ.get("HCCL_CONNECT_TIMEOUT")
    if timeout is not None and (not timeout.strip().isdigit() or int(timeout) < MIN_CONNECT_TIMEOUT_S):
        return Row("launcher env", "FAIL", f"HCCL_CONNECT_TIMEOUT={timeout} is below {MIN_CONNECT_TIMEOUT_S} s: "
                   f"ranks drift apart while each loads tens of GB and HCCL gives up on the first collective, "
                   f"unset it or set 1200 as the recipe does", detail, numbers)
    return Row("launcher env", "ok", detail=detail, numbers=numbers)


# ---- 5. fused ops --------------------------------------------------------------------------------
def op_shapes(cfg: ModelConfig, tp: int, max_seq_len: int) -> dict:
    """One rank's decode shapes: T tokens, N/Nkv heads, I expert columns, S cache rows, write at pos."""
    plan = HeadPlan.of(cfg, TP(0, tp))
    return {"T": 1, "H": cfg.hidden_size, "D": cfg.head_dim, "N": plan.n_heads, "Nkv": plan.n_kv, "E": cfg.num_experts, "K": cfg.num_experts_per_tok,
            "I": cfg.moe_intermediate_size // tp, "S": max_seq_len, "pos": max_seq_len // 2}


def _rand(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def op_calls(s: dict) -> dict[str, tuple[tuple, dict]]:
    """Each op's arguments as the recipe calls it at shapes `s`, built on the CPU from fixed seeds."""
    T, H, D, N, Nkv, E, K, I, S, pos = (s[k] for k in ("T", "H", "D", "N", "Nkv", "E", "K", "I", "S", "pos"))
    g = torch.Generator().manual_seed(0)          # distinct logits (k/16 is exact in bf16): no top-k ties
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).div(16).to(torch.bfloat16)
    v2 = dict(active_num=T * K, expert_num=E, expert_tokens_num_type=1, expert_tokens_num_flag=True,
              active_expert_range=[0, E], quant_mode=-1)
    _, idx, row_idx = reference.npu_moe_gating_top_k_softmax(logits, None, k=K)
    _, dst, counts, _ = reference.npu_moe_init_routing_v2(_rand(T, H), idx, **v2)
    angle = _rand(T, 1, 1, D, seed=2).float() * 3
    return {
        "npu_swiglu": ((_rand(T * K, 2 * I),), {"dim": -1}),
        "npu_rms_norm": ((_rand(T, 1, H), _rand(H, seed=1), 1e-6), {}),
        "npu_add_rms_norm": ((_rand(T, 1, H), _rand(T, 1, H, seed=1), _rand(H, seed=2), 1e-6), {}),
        "npu_moe_gating_top_k_softmax": ((logits, None), {"k": K}),
        "npu_moe_init_routing": ((_rand(T, H), row_idx, idx, T), {}),
        "npu_moe_init_routing_v2": ((_rand(T, H), idx), v2),
        "npu_moe_compute_expert_tokens": ((idx.flatten().sort().values, E), {}),
        "npu_moe_finalize_routing": ((_rand(T * K, H), None, None, None, _rand(T, K, seed=1), dst, None),
                                     {"drop_pad_mode": 2}),
        "npu_grouped_matmul": (([_rand(T * K, H, scale=0.1)], [_rand(E, H, 2 * I, seed=1, scale=0.1)]),
                               dict(group_list=counts, split_item=3, group_type=0, group_list_type=1)),
        "npu_fused_infer_attention_score": ((_rand(T, 1, N * D), _rand(T, S, Nkv * D, seed=1),
                                             _rand(T, S, Nkv * D, seed=2)),
                                            dict(num_heads=N, num_key_value_heads=Nkv, input_layout="BSH",
                                                 scale=D ** -0.5, actual_seq_lengths_kv=[pos + 1] * T)),
        "npu_apply_rotary_pos_emb": ((_rand(T, 1, N, D), _rand(T, 1, Nkv, D, seed=1), angle.cos().bfloat16(),
                                      angle.sin().bfloat16(), "BSND"), {}),
        "scatter_update_": ((_rand(T, S, Nkv * D), torch.full((T,), pos), _rand(T, 1, Nkv * D, seed=1), -2), {}),
        "npu_scatter_nd_update_": ((_rand(S, Nkv, D), torch.arange(T).add(pos).view(-1, 1),
                                    _rand(T, Nkv, D, seed=1)), {}),
        "npu_format_cast": ((_rand(H, 2 * I), 29), {}),                 # 29 = FRACTAL_NZ; values unchanged
    }


COMPARED = {"npu_moe_init_routing_v2": 3, "npu_fused_infer_attention_score": 1}   # the rest is undefined/ignored


def _moved(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return [_moved(t, device) for t in x] if isinstance(x, list) else x


def run_op(provider, name: str, call: tuple, device: str) -> tuple:
    """provider.<name>(*args, **kwargs) with its tensors on `device`; the outputs to compare, as a tuple."""
    args, kwargs = call
    out = getattr(provider, name)(*_moved(list(args), device), **{k: _moved(v, device) for k, v in kwargs.items()})
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return out[:COMPARED.get(name, len(out))]


def compare(got, want, tol: dict = BF16_TOL) -> tuple[float, bool]:
    """Max abs difference over the outputs; within tolerance? (integer outputs must be equal)."""
    worst, ok = 0.0, True
    for a, b in zip(got, want, strict=True):
        a = a.cpu()
        if a.shape != b.shape:
            raise ValueError(f"output of shape {tuple(a.shape)}, the reference's is {tuple(b.shape)}")
        diff = (a.float() - b.float()).abs().nan_to_num(nan=float("inf"))
        limit = tol["atol"] + tol["rtol"] * b.float().abs() if b.is_floating_point() else 0
        ok = ok and bool((diff <= limit).all())
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
    return worst, ok


def fused_op_results(shapes: dict, device: str = "npu:0", impl=ops, tol: dict = BF16_TOL) -> dict:
    """Every op of op_calls run by `impl` on `device` against the reference on the CPU: {op: result}."""
    results = {}
    mine, ref = op_calls(shapes), op_calls(shapes)     # two sets: some ops write into their inputs
    for name in mine:
        try:
            err, ok = compare(run_op(impl, name, mine[name], device), run_op(reference, name, ref[name], "cpu"), tol)
            results[name] = {"max_abs_err": err, "ok": ok}
        except Exception as e:                          # an op that raises fails; the others still run
            results[name] = {"max_abs_err": None, "ok": False, "error": f"{type(e).__name__}: {e}"}
    return results


def fused_ops_row(results: dict) -> Row:
    numbers = {name: r["max_abs_err"] for name, r in results.items()}
    err, worst = max(((e, n) for n, e in numbers.items() if e is not None), default=(float("nan"), "none ran"))
    detail = (f"{sum(r['ok'] for r in results.values())}/{len(results)} ops within bf16 tolerance "
              f"(rtol {BF16_TOL['rtol']}, atol {BF16_TOL['atol']}); largest max abs error {err:.2e} ({worst})")
    bad = [f"{n} ({r.get('error') or format(r['max_abs_err'], '.2e')})" for n, r in results.items() if not r["ok"]]
    if bad:
        return Row("fused ops", "FAIL", f"{'; '.join(bad)} differ from the reference, check that CANN matches "
                   f"torch_npu and run pytest -m npu tests/test_ops_npu.py for details", detail, numbers)
    return Row("fused ops", "ok", detail=detail, numbers=numbers)


def check_fused_ops(node: Node) -> Row:
    if node.device_kind != "npu":
        return Row("fused ops", "skipped", NO_NPU)
    shapes = op_shapes(preset("qwen3-235b-a22b"), 16, 512)         # one rank of the recipe's 16-way TP
    with ops.use_provider("npu"):
        return fused_ops_row(fused_op_results(shapes, "npu:0", ops))


# ---- 6. all-reduce -------------------------------------------------------------------------------
def check_allreduce(node: Node) -> Row:
    if node.device_kind != "npu":
        return Row("all-reduce", "skipped", "no NPU: a gloo all-reduce says nothing about HCCL")
    world = min(node.tp, len(node.hbm)) if node.tp > 1 else len(node.hbm)
    if world < 2:
        return Row("all-reduce", "skipped", f"{world} NPU: an all-reduce needs at least 2")
    try:
        out = parallel.spawn(parallel.allreduce_benchmark, world, ([8192], 50, 5, torch.bfloat16, "npu"),
                             device_kind="npu", timeout_s=300)
    except (parallel.RankError, TimeoutError, RuntimeError) as e:
        return Row("all-reduce", "FAIL", f"{e}, check `npu-smi info` and that no other job holds the devices")
    mode = out["env"].get("HCCL_OP_EXPANSION_MODE", "unset (AI_CPU)")
    us = out["median_us"][0]
    return Row("all-reduce", "ok", detail=f"8 KB bf16 over {world} NPUs: median {us:.1f} µs, "
               f"HCCL_OP_EXPANSION_MODE={mode}", numbers={"median_us": us, "world_size": world, "mode": mode})


# ---- 7. torchair compile cache -------------------------------------------------------------------
def _final_run(model: str, cache: str, out: str, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "qwen3moe_tutorial.final", "--model-path", model, "--upto", STEP_NAMES[-1], "--tp", "1",
           "--device", "npu", "--dtype", "bfloat16", "--compile-cache", cache, "--max-new-tokens", "4", "--json", out]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode:
        raise RuntimeError(f"final exited {p.returncode}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    with open(out) as f:
        return json.load(f)


def torchair_row(first: dict, second: dict, cache: str) -> Row:
    """The verdict on two runs sharing one compile cache: compiled, stored, reloaded, same tokens."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs if f == "compiled_module"]
    numbers = {"compile_s": [first.get("compile_s"), second.get("compile_s")], "compiled_module": files,
               "cache_hit": [first.get("compile_cache_hit"), second.get("compile_cache_hit")]}
    detail = f"compile {numbers['compile_s'][0]} s, then {numbers['compile_s'][1]} s from the cache"
    problems = [why for bad, why in (
        (first.get("compile_cache_hit") is not False, "the first run did not compile afresh"),
        (second.get("compile_cache_hit") is not True, "the second run did not load the cache"),
        (not files, f"no compiled_module file under {cache}"),
        (first.get("token_ids") != second.get("token_ids"), "the two runs generated different tokens")) if bad]
    if problems:
        return Row("torchair cache", "FAIL", f"{'; '.join(problems)}, rerun final twice with the same "
                   f"--compile-cache and read the warnings of CachedGraphRunner", detail, numbers)
    return Row("torchair cache", "ok", detail=detail, numbers=numbers)


def check_torchair_cache(node: Node, timeout_s: float = 900) -> Row:
    if node.device_kind != "npu":
        return Row("torchair cache", "skipped", "torchair needs an NPU; the CPU compile cache is covered by "
                   "tests/test_compile.py")
    with tempfile.TemporaryDirectory(prefix="qwen3moe-preflight-") as work:
        model = make_tiny_checkpoint(os.path.join(work, "model"), preset("tiny").replace(num_hidden_layers=1))
        cache = os.path.join(work, "cache")
        try:
            runs = [_final_run(model, cache, os.path.join(work, f"run{i}.json"), timeout_s) for i in (1, 2)]
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return Row("torchair cache", "FAIL", f"{e}, run the same final command by hand to see its output")
        return torchair_row(*runs, cache)


# ---- the command ---------------------------------------------------------------------------------
CHECKS = (check_versions, check_devices, check_memory, check_launcher_env, check_fused_ops, check_allreduce,
          check_torchair_cache)


def run_checks(node: Node) -> list[Row]:
    """Every check, under the environment the launch itself would set (launch.launch_environment)."""
    rows = []
    with launch.launch_environment(node.recipe, node.device_kind):
        for check in CHECKS:
            try:
                out = check(node)
            except Exception as e:                      # a broken check is a FAIL row, never a traceback
                out = Row(check.__name__.removeprefix("check_"), "FAIL", f"{type(e).__name__}: {e}, report this")
            rows.extend(out if isinstance(out, list) else [out])
    return rows


def format_table(rows: list[Row], status_width: int = 50, detail_width: int = 70) -> str:
    """One line per check; a long status or detail wraps inside its own column."""
    cells = [(["check"], ["status"], ["detail"])] + [
        ([r.name], textwrap.wrap(r.shown(), status_width), textwrap.wrap(r.detail, detail_width) or [""])
        for r in rows]
    w0, w1 = (max(len(line) for c in cells for line in c[i]) for i in (0, 1))
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for name, status, detail in cells
                     for a, b, c in itertools.zip_longest(name, status, detail, fillvalue=""))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen3moe_tutorial.preflight",
                                description="Check this node before a long run: one row per check, exit 1 on a FAIL.")
    p.add_argument("--model-path", help="Hugging Face checkpoint directory (default: the embedded tiny checkpoint)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the visible NPUs, else 1)")
    p.add_argument("--max-seq-len", type=int, help=f"KV-cache positions (default: {DEFAULT_MAX_LEN}, at most max_position_embeddings)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on an NPU, float32 elsewhere")
    p.add_argument("--json", metavar="FILE", help="write the rows and the versions to FILE")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> Node:
    """Resolve the defaults and reject arguments no run could use (UsageError, ConfigError, ...)."""
    recipe = recipe_upto()
    user_env = tuple(k for k in launch.launcher_env(recipe, "npu") if k in os.environ)
    kind = resolve_device("auto")                 # torch_npu starts with the launcher's NPU environment
    ckpt = Checkpoint(args.model_path or default_checkpoint())
    ckpt.validate()
    cfg = ckpt.config
    hbm = [torch.npu.mem_get_info(i) for i in range(torch.npu.device_count())] if kind == "npu" else []
    tp = args.tp if args.tp is not None else max(len(hbm), 1)
    problem = _split_problem(recipe, cfg, tp)
    if problem:
        valid = [t for t in range(1, cfg.num_attention_heads + 1) if not _split_problem(recipe, cfg, t)]
        given = "" if args.tp is not None else f" (--tp defaulted to the {tp} visible NPUs)"
        raise UsageError(f"{problem}{given}; --tp must split the heads, the vocabulary and moe_intermediate_size "
                         f"of {cfg.name}: one of {', '.join(map(str, valid))}")
    limit = cfg.max_position_embeddings
    if args.max_seq_len is not None and not 1 <= args.max_seq_len <= limit:
        raise UsageError(f"--max-seq-len {args.max_seq_len} must lie in [1, {limit}] (max_position_embeddings)")
    dtype = DTYPES[args.dtype or ("bfloat16" if kind == "npu" else "float32")]
    return Node(kind, ckpt, recipe, tp, dtype, args.max_seq_len or min(DEFAULT_MAX_LEN, limit), hbm, user_env=user_env)


def _split_problem(recipe: Recipe, cfg: ModelConfig, tp: int) -> str | None:
    if tp < 1:
        return f"--tp must be at least 1, got {tp}"
    try:
        check_parallel(recipe, cfg, tp)
    except ValueError as e:
        return str(e)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        node = prepare(args)
    except (UsageError, ConfigError, CheckpointError, FileNotFoundError) as e:
        hint = "" if isinstance(e, UsageError) else \
            "; --model-path expects a Hugging Face Qwen3-MoE checkpoint directory (config.json, *.safetensors)"
        print(f"error: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        return 2
    rows = run_checks(node)
    print(format_table(rows))
    failed = any(r.status == "FAIL" for r in rows)
    if args.json:
        record = {"ok": not failed, "device": node.device_kind, "model_path": os.path.abspath(node.ckpt.dir),
                  "tp": node.tp, "dtype": str(node.dtype).removeprefix("torch."), "max_seq_len": node.max_seq_len,
                  "versions": platform.versions(), "rows": [asdict(r) | {"shown": r.shown()} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
