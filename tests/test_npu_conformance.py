"""API conformance with torch_npu 2.13.0, without torch_npu: every call the package makes into torch_npu,
torch.ops.npu, torchair or qwen3moe_tutorial.ops must fit a schema recorded from the wheel
(qwen3moe_tutorial/data/npu_op_schemas.json), and every reference kernel must have exactly its
op's parameter list.

The scanner is static (ast): it reads every .py file of the package, including files added later.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import inspect
import json
import os
import re

import pytest

from qwen3moe_tutorial import ops
from qwen3moe_tutorial.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "qwen3moe_tutorial")
SCHEMA_FILE = os.path.join(PACKAGE, "data", "npu_op_schemas.json")
SCHEMAS = json.load(open(SCHEMA_FILE))
OPS_MODULE = "qwen3moe_tutorial.ops"


# ---------------------------------------------------------------- the scanner

def _import_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> canonical dotted name, for imports of torch, torch_npu, torchair and our ops module."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    aliases[root] = root
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                   # relative: only our own ops module matters
                if node.module in (None, "") and any(a.name == "ops" for a in node.names):
                    module = "qwen3moe_tutorial"
                elif node.module and node.module.split(".")[-1] == "ops":
                    module = OPS_MODULE
                else:
                    continue
            else:
                module = node.module or ""
            for a in node.names:
                aliases[a.asname or a.name] = f"{module}.{a.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _canonical(dotted: str) -> str:
    for prefix in ("torch_npu.dynamo.torchair.", "torch_npu.dynamo.torchair"):
        if dotted.startswith(prefix):
            return "torchair" + dotted[len("torch_npu.dynamo.torchair"):]
    return dotted


def _target(dotted: str):
    """What a dotted callee names: ("op", name), ("api", key), ("unknown", dotted) or None (not ours)."""
    dotted = _canonical(dotted)
    if dotted.startswith("torch.ops.npu."):
        return "op", dotted.split(".")[3]
    if dotted.startswith(OPS_MODULE + "."):
        name = dotted.split(".")[2]
        return ("op", name) if name in SCHEMAS["ops"] else None
    if dotted.startswith("torch_npu.") or dotted.startswith("torchair."):
        if dotted in SCHEMAS["python_apis"]:
            return "api", dotted
        rest = dotted.split(".")
        if dotted.startswith("torch_npu.") and len(rest) in (2, 3) and rest[1] in SCHEMAS["ops"]:
            return "op", rest[1]                                  # torch_npu.X or torch_npu.X.overload
        return "unknown", dotted
    return None


def _fits(call: ast.Call, sig: dict) -> str | None:
    """None if the call can bind to this signature, else why not."""
    params = sig["params"]
    names = [p["name"] for p in params]
    positional = [p for p in params if p["kind"] != "keyword_only"]
    starred = any(isinstance(a, ast.Starred) for a in call.args)
    spread = any(k.arg is None for k in call.keywords)
    n_pos = len(call.args)
    if not starred and n_pos > len(positional) and not sig.get("var_positional"):
        return f"{n_pos} positional arguments, but it takes at most {len(positional)}"
    covered = {p["name"] for p in positional[:n_pos]}
    for kw in call.keywords:
        if kw.arg is None:
            continue
        if kw.arg not in names and not sig.get("var_keyword"):
            return f"unknown keyword {kw.arg!r}"
        if kw.arg in covered:
            return f"{kw.arg!r} given both positionally and by keyword"
        covered.add(kw.arg)
    if not (starred or spread):
        missing = [p["name"] for p in params if not p["has_default"] and p["name"] not in covered]
        if missing:
            return f"missing required argument(s) {missing}"
    return None


def _check_call(call: ast.Call, kind: str, key: str) -> str | None:
    if kind == "unknown":
        return f"{key} is not in {os.path.basename(SCHEMA_FILE)} (add it to scripts/extract_npu_schemas.py)"
    sigs = SCHEMAS["ops"][key]["overloads"] if kind == "op" else [SCHEMAS["python_apis"][key]]
    reasons = [_fits(call, sig) for sig in sigs]
    if all(reasons):
        return f"{key}(...): " + "; ".join(r for r in reasons if r)
    return None


def _config_problems(tree: ast.Module, aliases: dict[str, str]) -> list[tuple[int, str]]:
    """Attribute paths assigned on torchair.CompilerConfig() objects must be real options."""
    options = SCHEMAS["config_options"]["torchair.CompilerConfig"]["options"]
    configs, problems = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            callee = _dotted(node.value.func, aliases)
            if callee and _canonical(callee) == "torchair.CompilerConfig":
                configs.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            parts, base = [], target
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if parts and isinstance(base, ast.Name) and base.id in configs:
                path = ".".join(reversed(parts))
                opt = options.get(path)
                if opt is None:
                    problems.append((node.lineno, f"CompilerConfig has no option {path!r}"))
                elif opt.get("choices") and isinstance(node.value, ast.Constant) \
                        and node.value.value not in opt["choices"]:
                    problems.append((node.lineno, f"CompilerConfig.{path} must be one of {opt['choices']}"))
    return problems


def scan_source(source: str, filename: str = "<string>") -> list[str]:
    """Every torch_npu / torch.ops.npu / torchair / ops call in `source` that no recorded schema accepts."""
    tree = ast.parse(source, filename=filename)
    aliases = _import_aliases(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            dotted = _dotted(node.func, aliases)
            target = _target(dotted) if dotted else None
            if target:
                msg = _check_call(node, *target)
                if msg:
                    problems.append(f"{filename}:{node.lineno}: {msg}")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node, aliases)
            owner = dotted and dotted.rsplit(".", 1)[0]
            if owner in SCHEMAS["constants"] and node.attr not in SCHEMAS["constants"][owner]["attributes"]:
                problems.append(f"{filename}:{node.lineno}: {owner} has no member {node.attr!r}")
    problems += [f"{filename}:{line}: {msg}" for line, msg in _config_problems(tree, aliases)]
    return problems


# ---------------------------------------------------------------- (a) the package's calls

PACKAGE_FILES = sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_package_calls_fit_the_torch_npu_schemas(path):
    with open(path) as f:
        problems = scan_source(f.read(), os.path.relpath(path, ROOT))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- (b) reference signatures

def _public_reference_functions():
    return sorted(name for name, fn in inspect.getmembers(reference, inspect.isfunction)
                  if fn.__module__ == reference.__name__ and not name.startswith("_"))


KIND = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
        inspect.Parameter.KEYWORD_ONLY: "keyword_only"}


def _same_default(ours, schema) -> bool:
    if isinstance(schema, list):
        return isinstance(ours, (list, tuple)) and list(ours) == schema
    return type(ours) is type(schema) and ours == schema


@pytest.mark.parametrize("name", _public_reference_functions())
def test_reference_signature_equals_schema(name):
    assert name in SCHEMAS["ops"], f"reference.{name} has no schema; add it to scripts/extract_npu_schemas.py"
    schema = SCHEMAS["ops"][name]["overloads"][0]["params"]
    ours = list(inspect.signature(getattr(reference, name)).parameters.values())
    assert [p.name for p in ours] == [p["name"] for p in schema]
    for p, s in zip(ours, schema):
        assert KIND.get(p.kind) == s["kind"], f"{name}: {p.name} is {p.kind}, schema says {s['kind']}"
        assert (p.default is not inspect.Parameter.empty) == s["has_default"], f"{name}: default of {p.name}"
        if s["has_default"]:
            assert _same_default(p.default, s["default"]), f"{name}: {p.name}={p.default!r} vs {s['default']!r}"


def test_every_dispatched_op_has_a_reference_and_a_schema():
    assert sorted(ops.OP_NAMES) == _public_reference_functions()
    for name in ops.OP_NAMES:
        assert name in SCHEMAS["ops"]


def test_schema_file_names_its_wheel():
    wheel = SCHEMAS["wheel"]
    assert wheel["name"].startswith("torch_npu-2.13.0-") and wheel["name"].endswith(".whl")
    assert re.fullmatch(r"[0-9a-f]{64}", wheel["sha256"]) and wheel["torch_npu_version"] == "2.13.0"
    fia = SCHEMAS["ops"]["npu_fused_infer_attention_score"]["overloads"][0]["params"]
    assert [p["name"] for p in fia[:3]] == ["query", "key", "value"] and fia[3]["kind"] == "keyword_only"
    for key in ("torchair.get_npu_backend", "torchair.CompilerConfig", "torchair.inference.cache_compile",
                "torchair.patch_for_hcom", "torch_npu.profiler.profile", "torch_npu.profiler.schedule",
                "torch_npu.profiler._ExperimentalConfig", "torch_npu.profiler.tensorboard_trace_handler"):
        assert key in SCHEMAS["python_apis"]
    for op in ("npu_format_cast", "npu_scatter_nd_update_", "scatter_update_"):
        assert op in SCHEMAS["ops"]


def _local_wheel():
    for path in [os.environ.get("TORCH_NPU_WHEEL", "")] + glob.glob("/tmp/npuwheel/torch_npu-2.13.0-*.whl"):
        if path and os.path.exists(path):
            return path
    return None


@pytest.mark.skipif(_local_wheel() is None, reason="no torch_npu 2.13.0 wheel here (set TORCH_NPU_WHEEL)")
def test_schema_file_is_what_the_extractor_produces():
    spec = importlib.util.spec_from_file_location("extract", os.path.join(ROOT, "scripts", "extract_npu_schemas.py"))
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    assert extract.build(_local_wheel()) == SCHEMAS


# ---------------------------------------------------------------- the scanner catches bad calls

GOOD = """
import torch, torch_npu
import torch_npu.dynamo.torchair as torchair
from torch_npu.profiler import schedule, ProfilerLevel
from qwen3moe_tutorial import ops
y = torch_npu.npu_grouped_matmul([x], [w], group_list=c, group_type=0, group_list_type=1, split_item=3)[0]
a, _ = torch.ops.npu.npu_fused_infer_attention_score(q, k, v, num_heads=4, input_layout="BSH", scale=0.1,
                                                     atten_mask=m, sparse_mode=2, next_tokens=0)
torch_npu.scatter_update_(cache, kv_len, new_k, -2)
w = torch_npu.npu_format_cast(w, 29)
cfg = torchair.CompilerConfig()
cfg.experimental_config.frozen_parameter = True
cfg.mode = "reduce-overhead"
f = torchair.inference.cache_compile(m.decode, config=cfg, dynamic=True, cache_dir=d, fullgraph=True)
s = schedule(wait=0, warmup=0, active=10, repeat=1, skip_first=10)
lvl = ProfilerLevel.Level1
out = ops.npu_moe_finalize_routing(y, None, None, None, w, idx, None, drop_pad_mode=2)
with ops.use_provider("reference"):
    pass
"""


def test_scanner_accepts_the_recipe_calls():
    assert scan_source(GOOD) == []


@pytest.mark.parametrize("snippet, expected", [
    ("import torch_npu\ntorch_npu.npu_swiglu(x, dimension=-1)", "unknown keyword 'dimension'"),
    ("import torch\ntorch.ops.npu.npu_rms_norm(x, g, eps=1e-6)", "unknown keyword 'eps'"),
    ("import torch_npu\ntorch_npu.npu_fused_infer_attention_score(q, k, v, None)", "4 positional arguments"),
    ("import torch_npu\ntorch_npu.npu_swiglu_v9(x)", "torch_npu.npu_swiglu_v9 is not in"),
    ("import torch_npu\ntorch_npu.scatter_update_(cache, idx, upd)", "missing required argument(s) ['axis']"),
    ("import torch_npu\ntorch_npu.npu_swiglu(x, self=x)", "given both positionally and by keyword"),
    ("from torch_npu.profiler import schedule\nschedule(wait=0, actve=10)", "unknown keyword 'actve'"),
    ("import torch_npu\ntorch_npu.profiler._ExperimentalConfig(level=1)", "unknown keyword 'level'"),
    ("import torch_npu\nx = torch_npu.profiler.ProfilerLevel.Level9", "has no member 'Level9'"),
    ("from torch_npu.dynamo import torchair\ntorchair.get_npu_backend(config=c)", "unknown keyword 'config'"),
    ("import torchair\nc = torchair.CompilerConfig()\nc.experimental_config.frozen_params = True",
     "no option 'experimental_config.frozen_params'"),
    ("import torchair\nc = torchair.CompilerConfig()\nc.mode = 'fast'", "must be one of"),
    ("from qwen3moe_tutorial import ops\nops.npu_moe_finalize_routing(y, None, None, None, w, i, None, drop_pad=2)",
     "unknown keyword 'drop_pad'"),
    ("import torchair\ntorchair.inference.cache_compile(f, cfg)", "2 positional arguments, but it takes at most 1"),
    ("from ..ops import npu_grouped_matmul\nnpu_grouped_matmul([x], [w], grouplist=c)", "unknown keyword 'grouplist'"),
])
def test_scanner_catches_bad_calls(snippet, expected):
    problems = scan_source(snippet)
    assert len(problems) == 1 and expected in problems[0], problems
