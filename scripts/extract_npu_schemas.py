#!/usr/bin/env python
"""Extract the torch_npu 2.13.0 signatures this project calls into qwen3moe_tutorial/data/npu_op_schemas.json.

- Reads the wheel as a zip file and never imports it: op schemas come from the codegen YAML, Python API
  signatures (torchair, torch_npu.profiler) from the package's .py files, parsed with `ast`.
- Keeps only the ops and APIs named below (the whole wheel has ~2000 ops); add a name here when new code needs it.
- tests/test_npu_conformance.py checks every torch_npu / torchair call in the package against the result.

Usage:
    pip download --no-deps torch-npu==2.13.0 -d /tmp/npuwheel
    python scripts/extract_npu_schemas.py /tmp/npuwheel/torch_npu-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import zipfile

from qwen3moe_tutorial.weights import file_sha256

OUT_DEFAULT = os.path.join(os.path.dirname(__file__), "..", "qwen3moe_tutorial", "data", "npu_op_schemas.json")
SCHEMA_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"

# torch.ops.npu ops (torch_npu.X is an alias of torch.ops.npu.X). All overloads except ".out" are kept.
OPS = (
    "npu_swiglu",
    "npu_moe_gating_top_k_softmax",
    "npu_moe_init_routing",
    "npu_moe_init_routing_v2",
    "npu_moe_compute_expert_tokens",
    "npu_moe_finalize_routing",
    "npu_grouped_matmul",
    "npu_rms_norm",
    "npu_add_rms_norm",
    "npu_fused_infer_attention_score",
    "npu_apply_rotary_pos_emb",
    "scatter_update",
    "scatter_update_",
    "npu_scatter_nd_update",
    "npu_scatter_nd_update_",
    "npu_format_cast",
    "npu_format_cast_",
)

TORCHAIR = "torch_npu/dynamo/torchair"
PROFILER = "torch_npu/profiler"
# public name -> (package __init__.py that exports it, exported attribute). Classes record __init__ minus self.
PYTHON_APIS = {
    "torchair.get_npu_backend": (f"{TORCHAIR}/__init__.py", "get_npu_backend"),
    "torchair.CompilerConfig": (f"{TORCHAIR}/__init__.py", "CompilerConfig"),
    "torchair.patch_for_hcom": (f"{TORCHAIR}/__init__.py", "patch_for_hcom"),
    "torchair.inference.cache_compile": (f"{TORCHAIR}/inference/__init__.py", "cache_compile"),
    "torch_npu.profiler.profile": (f"{PROFILER}/__init__.py", "profile"),
    "torch_npu.profiler.schedule": (f"{PROFILER}/__init__.py", "schedule"),
    "torch_npu.profiler._ExperimentalConfig": (f"{PROFILER}/__init__.py", "_ExperimentalConfig"),
    "torch_npu.profiler.tensorboard_trace_handler": (f"{PROFILER}/__init__.py", "tensorboard_trace_handler"),
}
# Classes whose class-level constants we read (e.g. torch_npu.profiler.ProfilerLevel.Level1).
CONSTANT_CLASSES = {
    "torch_npu.profiler.ProfilerLevel": (f"{PROFILER}/__init__.py", "ProfilerLevel"),
    "torch_npu.profiler.AiCMetrics": (f"{PROFILER}/__init__.py", "AiCMetrics"),
    "torch_npu.profiler.ExportType": (f"{PROFILER}/__init__.py", "ExportType"),
}
# Configuration objects whose option tree we record (attribute path -> default and allowed values).
CONFIG_TREES = {"torchair.CompilerConfig": (f"{TORCHAIR}/__init__.py", "CompilerConfig")}


# ---------------------------------------------------------------- op schemas (YAML "func:" lines)

def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets: "int[2] a=[], int b" -> ["int[2] a=[]", "int b"]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def parse_schema_default(text: str):
    """A schema default as a JSON value: None, True/False, numbers, quoted strings, int lists."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text[0] in "'\"":
        return text[1:-1]
    if text.startswith("["):
        return [parse_schema_default(p) for p in split_top_level(text[1:-1])]
    try:
        return int(text)
    except ValueError:
        return float(text)


PARAM_RE = re.compile(r"^(?P<type>.+?)\s+(?P<name>\w+)(?:=(?P<default>.+))?$")
FUNC_RE = re.compile(r"^(?P<name>\w+)(?:\.(?P<overload>\w+))?\((?P<params>.*)\)\s*->\s*(?P<returns>.+)$")


def parse_schema(schema: str) -> dict:
    """Turn one native-function schema string into name, overload, params (name/type/kind/default) and returns."""
    m = FUNC_RE.match(schema.strip())
    if not m:
        raise ValueError(f"cannot parse schema: {schema}")
    params, kind = [], "positional_or_keyword"
    for raw in split_top_level(m["params"]):
        if raw == "*":
            kind = "keyword_only"
            continue
        p = PARAM_RE.match(raw)
        if not p:
            raise ValueError(f"cannot parse parameter {raw!r} in {schema}")
        entry = {"name": p["name"], "type": p["type"], "kind": kind, "has_default": p["default"] is not None}
        if p["default"] is not None:
            entry["default"] = parse_schema_default(p["default"])
        params.append(entry)
    return {"name": m["name"], "overload": m["overload"] or "", "schema": schema.strip(),
            "params": params, "returns": m["returns"].strip()}


def extract_ops(yaml_text: str) -> dict:
    """All overloads (but .out) of the wanted ops; identical duplicates across YAML sections are merged."""
    found: dict[str, dict[str, dict]] = {}
    for line in yaml_text.splitlines():
        m = re.match(r"^\s*-?\s*func:\s*(.+)$", line)
        if not m:
            continue
        head = re.match(r"(\w+)(?:\.(\w+))?\(", m.group(1))
        if not head or head.group(1) not in OPS or head.group(2) == "out":
            continue
        parsed = parse_schema(m.group(1))
        slot = found.setdefault(parsed["name"], {})
        previous = slot.get(parsed["overload"])
        if previous and previous["schema"] != parsed["schema"]:
            raise ValueError(f"conflicting schemas for {parsed['name']}.{parsed['overload']}")
        slot[parsed["overload"]] = parsed
    missing = [name for name in OPS if name not in found]
    if missing:
        raise SystemExit(f"ops not found in {SCHEMA_YAML}: {missing}")
    out = {}
    for name in OPS:
        overloads = sorted(found[name].values(), key=lambda o: (o["overload"] != "", o["overload"]))
        out[name] = {"source": SCHEMA_YAML,
                     "overloads": [{k: o[k] for k in ("overload", "schema", "params", "returns")} for o in overloads]}
    return out


# ---------------------------------------------------------------- Python APIs (ast over the wheel's sources)

class WheelSource:
    """Parsed Python files of the wheel, with just enough import resolution to follow re-exports."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zf = zf
        self.names = set(zf.namelist())
        self._trees: dict[str, ast.Module] = {}

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.zf.read(path).decode("utf-8"), filename=path)
        return self._trees[path]

    def module_path(self, dotted: str) -> str:
        """torchair.configs.x -> torch_npu/dynamo/torchair/configs/x.py (torchair is an alias of that package)."""
        if dotted == "torchair" or dotted.startswith("torchair."):
            dotted = "torch_npu.dynamo." + dotted
        base = dotted.replace(".", "/")
        for cand in (base + ".py", base + "/__init__.py"):
            if cand in self.names:
                return cand
        raise KeyError(f"module {dotted} not in wheel")

    def _relative(self, path: str, level: int, module: str | None) -> str:
        pkg = path.rsplit("/", 1)[0]
        for _ in range(level - 1):
            pkg = pkg.rsplit("/", 1)[0]
        dotted = pkg.replace("/", ".") + ("." + module if module else "")
        return self.module_path(dotted)

    def resolve(self, path: str, name: str) -> tuple[str, ast.AST]:
        """Find the def/class that `name` means inside module `path`, following `from x import y as name`."""
        tree = self.tree(path)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                return path, node
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        target = (self._relative(path, node.level, node.module) if node.level
                                  else self.module_path(node.module))
                        return self.resolve(target, alias.name)
        raise KeyError(f"{name} not defined in {path}")


def literal_or_text(node: ast.AST) -> dict:
    try:
        return {"default": ast.literal_eval(node), "default_is_literal": True}
    except ValueError:
        return {"default": None, "default_is_literal": False, "default_text": ast.unparse(node)}


def signature_of(func: ast.FunctionDef, drop_self: bool) -> dict:
    """Parameters of a def in the same shape as the op schemas (name, kind, default)."""
    a = func.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        if drop_self and i == 0:
            continue
        kind = "positional_only" if i < len(a.posonlyargs) else "positional_or_keyword"
        params.append({"name": arg.arg, "kind": kind, "has_default": default is not None,
                       **(literal_or_text(default) if default is not None else {})})
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        params.append({"name": arg.arg, "kind": "keyword_only", "has_default": default is not None,
                       **(literal_or_text(default) if default is not None else {})})
    return {"params": params, "var_positional": a.vararg is not None, "var_keyword": a.kwarg is not None}


def class_init(cls: ast.ClassDef) -> ast.FunctionDef | None:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            return node
    return None


def extract_api(src: WheelSource, path: str, name: str) -> dict:
    where, node = src.resolve(path, name)
    if isinstance(node, ast.ClassDef):
        init = class_init(node)
        if init is None:
            raise SystemExit(f"{name} in {where} has no __init__ of its own; extend the extractor")
        sig = signature_of(init, drop_self=True)
        return {"source": where, "object": node.name, "kind": "class", **sig}
    return {"source": where, "object": node.name, "kind": "function", **signature_of(node, drop_self=False)}


def extract_constants(src: WheelSource, path: str, name: str) -> dict:
    where, node = src.resolve(path, name)
    attrs = [t.id for stmt in node.body if isinstance(stmt, ast.Assign) for t in stmt.targets
             if isinstance(t, ast.Name)]
    return {"source": where, "object": node.name, "attributes": attrs}


def extract_options(src: WheelSource, path: str, name: str, prefix: str = "") -> dict:
    """Flatten a torchair config class: `self.x = OptionValue(default, choices)` leaves, nested config objects."""
    where, cls = src.resolve(path, name)
    init = class_init(cls)
    options: dict[str, dict] = {}
    for stmt in (init.body if init else []):
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name)):
            continue
        target = stmt.targets[0]
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "self") or target.attr.startswith("_"):
            continue
        key, ctor, args = prefix + target.attr, stmt.value.func.id, stmt.value.args
        if ctor.endswith("Value"):
            entry = {"type": ctor}
            if args:
                entry.update(literal_or_text(args[0]))
            if ctor == "OptionValue" and len(args) > 1:
                try:
                    entry["choices"] = ast.literal_eval(args[1])
                except ValueError:
                    pass
            options[key] = entry
        else:
            try:
                options.update(extract_options(src, where, ctor, key + "."))
            except KeyError:
                options[key] = {"type": ctor}
    return options


# ---------------------------------------------------------------- main


def build(wheel: str) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        src = WheelSource(zf)
        version = re.search(r"^Version:\s*(\S+)", zf.read(next(n for n in src.names if n.endswith(
            ".dist-info/METADATA"))).decode(), re.M).group(1)
        ops = extract_ops(zf.read(SCHEMA_YAML).decode("utf-8"))
        apis = {key: extract_api(src, *where) for key, where in PYTHON_APIS.items()}
        constants = {key: extract_constants(src, *where) for key, where in CONSTANT_CLASSES.items()}
        configs = {key: {"source": src.resolve(*where)[0], "options": extract_options(src, *where)}
                   for key, where in CONFIG_TREES.items()}
    return {
        "wheel": {"name": os.path.basename(wheel), "sha256": file_sha256(wheel), "torch_npu_version": version},
        "generated_by": "scripts/extract_npu_schemas.py",
        "note": "torch_npu.X is an alias of torch.ops.npu.X; 'torchair' is torch_npu.dynamo.torchair.",
        "ops": ops,
        "python_apis": apis,
        "constants": constants,
        "config_options": configs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", help="path to torch_npu-2.13.0-*.whl (pip download --no-deps torch-npu==2.13.0)")
    ap.add_argument("--out", default=OUT_DEFAULT)
    args = ap.parse_args(argv)
    data = build(args.wheel)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    n_apis = len(data["python_apis"])
    print(f"wrote {args.out}: {len(data['ops'])} ops, {n_apis} Python APIs from {data['wheel']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
