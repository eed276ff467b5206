"""Check that every chapter in _toc.yml is committed executed, with no errors and not with smoke outputs.

Run by ``make test``. CI runs the chapters with the tiny ``smoke`` profile to
prove they work; the book renders the committed outputs, which must come from
a real run (``cpu`` or ``gpu``).

It also counts what should live in ``fusionlib`` rather than in notebooks:

- function names defined in more than one notebook (a reused function is
  defined once, in the library, and imported): any fails the check;
- notebooks other than chapter 2 (which teaches it) that build the world
  and its region features by hand instead of ``fusionlib.experiments.load_book_world``.

``PENDING_WORLD_BUILDERS`` lists the chapters still left to move onto the
library's world bundle; an entry that no longer occurs must be removed, so
the list can only shrink.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import sys
from collections import defaultdict

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROFILE_LINE = re.compile(r"profile=(\w+)")
WORLD_BUILDERS = ("generate_split(", "load_or_build_features(")
WORLD_CHAPTER = "02_visual_world.ipynb"
# Left over until these chapters are run through fusionlib.experiments.
PENDING_WORLD_BUILDERS = {
    "06_uniter.ipynb",
    "06b_uniter_ablation.ipynb",
    "07_efficiency.ipynb",
}


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
        problems.append(
            f"{path.name}: no cell prints 'profile=...' (print runtime.summary() in the first cell)"
        )
    if "smoke" in profiles:
        problems.append(
            f"{path.name}: stored outputs come from the smoke profile; execute with cpu or gpu"
        )
    return problems


def code_of(path: pathlib.Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def defined_functions(path: pathlib.Path) -> set[str]:
    """Top-level function names the notebook's code cells define (IPython magics skipped)."""
    names = set()
    for source in code_of(path):
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        try:
            tree = ast.parse("\n".join(lines))
        except SyntaxError as err:
            raise SystemExit(f"{path.name}: a code cell does not parse: {err}")
        names |= {
            node.name
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
    return names


def library_problems(notebooks: list[pathlib.Path]) -> list[str]:
    where = defaultdict(list)
    for nb in notebooks:
        for name in defined_functions(nb):
            where[name].append(nb.name)
    duplicated = {name: files for name, files in where.items() if len(files) > 1}
    builders = {
        nb.name
        for nb in notebooks
        if nb.name != WORLD_CHAPTER
        and any(all(b in source for b in WORLD_BUILDERS) for source in code_of(nb))
    }
    print(
        f"function names defined in more than one notebook: {len(duplicated)}"
        + "".join(f"\n  {name}: {', '.join(files)}" for name, files in sorted(duplicated.items()))
    )
    print(
        f"notebooks that build the world and its features by hand (besides chapter 2): {len(builders)}"
        + (f" ({', '.join(sorted(builders))})" if builders else "")
    )
    problems = [
        f"{name} is defined in {', '.join(files)}: define it once in fusionlib and import it"
        for name, files in sorted(duplicated.items())
    ]
    problems += [
        f"{name} builds the world by hand: use fusionlib.experiments.load_book_world"
        for name in sorted(builders - PENDING_WORLD_BUILDERS)
    ]
    problems += [
        f"PENDING_WORLD_BUILDERS lists {name}, which no longer builds the world by hand: remove it"
        for name in sorted(PENDING_WORLD_BUILDERS - builders)
    ]
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
    problems += library_problems([nb for nb in notebooks if nb.parent.name == "notebooks"])
    for p in problems:
        print(p)
    print(
        f"checked {len(notebooks)} notebooks: {'OK' if not problems else f'{len(problems)} problems'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
