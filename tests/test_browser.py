"""The built book in a real browser: every page of _build/html opened in headless Chromium.

Each page must have a title and a heading, load every image (each with real alt text), render
every embedded widget, show no error output or raw Markdown table, and link only to files and
anchors that exist; a full-page screenshot of each goes to
_build/screenshots/ (scripts/browser_check.py does the work). Skipped, with the reason, when the
book has not been built (`jupyter-book build . -W -n --keep-going`) or Chromium is not installed
(`apt-get install -y chromium`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"


def _load_checker():
    spec = importlib.util.spec_from_file_location("browser_check", ROOT / "scripts" / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


browser_check = _load_checker()
BUILT = (HTML / "index.html").is_file()
CHROMIUM = browser_check.find_chromium()
PAGES = browser_check.list_pages(HTML) if BUILT else []
SKIP_REASON = None
if not BUILT:
    SKIP_REASON = f"no built book in {HTML}: run `jupyter-book build . -W -n --keep-going` first"
elif CHROMIUM is None:
    SKIP_REASON = "Chromium is not installed (apt-get install -y chromium) and $CHROMIUM is not set"


@pytest.fixture(scope="module")
def report():
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    results = browser_check.check_site(HTML, SCREENSHOTS, CHROMIUM)   # one browser session, every page
    return {r["page"]: r for r in results}


@pytest.mark.parametrize("page", PAGES or ["(no built book)"])
def test_page_renders_in_chromium(report, page):
    result = report[page]
    assert not result["problems"], f"{page}:\n  - " + "\n  - ".join(result["problems"])
    if "redirect" not in result:
        shot = Path(result["screenshot"])
        assert shot.is_file() and shot.stat().st_size > 1000, f"{page}: no usable screenshot at {shot}"


def test_every_toc_page_was_built_and_checked(report):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    stack = [toc.get("parts", []), toc.get("chapters", [])]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    missing = [f for f in files if f"{Path(f).with_suffix('')}.html" not in report]
    assert not missing, f"_toc.yml entries with no checked HTML page: {missing}"


def test_the_checker_catches_what_it_claims(tmp_path):
    """A small broken site: each defect must be reported (guards the checks themselves)."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium) and $CHROMIUM is not set")
    import base64

    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
    (tmp_path / "ok.png").write_bytes(png)
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    (tmp_path / "good.html").write_text(
        '<html><head><title>Good</title></head><body><h1 id="top">Good</h1><img src="ok.png" alt="dot">'
        '<a href="#top">up</a><a href="bad.html#missing">x</a><a href="https://example.org/">ext</a></body></html>')
    (tmp_path / "bad.html").write_text(
        '<html><head><title></title></head><body><img src="gone.png">'
        '<div class="cell_output"><div class="output traceback">Traceback (most recent call last): boom</div>'
        '<p>| a | b | |---|---| | 1 | 2 |</p></div><a href="nowhere.html">dead</a>'
        '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "m1", "version_major": 2}</script>'
        '</body></html>')
    results = {r["page"]: r for r in browser_check.check_site(tmp_path, tmp_path / "shots", CHROMIUM)}
    assert results["index.html"]["problems"] == [] and results["index.html"]["redirect"] == "good.html"
    good, bad = results["good.html"]["problems"], " | ".join(results["bad.html"]["problems"])
    assert good == ["broken link bad.html#missing: no element with id 'missing' in bad.html"], good
    for expected in ("no <title>", "no <h1>", "image did not load: gone.png", "error output: Traceback",
                     "Markdown table shown as raw text", "broken link nowhere.html: no such file",
                     "image without alt text: gone.png", "widgets not rendered: 0 of 1 embedded views"):
        assert expected in bad, (expected, bad)
    assert (tmp_path / "shots" / "good.png").stat().st_size > 0
