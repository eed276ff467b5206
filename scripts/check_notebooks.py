"""Check that every chapter in _toc.yml is committed executed, with no errors and not with smoke outputs.

Run by ``make test``. CI runs the chapters with the tiny ``smoke`` profile to
prove they work; the book renders the committed outputs, which must come from
a real run (``cpu`` or ``gpu``).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILE_LINE = re.compile(r"profile=(\w+)")


def toc_files(toc: dict) -> list[str]:
    files = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return files


def problems_in(path: pathlib.Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    problems = []
    if not code:
        return [f"{path.name}: has no code cells"]
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    if unexecuted:
        problems.append(f"{path.name}: code cells {unexecuted} were never executed")
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"{path.name}: code cell {i} stores an error ({out.get('ename')})")
    text = json.dumps([c.get("outputs", []) for c in code])
    profiles = set(PROFILE_LINE.findall(text))
    if not profiles:
        problems.append(f"{path.name}: no cell prints 'profile=...' (print runtime.summary() in the first cell)")
    if "smoke" in profiles:
        problems.append(f"{path.name}: stored outputs come from the smoke profile; execute with cpu or gpu")
    return problems


def main() -> int:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    notebooks = []
    for entry in toc_files(toc):
        candidates = [ROOT / f"{entry}.ipynb", ROOT / entry]
        nb = next((p for p in candidates if p.suffix == ".ipynb" and p.exists()), None)
        if nb is None and entry.startswith("notebooks/"):
            print(f"missing notebook for toc entry {entry!r}")
            return 1
        if nb is not None:
            notebooks.append(nb)
    problems = [p for nb in notebooks for p in problems_in(nb)]
    for p in problems:
        print(p)
    print(f"checked {len(notebooks)} notebooks: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
