"""Fetch the JavaScript that renders embedded Jupyter widgets into _static/widgets/ (a build step).

    python scripts/fetch_widget_js.py            # before `jupyter-book build .`

The book's widgets (chapter 3's explorer) are stored in the notebooks as widget state; a page
needs two scripts to turn that state into live controls: RequireJS and the widget HTML manager
(`@jupyter-widgets/html-manager`'s `embed-amd.js`, which bundles the standard controls). myst-nb
would load both from public CDNs at view time; here they come, pinned and checksummed, from the
npm registry at build time, so the built book renders its widgets offline too (`_config.yml`
loads the local copies once per page through `html_js_files` and turns myst-nb's own loading
off). The files are not committed (.gitignore).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "_static", "widgets")

# (tarball URL, npm `dist.integrity` of that tarball, members to keep: path inside -> file name here)
PACKAGES = [
    ("https://registry.npmjs.org/requirejs/-/requirejs-2.3.8.tgz",
     "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
     {"package/require.js": "require.js", "package/package.json": "requirejs.package.json"}),
    ("https://registry.npmjs.org/@jupyter-widgets/html-manager/-/html-manager-1.0.15.tgz",
     "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
     {"package/dist/embed-amd.js": "embed-amd.js", "package/dist/embed.js.LICENSE.txt": "embed-amd.js.LICENSE.txt",
      "package/package.json": "html-manager.package.json"}),       # licence: its "license" field
]
# embed-amd.js also loads its icon fonts from beside itself: keep every font file of dist/
FONT_SUFFIXES = (".woff", ".woff2", ".ttf", ".eot", ".svg")
STAMP = "fetched.txt"


def check_integrity(data: bytes, integrity: str, url: str) -> None:
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise SystemExit(f"fetch_widget_js: {url} does not match its pinned {algo} checksum "
                         f"(got {got[:16]}..., expected {want[:16]}...); refusing to use it")


def fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as e:
        raise SystemExit(f"fetch_widget_js: cannot download {url}: {e}. The book's widgets need it; "
                         f"allow access to registry.npmjs.org or copy the files into {DEST}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="download again even if the files are there")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per download (default 60)")
    args = p.parse_args(argv)
    stamp = os.path.join(DEST, STAMP)
    pinned = "\n".join(integrity for _, integrity, _ in PACKAGES)
    if not args.force and os.path.isfile(stamp) and open(stamp).read() == pinned:
        print(f"fetch_widget_js: {DEST} is up to date")
        return 0
    shutil.rmtree(DEST, ignore_errors=True)
    os.makedirs(DEST)
    for url, integrity, members in PACKAGES:
        data = fetch(url, args.timeout)
        check_integrity(data, integrity, url)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            names = set(tar.getnames())
            missing = sorted(set(members) - names)
            if missing:
                raise SystemExit(f"fetch_widget_js: {url} has no {', '.join(missing)}")
            wanted = dict(members)
            if "package/dist/embed-amd.js" in members:
                wanted.update({n: os.path.basename(n) for n in names
                               if n.startswith("package/dist/") and n.endswith(FONT_SUFFIXES)})
            for member, name in wanted.items():
                with open(os.path.join(DEST, name), "wb") as f:
                    f.write(tar.extractfile(member).read())
        print(f"fetch_widget_js: {url.rsplit('/', 1)[1]} -> {len(wanted)} files")
    with open(stamp, "w") as f:
        f.write(pinned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
