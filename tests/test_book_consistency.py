"""The book is one execution and says one thing: every executed notebook carries the commit it was
executed at (scripts/execute_notebooks.sh writes it), all the same commit, the package and the
notebook sources unchanged since, and the results page prints it; a quantity shown in two tables
(operators per token of a step, a predicted A3 row, the ladder's steps) has one value everywhere.
Also the book's prose rules a reader can count: 900-1,400 words per chapter, a glossary term linked
({term}) the first time a chapter uses it.

Tables are read from the Markdown outputs `qwen3moe_tutorial.book.show_table` writes: a table whose
first column is "step" is keyed by (column header, step), so a header names what it is measured on
(the model, the TP size); any other table is keyed by (caption, column header, first cell) when it
has a caption.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from qwen3moe_tutorial.steps import STEP_NAMES

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("notebooks/*.ipynb"))
CHAPTERS = sorted(ROOT.glob("notebooks/[0-9][0-9]_*.md"))
META = "qwen3moe_tutorial"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---- tables in stored outputs ------------------------------------------------------------------------
def markdown_outputs(nb: dict) -> list[str]:
    out = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            md = (o.get("data") or {}).get("text/markdown")
            if md:
                out.append(md if isinstance(md, str) else "".join(md))
    return out


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def tables_in(markdown: str) -> list[tuple[str | None, list[str], list[list[str]]]]:
    """(caption, header, rows) of every pipe table; the caption is an italic line just above it."""
    found, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1]):
            above = [ln.strip() for ln in lines[:i] if ln.strip()]
            caption = above[-1].strip("*_ ") if above and re.fullmatch(r"[*_].+[*_]", above[-1]) else None
            header, rows, i = split_row(lines[i]), [], i + 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            found.append((caption, header, rows))
        else:
            i += 1
    return found


def quantities(named_notebooks: dict[str, dict]) -> dict[tuple, list[tuple[str, str]]]:
    """Key -> [(value, where)] over every keyed table cell of the notebooks."""
    seen: dict[tuple, list[tuple[str, str]]] = {}
    for where, nb in named_notebooks.items():
        for md in markdown_outputs(nb):
            for caption, header, rows in tables_in(md):
                by_step = header[0].lower() == "step"
                if not by_step and not caption:
                    continue
                if len({row[0] for row in rows}) < len(rows):          # the first column is not a key
                    continue
                for row in rows:
                    for col, value in zip(header[1:], row[1:]):
                        key = (col, row[0]) if by_step else (caption, col, row[0])
                        seen.setdefault(key, []).append((value, where))
    return seen


def disagreements(named_notebooks: dict[str, dict]) -> list[str]:
    bad = []
    for key, values in quantities(named_notebooks).items():
        if len({v for v, _ in values}) > 1:
            bad.append(f"{' / '.join(key)}: " + ", ".join(f"{v} ({w})" for v, w in values))
    return bad


def step_columns(named_notebooks: dict[str, dict]) -> list[tuple[str, list[str]]]:
    return [(where, [r[0] for r in rows]) for where, nb in named_notebooks.items() for md in markdown_outputs(nb)
            for _, header, rows in tables_in(md) if header[0].lower() == "step"]


def load_all() -> dict[str, dict]:
    return {rel(p): json.loads(p.read_text(encoding="utf-8")) for p in NOTEBOOKS}


def table_output(rows, caption=None, header=("step", "ops/token (tiny, TP 1)")) -> dict:
    md = ([f"*{caption}*", ""] if caption else []) + ["| " + " | ".join(header) + " |", "|---|---|",
                                                      *(f"| {a} | {b} |" for a, b in rows)]
    return {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data",
                                                         "data": {"text/markdown": "\n".join(md)}}]}]}


def test_the_checker_finds_one_changed_number():
    a = table_output([("reference", "431"), ("merged_qkv", "263")])
    b = table_output([("merged_qkv", "263"), ("aiv", "110")])
    assert disagreements({"a": a, "b": b}) == []
    c = table_output([("merged_qkv", "267")])
    assert disagreements({"a": a, "c": c}) == ["ops/token (tiny, TP 1) / merged_qkv: 263 (a), 267 (c)"]
    # a captioned table of anything is keyed by its caption; an uncaptioned one is not compared
    d1 = table_output([("x", "1")], caption="bytes per rank, 30B", header=("part", "TP 8"))
    d2 = table_output([("x", "2")], caption="bytes per rank, 30B", header=("part", "TP 8"))
    assert len(disagreements({"d1": d1, "d2": d2})) == 1
    assert disagreements({"d1": table_output([("x", "1")], header=("part", "TP 8")),
                          "d2": table_output([("x", "2")], header=("part", "TP 8"))}) == []
    # a table whose first column repeats is not keyed by it
    assert disagreements({"e": table_output([("x", "1"), ("x", "2")], caption="targets", header=("run", "limit"))}) == []


def test_quantities_agree_across_the_book():
    bad = disagreements(load_all())
    assert not bad, "the same quantity has different values in different places:\n  " + "\n  ".join(bad)


def test_every_step_table_follows_the_ladder():
    order = {name: i for i, name in enumerate(STEP_NAMES)}
    tables = step_columns(load_all())
    assert tables, "no step table in any executed notebook (book.show_ladder writes them)"
    for where, steps in tables:
        known = [s for s in steps if s in order]
        assert known == sorted(known, key=order.get), f"{where}: steps out of ladder order: {steps}"
        if STEP_NAMES[0] in known and STEP_NAMES[-1] in known:
            assert known == list(STEP_NAMES), f"{where}: a whole-ladder table without every step: {steps}"


# ---- one execution ---------------------------------------------------------------------------------------
def executed_commit(path: Path) -> str | None:
    return (json.loads(path.read_text(encoding="utf-8"))["metadata"].get(META) or {}).get("commit")


def test_every_notebook_was_executed_at_one_clean_commit():
    commits = {rel(p): executed_commit(p) for p in NOTEBOOKS}
    missing = [p for p, c in commits.items() if not c]
    assert not missing, f"executed without the commit in metadata.{META} (run scripts/execute_notebooks.sh): {missing}"
    assert len(set(commits.values())) == 1, f"notebooks executed at different commits: {commits}"
    commit = next(iter(commits.values()))
    assert not commit.endswith("-dirty"), f"executed from a checkout with uncommitted changes ({commit})"
    results = json.loads((ROOT / "notebooks" / "results.ipynb").read_text(encoding="utf-8"))
    text = json.dumps(results["cells"])
    assert commit[:12] in text, "the results page does not print the commit the book was executed at"


def test_the_code_is_what_the_book_executed():
    """Since the executed commit, nothing the notebooks run has changed: the package and the sources."""
    commit = executed_commit(NOTEBOOKS[0])
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone's history")
    changed = subprocess.run(["git", "-C", str(ROOT), "diff", "--name-only", commit, "--", "qwen3moe_tutorial",
                              "notebooks/*.md"], capture_output=True, text=True).stdout.split()
    changed = [p for p in changed if not p.startswith("qwen3moe_tutorial/data/") or p.endswith((".json", ".safetensors"))]
    assert not changed, f"changed since the book was executed at {commit[:12]}: {changed}; re-execute the book " \
                        f"(bash scripts/execute_notebooks.sh)"


# ---- prose a reader can count ------------------------------------------------------------------------------
def prose(md_source: str) -> str:
    """The chapter's Markdown prose: front matter, code cells, fenced code and directive options
    dropped; the text inside directives (admonitions, exercises, solutions) kept."""
    text = re.sub(r"\A---\n.*?\n---\n", "", md_source, flags=re.S)
    kept, stack = [], []                        # stack: (fence, keeps its body)
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,}|:{3,})(\{[^}]*\})?(.*)$", line)
        if m and stack and m.group(1) == stack[-1][0] and not m.group(2) and not m.group(3).strip():
            stack.pop()                                               # a closing fence
            continue
        if m and (m.group(2) or m.group(3).strip() or not stack or not stack[-1][1]):
            body = bool(m.group(2)) and m.group(2) != "{code-cell}"   # a directive's body is prose
            stack.append((m.group(1), body and (not stack or stack[-1][1])))
            continue
        if stack and not stack[-1][1]:
            continue
        if re.match(r"^\s*:[a-z-]+:", line) or line.startswith("+++"):  # directive options, cell breaks
            continue
        kept.append(line)
    return "\n".join(kept)


def words(md_source: str) -> int:
    return len(prose(md_source).split())


@pytest.mark.parametrize("chapter", CHAPTERS, ids=rel)
def test_chapter_prose_is_900_to_1400_words(chapter):
    n = words(chapter.read_text(encoding="utf-8"))
    assert 900 <= n <= 1400, f"{rel(chapter)}: {n} words of prose; a chapter has 900-1,400"


def glossary_terms() -> list[list[str]]:
    """The glossary's entries, each a list of its names (an entry may have several, one per line)."""
    body = (ROOT / "book" / "glossary.md").read_text(encoding="utf-8").split("```{glossary}")[1].split("\n```")[0]
    entries: list[list[str]] = []
    previous_was_name = False
    for line in body.splitlines():
        if line.strip() and not line.startswith((" ", "\t")):
            if previous_was_name:
                entries[-1].append(line.strip())
            else:
                entries.append([line.strip()])
            previous_was_name = True
        elif line.strip():
            previous_was_name = False
    return entries


TERM_ROLE = re.compile(r"\{term\}`([^`<]+?)(?:\s*<([^>]+)>)?`")


def first_unlinked_uses(md_source: str) -> list[str]:
    """Glossary names whose first use in the prose is not a {term} link (headings and admonition titles
    are not prose; inline code is not a use)."""
    text = prose(md_source)
    text = re.sub(r"^#.*$|^```\{admonition\}.*$", "", text, flags=re.M)
    links = [(m.start(), (m.group(2) or m.group(1)).strip().lower()) for m in TERM_ROLE.finditer(text)]
    plain = TERM_ROLE.sub(lambda m: "\0" * len(m.group(0)), text)            # keep offsets
    plain = re.sub(r"`[^`\n]*`", lambda m: "\0" * len(m.group(0)), plain)     # code is not a use
    plain = re.sub(r"\[[^\]\n]*\]\([^)\n]*\)|\{[a-z]+\}`[^`]*`", lambda m: "\0" * len(m.group(0)), plain)
    missing = []
    for names in glossary_terms():
        targets = {n.lower() for n in names}
        uses = [m.start() for n in names for m in re.finditer(rf"(?<![\w-]){re.escape(n)}(?![\w-])", plain,
                                                               flags=0 if n.isupper() or "_" in n else re.I)]
        if not uses:
            continue
        linked = [at for at, target in links if target in targets]
        if not linked or min(linked) > min(uses):
            missing.append(names[0])
    return missing


def test_first_use_rule_examples():
    assert first_unlinked_uses("A {term}`die` is half a card.") == ["card"]
    assert first_unlinked_uses("A {term}`die` is half a {term}`card`; a die again.") == []
    assert first_unlinked_uses("Two {term}`dies <die>`, one `die` in code.") == []
    assert first_unlinked_uses("# The die\n\nA {term}`die`.") == []


@pytest.mark.parametrize("chapter", CHAPTERS, ids=rel)
def test_glossary_terms_link_on_first_use(chapter):
    missing = first_unlinked_uses(chapter.read_text(encoding="utf-8"))
    assert not missing, f"{rel(chapter)}: first use not linked to the glossary ({{term}}`...`): {missing}"


# ---- stored outputs a reader would not want ------------------------------------------------------------------
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:root|home|tmp|work|Users|var/folders)/")
WARNING = re.compile(r"\b\w*Warning: ")                  # how a raised warning prints (a category, a colon)


def output_texts(nb: dict):
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []):
            if o["output_type"] == "stream":
                yield i, o.get("name", ""), "".join(o.get("text", ""))
            for kind, value in (o.get("data") or {}).items():
                if kind.startswith("text/"):
                    yield i, kind, value if isinstance(value, str) else "".join(value)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=rel)
def test_outputs_carry_no_warnings_and_no_machine_paths(notebook):
    bad = []
    for i, kind, text in output_texts(json.loads(notebook.read_text(encoding="utf-8"))):
        for pattern, what in ((MACHINE_PATH, "a path of the machine"), (WARNING, "a warning")):
            m = pattern.search(text)
            if m:
                bad.append(f"cell {i} ({kind}): {what}: ...{text[max(0, m.start() - 60):m.end() + 40]!r}...")
    assert not bad, f"{rel(notebook)}:\n  " + "\n  ".join(bad)
