"""The book as a product: what the prose names exists, every page is there and executed, every
figure has alt text.

- Names: every `qwen3moe_tutorial.x.y` in book/*.md and notebooks/*.md (prose and code) and every
  name imported with `from qwen3moe_tutorial[.x] import a, b` resolves (import, then getattr).
- Pages: every file in _toc.yml exists; every notebooks/*.md has an executed .ipynb with the same
  code cells (compared through jupytext), every code cell run, no error output.
- Figures: a code cell whose stored output is an image must carry alt text, cell metadata
  `mystnb.image.alt` of at least 40 characters (myst-nb puts it on the <img>; without it the HTML's
  alt is the image's file name). A title or a caption does not replace it: a screen reader needs
  the alt text. The .ipynb (what the book renders) and its .md source (what
  scripts/execute_notebooks.sh re-creates the .ipynb from) must carry the same alt text.
"""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*ROOT.glob("book/*.md"), *ROOT.glob("notebooks/*.md")])
NOTEBOOK_SOURCES = sorted(ROOT.glob("notebooks/*.md"))
NOTEBOOKS = sorted(ROOT.glob("notebooks/*.ipynb"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---- (a) every qwen3moe_tutorial name in the prose and code resolves ----------------------------------
DOTTED = re.compile(r"\bqwen3moe_tutorial(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(qwen3moe_tutorial(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)",
                         re.MULTILINE)


def names_in(text: str) -> set[str]:
    """Dotted names, plus `module.name` for each name of a `from qwen3moe_tutorial... import` line."""
    names = set(DOTTED.findall(text))
    for module, imported in FROM_IMPORT.findall(text):
        for item in imported.strip("()").replace("\\\n", " ").split(","):
            name = item.split("#")[0].strip().split(" as ")[0].strip()
            if name and name != "*":
                names.add(f"{module}.{name}")
    return names


def resolve(dotted: str):
    """Import the longest importable module prefix and getattr the rest; raise if anything is missing."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ModuleNotFoundError:
            raise AttributeError(f"{'.'.join(parts[:i])} has no attribute or submodule {part!r}") from None
    return obj


def test_name_extraction_covers_prose_code_and_imports():
    text = ("See `qwen3moe_tutorial.steps.STEPS`.\n"
            "from qwen3moe_tutorial import hf, platform as p\n"
            "from qwen3moe_tutorial.ops import (use_provider,\n    current_provider)  # two\n"
            "import qwen3moe_tutorial.roofline as rf\n")
    assert names_in(text) == {"qwen3moe_tutorial.steps.STEPS", "qwen3moe_tutorial.hf", "qwen3moe_tutorial.platform",
                              "qwen3moe_tutorial.ops",
                              "qwen3moe_tutorial.ops.use_provider", "qwen3moe_tutorial.ops.current_provider",
                              "qwen3moe_tutorial.roofline"}
    assert resolve("qwen3moe_tutorial.parallel.TP.split")
    with pytest.raises(AttributeError, match="no attribute or submodule 'Nope'"):
        resolve("qwen3moe_tutorial.steps.Nope")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_package_name_resolves(page):
    names = names_in(page.read_text(encoding="utf-8"))
    missing = {}
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing[name] = str(e)
    assert not missing, f"{rel(page)} names code that does not exist: " + "; ".join(
        f"{n} ({why})" for n, why in missing.items())


# ---- (b) the table of contents, the notebook pairs, executed without errors ------------------------------
def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def test_toc_is_readable_and_has_the_appendices():
    files = toc_files()
    assert files[0] == "book/intro" and len(files) == len(set(files)), files
    for page in ("book/how_to_read", "notebooks/results", "book/lab_log", "book/glossary", "book/bibliography"):
        assert page in files


@pytest.mark.parametrize("entry", toc_files())
def test_every_toc_entry_exists(entry):
    if entry.startswith("notebooks/"):          # the book renders the executed notebook, not its MyST source
        candidates = [ROOT / f"{entry}.ipynb"] if not entry.endswith(".ipynb") else [ROOT / entry]
    else:
        candidates = [ROOT / entry] if Path(entry).suffix else [ROOT / f"{entry}.md", ROOT / f"{entry}.ipynb"]
    assert any(p.is_file() for p in candidates), f"_toc.yml lists {entry!r} but none of " \
        f"{[rel(p) for p in candidates]} exists"


def code_sources(nb) -> list[str]:
    src = lambda c: c["source"] if isinstance(c["source"], str) else "".join(c["source"])
    return [src(c).strip() for c in nb["cells"] if c["cell_type"] == "code"]


def error_outputs(nb) -> list[str]:
    out = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []):
            if o["output_type"] == "error":
                out.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
            elif o["output_type"] == "stream" and "Traceback (most recent call last)" in "".join(o.get("text", "")):
                out.append(f"cell {i}: a traceback on {o.get('name')}")
    return out


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=rel)
def test_notebook_is_paired_executed_and_clean(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{rel(source)} has no executed pair: run bash scripts/execute_notebooks.sh {rel(source)}"
    executed = json.loads(ipynb.read_text(encoding="utf-8"))
    md_code, nb_code = code_sources(jupytext.read(source)), code_sources(executed)
    if md_code != nb_code:
        first = next((i for i, (a, b) in enumerate(zip(md_code, nb_code)) if a != b), min(len(md_code), len(nb_code)))
        pytest.fail(f"{rel(ipynb)} is stale: its code cells differ from {rel(source)} from code cell {first} on "
                    f"({len(md_code)} code cells in the .md, {len(nb_code)} in the .ipynb); re-execute it")
    unexecuted = [i for i, c in enumerate(executed["cells"]) if c["cell_type"] == "code" and not c.get("execution_count")]
    assert not unexecuted, f"{rel(ipynb)}: cells {unexecuted} were never executed"
    errors = error_outputs(executed)
    assert not errors, f"{rel(ipynb)} stores error output: " + "; ".join(errors)


# ---- (c) every figure has alt text -----------------------------------------------------------------------
IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")
MIN_ALT_CHARS = 40


def cell_source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def is_figure(cell: dict) -> bool:
    """A code cell with an image among its stored outputs."""
    return cell["cell_type"] == "code" and any(
        t in o.get("data", {}) for o in cell.get("outputs", []) for t in IMAGE_TYPES)


def alt_text(cell: dict) -> str:
    """The cell's `mystnb.image.alt` metadata, stripped ("" when there is none)."""
    alt = (((cell.get("metadata") or {}).get("mystnb") or {}).get("image") or {}).get("alt")
    return alt.strip() if isinstance(alt, str) else ""


def alt_text_problem(cell: dict) -> str | None:
    """Why a figure cell's alt text is not good enough, or None if it is."""
    alt = alt_text(cell)
    if not alt:
        return "no alt text (cell metadata mystnb.image.alt)"
    if len(alt) < MIN_ALT_CHARS:
        return f"alt text of {len(alt)} characters, fewer than {MIN_ALT_CHARS}: {alt!r}"
    return None


def test_figure_rule_examples():
    code = lambda src, **meta: {"cell_type": "code", "source": src, "metadata": meta,
                                "outputs": [{"output_type": "display_data", "data": {"image/png": "..."}}]}
    good = "Line chart of decode milliseconds per step, log scale, one line per run."
    assert alt_text_problem(code("plt.plot(x)", mystnb={"image": {"alt": good}})) is None
    assert alt_text_problem(code("plt.plot(x)", mystnb={"image": {"alt": f"  {good}\n"}})) is None
    # a title or a caption is not alt text
    assert "no alt text" in alt_text_problem(code("ax.set_title('decode time per step on this machine')"))
    assert "no alt text" in alt_text_problem(code("plt.plot(x)", mystnb={"figure": {"caption": good}}))
    assert "no alt text" in alt_text_problem(code("plt.plot(x)", mystnb={"image": {"alt": "   "}}))
    assert "no alt text" in alt_text_problem(code("plt.plot(x)", mystnb={"image": {"width": "80%"}}))
    assert "fewer than 40" in alt_text_problem(code("plt.plot(x)", mystnb={"image": {"alt": "a line"}}))
    assert is_figure(code("plt.plot(x)")) and not is_figure({**code("1"), "outputs": []})


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=rel)
def test_every_figure_has_alt_text(notebook):
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    source = notebook.with_suffix(".md")
    md_alt = {}                                   # code source -> alt text in the .md, where there is one
    if source.is_file():
        for cell in jupytext.read(source).cells:
            if cell.cell_type == "code":
                md_alt.setdefault(cell.source.strip(), alt_text(cell))
    bad = []
    for i, cell in enumerate(cells):
        if not is_figure(cell):
            continue
        first_line = (cell_source(cell).strip().splitlines() or [""])[0][:60]
        where = f"{rel(notebook)} cell {i} ({first_line!r})"
        problem = alt_text_problem(cell)
        if problem:
            bad.append(f"{where}: {problem}")
        elif source.is_file() and md_alt.get(cell_source(cell).strip(), alt_text(cell)) != alt_text(cell):
            bad.append(f"{where}: the alt text differs from the same cell's in {rel(source)}, which "
                       f"scripts/execute_notebooks.sh re-creates the .ipynb from")
    assert not bad, ("figures whose alt text is missing, too short or out of step with the .md:\n  - " + "\n  - ".join(bad) +
                     f"\nDescribe each figure (what kind of chart, what the axes, panels and colours show, what "
                     f"to see; at least {MIN_ALT_CHARS} characters) in the code cell's metadata in the .md:\n"
                     f"  ---\n  mystnb:\n    image:\n      alt: Bar chart of ...\n  ---\n"
                     f"then carry it into the .ipynb (jupytext --update --to ipynb, or re-execute).")


# ---- (d) every A3 number comes from the one model ----------------------------------------------------
def stored_text(notebook: Path) -> str:
    """Every stored text output of an executed notebook (streams and text/plain), joined."""
    out = []
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        for o in cell.get("outputs", []):
            text = o.get("text") if o["output_type"] == "stream" else (o.get("data") or {}).get("text/plain")
            if text:
                out.append(text if isinstance(text, str) else "".join(text))
    return "".join(out)


@pytest.mark.parametrize("step", [s.name for s in __import__("qwen3moe_tutorial.steps").steps.STEPS])
def test_each_chapter_opens_with_its_predicted_a3_row(step):
    """A chapter's A3 prediction is `roofline.step_change` of its step, printed as the model computes it
    now: a stale or typed number fails here."""
    from qwen3moe_tutorial import roofline
    from qwen3moe_tutorial.steps import step as ladder_step

    notebook = ROOT / "notebooks" / f"{ladder_step(step).chapter}.ipynb"
    assert roofline.step_change(step) in stored_text(notebook), \
        f"{rel(notebook)} does not show roofline.step_change({step!r}) as the model computes it now; re-execute it"


def test_overview_shows_the_whole_predicted_ladder():
    from qwen3moe_tutorial import roofline
    from qwen3moe_tutorial.config import preset

    text = stored_text(ROOT / "notebooks" / "00_overview_and_roofline.ipynb")
    for name, tp in roofline.BOOK_CONFIGS:
        assert roofline.format_ladder(roofline.predict_ladder(preset(name), tp)) in text, (name, tp)
