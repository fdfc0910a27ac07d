"""Open every page of the built book in headless Chromium; check it rendered; screenshot it.

    python scripts/browser_check.py [--html _build/html] [--out _build/screenshots] [--chromium PATH]

For each HTML page under --html (not _static/, _sources/, _images/) the check fails when:
- the page has no <title> or no non-empty <h1>;
- an <img> did not load (not complete, or naturalWidth 0);
- an <img> in the page's content (<main>, else <body>) has no alt text: no alt attribute, an empty
  one, or one that is only the image's file name (what Sphinx writes when a figure has none; a
  notebook figure gets real alt text from its cell's `mystnb.image.alt` metadata);
- an embedded widget view (a widget-view+json script) did not turn into a rendered widget within
  10 s: the widget scripts come from _static/widgets/ (scripts/fetch_widget_js.py), never a CDN;
- an output cell shows an error (.output.error / .output.traceback, or a stderr output or any cell
  output containing "Traceback (most recent call last)");
- an output holds a Markdown table that was rendered as plain text (myst-nb renders Markdown
  outputs as CommonMark, which has no tables, unless the cell or the book asks for gfm);
- a relative link (a[href], link[href], script[src], img[src]) points to a file that does not
  exist, or to an #anchor that the target page does not define.
A full-page PNG of each page goes to --out, with report.json beside it.

Chromium is driven through the DevTools protocol over a pipe (--remote-debugging-pipe: commands on
fd 3, replies on fd 4, NUL-separated JSON), so nothing beyond the standard library is needed. Every
host name resolves to nothing (--host-resolver-rules), so the pages are checked as they render
offline and nothing is fetched from the network.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = ("_static", "_sources", "_images")
VIEWPORT = (1280, 900)
MAX_SCREENSHOT_HEIGHT = 16000      # px; longer pages are cut here (Chromium's texture limit is ~16k)
PAGE_TIMEOUT_S = 30.0

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--remote-debugging-pipe",
)


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: --chromium, $CHROMIUM, or chromium / chromium-browser on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser",
                      "/usr/bin/chromium"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
    return None


def list_pages(html_dir: Path) -> list[str]:
    """Every HTML page of the build, as paths relative to html_dir, sorted."""
    pages = []
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir)
        if rel.parts[0] not in SKIP_DIRS:
            pages.append(rel.as_posix())
    return pages


# ---- static checks (no browser) ------------------------------------------------------------------
class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.refresh: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            m = re.search(r"url\s*=\s*(.+)$", a.get("content") or "", re.I)
            self.refresh = m.group(1).strip().strip("'\"") if m else None


_parsed: dict[Path, _Anchors] = {}


def parse(path: Path) -> _Anchors:
    if path not in _parsed:
        p = _Anchors()
        p.feed(path.read_text(encoding="utf-8", errors="replace"))
        _parsed[path] = p
    return _parsed[path]


EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")     # http:, https:, mailto:, data:, //host


def broken_link(html_dir: Path, page: Path, href: str) -> str | None:
    """Why `href` on `page` is broken, or None if it resolves (external links are not checked)."""
    href = href.strip()
    if not href or EXTERNAL.match(href):
        return None
    parts = urlsplit(href)
    fragment = unquote(parts.fragment)
    if parts.path:
        target = (page.parent / unquote(parts.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            return f"{href}: no such file ({os.path.relpath(target, html_dir)})"
    else:
        target = page
    if fragment and target.suffix == ".html" and fragment not in parse(target).ids:
        return f"{href}: no element with id {fragment!r} in {os.path.relpath(target, html_dir)}"
    return None


# ---- the browser -----------------------------------------------------------------------------------
def _above_4(fd: int) -> int:
    """The same pipe end on a descriptor number of 10 or more (the original is closed)."""
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium with a DevTools session on one page target, over --remote-debugging-pipe."""

    def __init__(self, chromium: str):
        self.profile = tempfile.mkdtemp(prefix="browser-check-profile-")
        cmd_r, self._cmd_w = os.pipe()           # we write commands; Chromium reads them on fd 3
        self._out_r, out_w = os.pipe()           # Chromium writes replies on fd 4; we read them
        cmd_r, out_w = _above_4(cmd_r), _above_4(out_w)     # so moving them onto 3 and 4 clobbers nothing
        launch = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", launch, chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "about:blank"],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"}, timeout=30)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.send(method, session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": VIEWPORT[0], "height": VIEWPORT[1],
                                                         "deviceScaleFactor": 1, "mobile": False}, session=True)

    # -- protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self.proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = PAGE_TIMEOUT_S):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def wait_event(self, method: str, timeout: float = PAGE_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == method and ev.get("sessionId") == self.session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    def evaluate(self, expression: str, timeout: float = PAGE_TIMEOUT_S):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=True, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    # -- pages
    def open(self, url: str) -> None:
        self._events.clear()
        reply = self.send("Page.navigate", {"url": url}, session=True)
        if reply.get("errorText"):
            raise RuntimeError(f"navigation failed: {reply['errorText']}")
        self.wait_event("Page.loadEventFired")

    def screenshot(self, path: Path) -> tuple[int, int]:
        metrics = self.send("Page.getLayoutMetrics", session=True)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        width = max(VIEWPORT[0], int(size["width"]))
        height = min(MAX_SCREENSHOT_HEIGHT, max(VIEWPORT[1], int(size["height"])))
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}, session=True, timeout=60)
        path.write_bytes(base64.b64decode(shot["data"]))
        return width, height

    def close(self) -> None:
        try:
            os.close(self._cmd_w)            # Chromium exits when its command pipe closes
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._out_r)
            shutil.rmtree(self.profile, ignore_errors=True)


# Runs in the page once it has loaded: make lazy images load, wait for every image, then report.
INSPECT_JS = r"""
(async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(img => { img.loading = "eager"; });
  await Promise.race([
    Promise.all(imgs.map(img => img.complete ? null : new Promise(done => {
      img.addEventListener("load", done); img.addEventListener("error", done); }))),
    new Promise(done => setTimeout(done, 10000))]);
  const text = el => (el.innerText || el.textContent || "");
  const errors = [];
  document.querySelectorAll(".output.error, .output.traceback").forEach(el =>
    errors.push("error output: " + text(el).trim().slice(0, 200)));
  document.querySelectorAll(".output.stderr, .stderr, .cell_output").forEach(el => {
    if (text(el).includes("Traceback (most recent call last)"))
      errors.push("traceback in an output: " + text(el).trim().slice(0, 200));
  });
  // a Markdown table printed as text: its output was rendered as CommonMark, which has no tables
  document.querySelectorAll(".cell_output p").forEach(el => {
    const t = text(el).trim();
    if (/^\|.*\|/.test(t) && /\|\s*:?[-\u2013\u2014]{1,}:?\s*\|/.test(t))
      errors.push("Markdown table shown as raw text (render it as gfm): " + t.slice(0, 80));
  });
  // alt text: missing, blank, or only the file name (docutils' default when no alt is given)
  const fileName = s => (s || "").split(/[?#]/)[0].split("/").pop();
  const altProblems = [];
  (document.querySelector("main") || document.body).querySelectorAll("img").forEach(img => {
    const src = img.getAttribute("src"), alt = (img.getAttribute("alt") || "").trim();
    if (!alt)
      altProblems.push("image without alt text: " + src);
    else if (alt === src || (fileName(src) && fileName(alt) === fileName(src)))
      altProblems.push("image whose alt text is its file name: " + src);
  });
  // embedded widgets: each view script must turn into a rendered widget (the manager renders async)
  // (the manager inserts each rendered view next to its script: count scripts with a widget beside them)
  const viewScripts = Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'));
  const views = viewScripts.length;
  const rendered = () => viewScripts.filter(el => el.parentElement &&
    el.parentElement.querySelector(".jupyter-widgets, .lm-Widget")).length;
  for (let waited = 0; views && rendered() < views && waited < 10000; waited += 100)
    await new Promise(done => setTimeout(done, 100));
  const widgetProblems = [];
  const areas = document.querySelectorAll(".widget-subarea").length;   // one per rendered view
  if (areas > views)
    widgetProblems.push(`widgets rendered more than once: ${areas} rendered areas for ${views} views ` +
                        "(the widget manager was loaded twice)");
  if (views && rendered() < views)
    widgetProblems.push(`widgets not rendered: ${rendered()} of ${views} embedded views` +
      (typeof window.require === "undefined" ? " (RequireJS did not load: run scripts/fetch_widget_js.py " +
       "before building)" : ""));
  const refs = [];
  document.querySelectorAll("a[href], link[href]").forEach(el => refs.push(el.getAttribute("href")));
  document.querySelectorAll("script[src], img[src]").forEach(el => refs.push(el.getAttribute("src")));
  const h1 = Array.from(document.querySelectorAll("h1")).map(el => text(el).trim()).find(t => t) || null;
  return {
    title: document.title.trim(),
    h1: h1,
    images: imgs.map(img => ({src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth,
                              alt: img.getAttribute("alt")})),
    errors: Array.from(new Set(errors)),
    alt_problems: Array.from(new Set(altProblems)),
    widget_problems: widgetProblems,
    widget_views: views,
    refs: Array.from(new Set(refs)),
  };
})()
"""


def check_page(browser: Browser, html_dir: Path, rel: str, out_dir: Path) -> dict:
    page = html_dir / rel
    result = {"page": rel, "problems": [], "title": None, "images": 0, "screenshot": None}
    redirect = parse(page).refresh
    if redirect is not None:                  # a redirect stub (index.html): check where it points
        why = broken_link(html_dir, page, redirect)
        result["redirect"] = redirect
        if why:
            result["problems"].append(f"redirect to a missing page: {why}")
        return result
    try:
        browser.open(page.resolve().as_uri())
        info = browser.evaluate(INSPECT_JS)
    except (RuntimeError, TimeoutError) as e:
        result["problems"].append(f"did not load: {e}")
        return result
    result["title"], result["images"] = info["title"], len(info["images"])
    if not info["title"]:
        result["problems"].append("no <title>")
    if not info["h1"]:
        result["problems"].append("no <h1> heading with text")
    for img in info["images"]:
        if not img["complete"] or not img["width"]:
            result["problems"].append(f"image did not load: {img['src']}")
    result["problems"] += info["alt_problems"] + info["widget_problems"]
    result["widget_views"] = info["widget_views"]
    result["problems"] += info["errors"]
    for href in info["refs"]:
        why = broken_link(html_dir, page, href or "")
        if why:
            result["problems"].append(f"broken link {why}")
    shot = out_dir / (rel.replace("/", "__").removesuffix(".html") + ".png")
    try:
        result["screenshot_size"] = browser.screenshot(shot)
        result["screenshot"] = str(shot)
    except (RuntimeError, TimeoutError) as e:
        result["problems"].append(f"screenshot failed: {e}")
    return result


def check_site(html_dir: Path, out_dir: Path, chromium: str, pages: list[str] | None = None) -> list[dict]:
    """Check `pages` (default: every page) in one browser session; one result dict per page."""
    html_dir, out_dir = Path(html_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _parsed.clear()
    browser = Browser(chromium)
    try:
        results = [check_page(browser, html_dir, rel, out_dir) for rel in (pages or list_pages(html_dir))]
    finally:
        browser.close()
    with open(out_dir / "report.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--html", default=str(ROOT / "_build" / "html"), help="the built book (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "_build" / "screenshots"), help="screenshots (default: %(default)s)")
    p.add_argument("--chromium", help="Chromium executable (default: $CHROMIUM, else chromium on PATH)")
    args = p.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: Chromium not found (apt-get install -y chromium, or pass --chromium)", file=sys.stderr)
        return 2
    if not (Path(args.html) / "index.html").is_file():
        print(f"error: no built book in {args.html} (run: jupyter-book build . -W -n --keep-going)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    results = check_site(Path(args.html), Path(args.out), chromium)
    bad = [r for r in results if r["problems"]]
    for r in results:
        status = "FAIL" if r["problems"] else "ok"
        print(f"{status:4s} {r['page']}  ({r.get('title') or r.get('redirect', '')}; {r['images']} images)")
        for problem in r["problems"]:
            print(f"       - {problem}")
    print(f"{len(results)} pages, {len(bad)} with problems, {time.monotonic() - t0:.1f} s; screenshots in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
