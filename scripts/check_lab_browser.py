"""Open chapter 1 in JupyterLab in headless Chromium and check that its exercises render: ``make lab-check``.

    python scripts/check_lab_browser.py [--notebook notebooks/01_attention.ipynb] [--screenshots _build/screenshots]

The chapters' exercises are MyST ``{exercise}`` fences; plain JupyterLab shows
them as raw code blocks (``:label:``, TeX as typed). With ``jupyterlab-myst``
(the ``book`` extra) they render as the book shows them. This check starts
``jupyter lab`` on the repository root, as ``make lab`` does (with a private
token, settings and workspace folder, autosave off, ``--allow-root`` when run
as root), opens the chapter in headless Chromium with no network, waits for
the notebook to render, and fails unless

- every exercise of the chapter renders as a MyST exercise, numbered and
  titled: "Exercise 1 (Attention weights from scratch)";
- its math is typeset (KaTeX), with no raw TeX left in the rendered text;
- each code exercise's solution cell is collapsed (``jupyter.source_hidden``)
  and its locked check cell shows the ``checks.check_...`` call;
- the notebook file is unchanged afterwards.

It saves a screenshot of the first exercise as it appears in Lab under
``_build/screenshots/``. Like ``scripts/check_book_browser.py`` it reads the
page's DOM with BeautifulSoup and skips, saying so, when there is no Chromium;
unlike it, it drives Chromium over the DevTools protocol, because a Lab page is
an application that renders cells after it loads (the check waits for them)
and the exercises sit at the end of the chapter (the screenshot scrolls to them).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pathlib
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # websocket-client, a dependency of jupyter_server
from bs4 import BeautifulSoup

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from check_book_browser import CHROMIUM_FLAGS, find_chromium  # noqa: E402
from course_cells import exercise_label  # noqa: E402

# JupyterLab settings for the check: every cell rendered (no windowing), no saving, no news pop-up.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
RAW_TEX = re.compile(r"\$[^$\s][^$]*\\[A-Za-z]+[^$]*\$|\\(mathrm|sqrt|frac|top)\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def lab_command(
    port: int, token: str, settings: pathlib.Path, workspaces: pathlib.Path
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={ROOT}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={workspaces}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers run as root; Lab refuses to start without it
    return command


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class DevTools:
    """A minimal DevTools protocol client for one page."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def close(self) -> None:
        self.ws.close()


def check_dom(html: str, labels: list[str], first_title: str) -> list[str]:
    soup = BeautifulSoup(html, "html.parser")
    problems = []
    rendered = soup.select("aside.myst-exercise")
    ids = [a.get("id") for a in rendered]
    missing = [label for label in labels if label not in ids]
    if missing:
        problems.append(f"exercises not rendered by jupyterlab-myst: {', '.join(missing)}")
    first = soup.find("aside", id=labels[0]) if labels else None
    if first is not None:
        title = first.select_one(".myst-exercise-title")
        shown = " ".join(title.get_text(" ", strip=True).split()) if title else ""
        if shown != first_title:
            problems.append(f"the first exercise is titled {shown!r}, not {first_title!r}")
        body = first.select_one(".myst-exercise-body") or first
        if not body.select(".katex"):
            problems.append("the first exercise's math is not typeset (no KaTeX)")
        for math in body.select(".katex"):
            math.decompose()  # KaTeX keeps the TeX source in an annotation; judge the rest
        if RAW_TEX.search(body.get_text(" ")):
            problems.append(f"raw TeX in the rendered exercise: {body.get_text(' ')[:200]!r}")
    cells = soup.select(".jp-Notebook .jp-Cell")
    for cell in cells:
        aside = cell.select_one("aside.myst-exercise")
        if aside is None or not aside.get("id"):
            continue
        following = cells[cells.index(cell) + 1 :]
        answer = following[0] if following else None
        if answer is None or "jp-CodeCell" not in answer.get("class", []):
            continue  # a "Think about it": its answer cell is markdown
        if not answer.select_one(".jp-InputPlaceholder"):
            problems.append(f"{aside['id']}: the solution cell is not collapsed in Lab")
        check = following[1] if len(following) > 1 else None
        if check is None or "checks.check_" not in check.get_text(""):
            problems.append(f"{aside['id']}: no check cell with checks.check_... after the answer")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--notebook", type=pathlib.Path, default=ROOT / "notebooks" / "01_attention.ipynb"
    )
    parser.add_argument("--screenshots", type=pathlib.Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for each step")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print(
            "SKIPPED Lab check: no Chromium found (install Debian's `chromium`; `make test` tries)"
        )
        return 0
    notebook = args.notebook.resolve()
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    labels = [label for label in map(exercise_label, nb["cells"]) if label]
    first_fence = next(c for c in nb["cells"] if exercise_label(c))
    heading = "".join(first_fence["source"]).splitlines()[0]
    first_title = f"Exercise 1 ({heading.split('}', 1)[1].strip()})"
    before = hashlib.sha256(notebook.read_bytes()).hexdigest()
    started = time.monotonic()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for plugin, values in LAB_SETTINGS.items():
            path = tmp / "settings" / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values), encoding="utf-8")
        port, token = free_port(), secrets.token_hex(16)
        log = open(tmp / "lab.log", "w")
        lab = subprocess.Popen(
            lab_command(port, token, tmp / "settings", tmp / "workspaces"),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        chromium = None
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(
                lambda: lab.poll() is not None or http_ok(f"{base}/api/status?token={token}"),
                args.timeout,
                "JupyterLab to start",
            )
            if lab.poll() is not None:
                raise RuntimeError(f"JupyterLab exited: {(tmp / 'lab.log').read_text()[-2000:]}")
            lab_up = time.monotonic() - started
            profile = tmp / "chromium"
            flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
            chromium = subprocess.Popen(
                [
                    browser,
                    *flags,
                    f"--user-data-dir={profile}",
                    "--remote-debugging-port=0",
                    "--window-size=1280,1000",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            active = profile / "DevToolsActivePort"
            wait_for(active.exists, args.timeout, "Chromium's DevTools port")
            debug_port = active.read_text().split()[0]
            targets = wait_for(
                lambda: [
                    t
                    for t in json.load(
                        urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json")
                    )
                    if t.get("type") == "page"
                ],
                args.timeout,
                "a Chromium page",
            )
            page = DevTools(targets[0]["webSocketDebuggerUrl"])
            page.call("Page.enable")
            relative = notebook.relative_to(ROOT).as_posix()
            page.call("Page.navigate", url=f"{base}/lab/tree/{relative}?token={token}")
            ready = (
                f"(() => {{ const a = document.querySelectorAll('aside.myst-exercise');"
                f" return a.length >= {len(labels)} && !!document.querySelector('aside.myst-exercise .katex'); }})()"
            )
            wait_for(lambda: page.evaluate(ready), args.timeout, "the exercises to render")
            time.sleep(1)  # let the last cells settle
            html = page.evaluate("document.documentElement.outerHTML")
            problems = check_dom(html, labels, first_title)
            page.evaluate(
                f"document.getElementById({json.dumps(labels[0])}).scrollIntoView({{block: 'start'}})"
            )
            time.sleep(1)
            shot = page.call("Page.captureScreenshot", format="png")
            args.screenshots.mkdir(parents=True, exist_ok=True)
            path = args.screenshots / f"lab__{notebook.stem}.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            page.close()
        finally:
            if chromium is not None:
                chromium.terminate()
                chromium.wait(timeout=30)
            lab.terminate()
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait()
            log.close()
    if hashlib.sha256(notebook.read_bytes()).hexdigest() != before:
        problems.append(f"{notebook.name} changed while Lab had it open")
    for p in problems:
        print("  -", p)
    print(
        f"Lab check: {notebook.name} in JupyterLab (started in {lab_up:.0f} s), {len(labels)} exercises, "
        f"screenshot {os.path.relpath(path, ROOT)}, {time.monotonic() - started:.0f} s, "
        f"{'OK' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
