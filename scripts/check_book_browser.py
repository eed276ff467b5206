"""Open every page of the built book in headless Chromium and check what a reader sees.

    python scripts/check_book_browser.py [--build _build/html] [--screenshots _build/screenshots]

For each page in ``_toc.yml`` it fails when

- a page with math shows no typeset equation (no MathJax ``mjx-container``
  after the scripts ran: the reader would see raw TeX);
- an image is broken (its file is missing from the build);
- a code cell that has outputs in the committed notebook shows none on the page;
- an internal link points to a missing page or a missing anchor.

It saves a screenshot of each page under ``_build/screenshots/``. Chromium
runs with no network (``--disable-background-networking`` and friends), so
the check also proves that the book renders offline.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import yaml
from bs4 import BeautifulSoup

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_notebooks import toc_files  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--hide-scrollbars",
    "--virtual-time-budget=15000",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(browser: str, args: list[str], timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def code_cells_with_outputs(notebook: pathlib.Path) -> int:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or not cell.get("outputs"):
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        if "remove-output" in tags or "remove-cell" in tags:
            continue
        count += 1
    return count


def check_page(browser: str, build: pathlib.Path, entry: str, shots: pathlib.Path) -> list[str]:
    page = build / f"{entry}.html"
    if not page.exists():
        return [f"{entry}: page {page} was not built"]
    problems = []
    dom = chromium(browser, ["--dump-dom", page.as_uri()])
    soup = BeautifulSoup(dom, "html.parser")
    main = soup.select_one("main") or soup

    has_math = bool(main.select(".math")) or "\\(" in main.get_text() or "$$" in main.get_text()
    if has_math and not main.select("mjx-container"):
        problems.append(
            f"{entry}: equations are not typeset (no mjx-container: MathJax did not run)"
        )

    for img in main.select("img"):
        src = img.get("src", "")
        if src.startswith("data:"):
            continue
        target = (page.parent / urllib.parse.unquote(src.split("?")[0])).resolve()
        if not target.exists():
            problems.append(f"{entry}: broken image {src}")

    notebook = ROOT / f"{entry}.ipynb"
    if notebook.exists():
        want = code_cells_with_outputs(notebook)
        shown = sum(1 for cell in main.select("div.cell") if cell.select_one("div.cell_output"))
        if shown < want:
            problems.append(
                f"{entry}: {want} code cells have outputs in the notebook but only {shown} show them"
            )

    for link in main.select("a[href]"):
        href = link["href"]
        parsed = urllib.parse.urlparse(href)
        if parsed.scheme or href.startswith("//") or href.startswith("mailto:"):
            continue
        path, anchor = parsed.path, parsed.fragment
        target = (page.parent / urllib.parse.unquote(path)).resolve() if path else page
        if not target.exists():
            problems.append(f"{entry}: broken link {href}")
            continue
        if anchor and target.suffix == ".html":
            target_soup = (
                soup
                if target == page
                else BeautifulSoup(target.read_text(encoding="utf-8"), "html.parser")
            )
            if not target_soup.find(id=anchor):
                problems.append(f"{entry}: link {href} points to a missing anchor")

    shot = shots / (entry.replace("/", "__") + ".png")
    chromium(browser, ["--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()])
    if not shot.exists() or shot.stat().st_size == 0:
        problems.append(f"{entry}: no screenshot was written")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--build", type=pathlib.Path, default=ROOT / "_build" / "html")
    parser.add_argument("--screenshots", type=pathlib.Path, default=ROOT / "_build" / "screenshots")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print(
            "SKIPPED browser check: no Chromium found (install Debian's `chromium`; `make test` tries apt-get)"
        )
        return 0
    if not (args.build / "index.html").exists():
        print(f"no built book in {args.build}: run `make book` first")
        return 1
    args.screenshots.mkdir(parents=True, exist_ok=True)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    entries = toc_files(toc) + [toc["root"]]
    problems = []
    for entry in entries:
        page_problems = check_page(browser, args.build, entry, args.screenshots)
        print(f"{entry}: {'OK' if not page_problems else f'{len(page_problems)} problems'}")
        problems += page_problems
    for p in problems:
        print("  -", p)
    print(
        f"browser check: {len(entries)} pages, screenshots in {os.path.relpath(args.screenshots, ROOT)}, "
        f"{'OK' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
