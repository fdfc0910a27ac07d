"""The ladder table (steps.py) is the one place that knows the steps: what each swaps and declares,
the order the part classes inherit in, and that no other module of the package names a step."""
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from qwen3moe_tutorial import steps
from qwen3moe_tutorial.generate import ModelRunner
from qwen3moe_tutorial.model import Parts
from qwen3moe_tutorial.steps import STEP_NAMES, STEPS, recipe_upto

PACKAGE = Path(steps.__file__).parent
# the same word in another vocabulary: ops' "reference" provider is the pure-PyTorch kernels, not a step
OTHER_MEANINGS = {"ops/__init__.py": {"reference"}}


def docstrings(tree) -> set[int]:
    """ids of the Constant nodes that are module, class or function docstrings."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def step_names_in_code(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string in code (docstrings aside) that is a step name or, for the names
    with an underscore, mentions one: what a question to the ladder table should replace."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    pattern = re.compile(r"\b(" + "|".join(n for n in STEP_NAMES if "_" in n) + r")\b")
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in STEP_NAMES or pattern.search(node.value):
                hits.append((node.lineno, node.value))
    return hits


def test_no_step_name_in_package_code_outside_the_table():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "steps.py":
            rel = path.relative_to(PACKAGE).as_posix()
            hits = [h for h in step_names_in_code(path.read_text()) if h[1] not in OTHER_MEANINGS.get(rel, ())]
            if hits:
                found[path.relative_to(PACKAGE).as_posix()] = hits
    assert not found, f"ask the recipe (steps.Recipe) instead of naming a step: {found}"


def test_the_scan_finds_what_it_looks_for():
    code = 'x = "aiv"\ny = f"upto {z} after graph_mode"\nif "reference" in s: pass\n'
    assert [line for line, _ in step_names_in_code(code)] == [1, 2, 3]
    assert step_names_in_code('def f():\n    """Chapter on graph_mode."""\n    return "a reference"\n') == []


@pytest.mark.parametrize("part", [f.name for f in dataclasses.fields(Parts)] + ["runner"])
def test_ladder_order_matches_the_class_hierarchy(part):
    """Each step that swaps a part swaps in a subclass of the class it replaces, so folding the table
    in order never drops a method an earlier step supplied (reordering rows breaks this test)."""
    current = getattr(Parts(), part, ModelRunner)
    for s in STEPS:
        new = dict(s.swaps).get(part)
        if new is not None:
            assert issubclass(new, current), f"{s.name} swaps {part} to {new.__name__}, not a {current.__name__}"
            current = new


def test_recipe_answers_from_the_steps_declarations():
    by_step = {name: recipe_upto(name) for name in STEP_NAMES}
    for flag in ("tensor_parallel", "splits_experts", "grouped_experts", "graph", "cached_graph"):
        first = steps.first_step(flag).name
        assert [getattr(r, flag) for r in by_step.values()] == \
            [STEP_NAMES.index(n) >= STEP_NAMES.index(first) for n in STEP_NAMES], flag
    assert by_step[STEP_NAMES[-1]].env == {"HCCL_OP_EXPANSION_MODE": "AIV"}
    assert all(r.env == {} for r in list(by_step.values())[:-1])
    assert [r.steps for r in by_step.values()] == [STEP_NAMES[: i + 1] for i in range(len(STEP_NAMES))]
    assert by_step["hf_baseline"].engine == "hf" and by_step["reference"].engine == "ours"


def test_the_final_model_in_one_place():
    recipe = recipe_upto()
    table = {row["part"]: row for row in recipe.part_table()}
    assert table["attention"]["class"] == "fused.FusedAttention" and table["attention"]["set_by"] == "fused_attention"
    assert table["attention"]["hooks"]["project_out"] == "tp.AttentionTP"        # the o_proj all-reduce
    assert table["attention"]["hooks"]["load"] == "tp.AttentionMergedQKV"
    assert table["moe"]["hooks"]["forward"] == "fused.FusedRoutingGMM"
    assert table["embedding"]["set_by"] == "attention_tp" and table["model"]["set_by"] == "fused_rmsnorm"
    text = recipe.summary()
    assert "fused.FusedAttention  (from fused_attention)" in text and "compile.CachedGraphRunner" in text
    assert recipe_upto("reference").part_table()[0]["set_by"] == "reference"
    assert "transformers" in recipe_upto("hf_baseline").summary()


def test_a_step_swaps_only_parts_engine_or_runner():
    with pytest.raises(ValueError, match="can swap the parts"):
        steps.swaps(attn=object)
    assert "declares tensor_parallel" in str(steps.step("attention_tp"))


def test_a_new_step_is_one_row_and_one_class(monkeypatch):
    """What adding a rung takes: a part class and a row. The recipe, the TP check and the launcher's
    environment follow from the table."""
    from qwen3moe_tutorial import fused, launch

    class NewAttention(fused.FusedAttention):
        pass

    row = steps.Step("new_attention", "12_new", "a new attention kernel", steps.swaps(attention=NewAttention),
                     env=(("NEW_FLAG", "1"),))
    monkeypatch.setattr(steps, "STEPS", STEPS + (row,))
    monkeypatch.setattr(steps, "STEP_NAMES", STEP_NAMES + ("new_attention",))
    recipe = steps.recipe_upto("new_attention")
    assert recipe.parts.attention is NewAttention and recipe.graph and recipe.tensor_parallel
    assert launch.launcher_env(recipe) == {"HCCL_OP_EXPANSION_MODE": "AIV", "NEW_FLAG": "1"}
    assert recipe.part_table()[1]["set_by"] == "new_attention"
