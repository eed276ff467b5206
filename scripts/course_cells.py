"""Write the course cells of the notebooks in place: nbgrader's exercise cells and the install cell.

Running it twice changes nothing.

    python scripts/course_cells.py notebooks/01_attention.ipynb ...   # then: ruff format notebooks
    python scripts/course_cells.py --check notebooks/*.ipynb          # exit 1 if a notebook would change

A chapter's exercises are MyST ``{exercise}`` fences with a ``:label:``
(``ex-ch01-weights``). For each one:

- **a code exercise** (the fence is followed by a code cell holding
  ``### BEGIN SOLUTION`` / ``### END SOLUTION``) is split in two: the
  *answer* cell keeps everything before the first ``checks.check_...(...)``
  call and becomes an autograded answer (nbgrader ``solution``, grade id =
  the label); the *check* cell holds that call and what follows it, and
  becomes a locked autograder test (``grade``, grade id ``<label>-check``)
  worth ``CODE_POINTS``. The committed outputs move to the check cell, which
  printed them; the split runs the same statements in the same order.
- **a "Think about it" exercise** (a fence followed by no solution cell) gets a
  manually graded markdown answer cell after it (``<label>-answer``), worth
  ``QUESTION_POINTS`` per numbered question.

The rendered book looks as before: the answer cell keeps ``hide-input`` (the
solution stays behind its toggle), the check cell is ``remove-input`` (only
its "Correct: ..." output shows, under the toggle, as before), and the
answer cells for free text are ``remove-cell``. In JupyterLab the solution
cells of ``notebooks/`` start collapsed (``jupyter.source_hidden``);
``scripts/make_assignments.py`` unfolds them in the copies it hands to nbgrader.

**The install cell** (for Colab, or any kernel without ``fusionlib``) is a
notebook's first code cell. It installs a pinned release with the dependency
versions of ``pyproject.toml`` (no ``--no-deps``)::

    %pip install -q "fusionlib @ git+<repository url>@v<version>"

The repository URL is read from ``_config.yml`` (``repository.url``) and the
version from ``fusionlib/__init__.py`` (``__version__``, which is also the
package's version): change either there, run this script, and every notebook
follows; tag the release ``v<version>`` when you publish it. A notebook
without an install cell (the FAQ) gets one before its first code cell,
``remove-cell`` (not on the book's page), with the execution counts after it
moved up by one, as if it had run first.

Execution counts of the exercise cells (the last code cells of a chapter)
are renumbered consecutively from the first one, so the split cells read as
one run. Notebooks are written as ``json.dump(indent=1, ensure_ascii=False)``
plus a newline; run ``ruff format`` on them afterwards.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]

CODE_POINTS = 2  # each code exercise: its check passes or not
QUESTION_POINTS = 1  # each numbered question of a "Think about it" exercise, graded by hand
SCHEMA_VERSION = 3  # nbgrader 0.9's cell metadata schema

EXERCISE = re.compile(r"^(`{3,}|:{3,})\{exercise\}[^\n]*\n(?:.*\n)*?:label:\s*(?P<label>\S+)")
QUESTION = re.compile(r"^\d+\.\s", re.MULTILINE)
CHECK_CALL = re.compile(r"^checks\.check_\w+$")
ANSWER_STUB = "YOUR ANSWER HERE"


def source_of(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def as_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def exercise_label(cell: dict) -> str | None:
    if cell["cell_type"] != "markdown":
        return None
    match = EXERCISE.match(source_of(cell))
    return match.group("label") if match else None


def nbgrader_meta(grade_id: str, *, solution: bool, grade: bool, locked: bool, points=None):
    meta = {
        "grade": grade,
        "grade_id": grade_id,
        "locked": locked,
        "schema_version": SCHEMA_VERSION,
        "solution": solution,
        "task": False,
    }
    if points is not None:
        meta["points"] = points
    return meta


def with_tag(cell: dict, tag: str) -> None:
    tags = cell["metadata"].setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def is_solution_cell(cell: dict | None) -> bool:
    return (
        cell is not None and cell["cell_type"] == "code" and "### BEGIN SOLUTION" in source_of(cell)
    )


def split_exercise(cell: dict, label: str) -> tuple[dict, dict]:
    """The answer cell (definitions) and the check cell (from the first check call on)."""
    source = source_of(cell)
    tree = ast.parse(source)
    first = next(
        (
            node
            for node in tree.body
            if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and CHECK_CALL.match(ast.unparse(node.value.func))
        ),
        None,
    )
    if first is None:
        raise ValueError(f"{label}: the solution cell calls no checks.check_...: cannot split it")
    lines = source.splitlines(keepends=True)
    answer_src = "".join(lines[: first.lineno - 1]).rstrip() + "\n"
    check_src = "".join(lines[first.lineno - 1 :]).rstrip("\n")
    answer = copy.deepcopy(cell)
    answer["source"] = as_lines(answer_src.rstrip("\n"))
    answer["outputs"] = []
    answer["metadata"].pop("execution", None)
    check = {
        "cell_type": "code",
        "execution_count": cell.get("execution_count"),
        "id": f"{label}-check"[:64],
        "metadata": {},
        "outputs": cell.get("outputs", []),
        "source": as_lines(check_src),
    }
    if "execution" in cell["metadata"]:
        check["metadata"]["execution"] = cell["metadata"]["execution"]
    return answer, check


def grade_code(answer: dict, check: dict, label: str) -> None:
    answer["metadata"]["nbgrader"] = nbgrader_meta(label, solution=True, grade=False, locked=False)
    answer["metadata"].setdefault("jupyter", {})["source_hidden"] = True
    with_tag(answer, "hide-input")
    check["metadata"]["nbgrader"] = nbgrader_meta(
        f"{label}-check", solution=False, grade=True, locked=True, points=CODE_POINTS
    )
    with_tag(check, "remove-input")


def written_answer(label: str, questions: int) -> dict:
    cell = {
        "cell_type": "markdown",
        "id": f"{label}-answer"[:64],
        "metadata": {},
        "source": [ANSWER_STUB],
    }
    grade_written(cell, label, questions)
    return cell


def grade_written(cell: dict, label: str, questions: int) -> None:
    cell["metadata"]["nbgrader"] = nbgrader_meta(
        f"{label}-answer",
        solution=True,
        grade=True,
        locked=False,
        points=QUESTION_POINTS * max(questions, 1),
    )
    with_tag(cell, "remove-cell")


def grade_id(cell: dict | None) -> str | None:
    if cell is None:
        return None
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def nbgrader_cells(nb: dict) -> dict:
    """Return the notebook with every exercise graded (a new dict; the input is not changed)."""
    nb = copy.deepcopy(nb)
    cells = nb["cells"]
    out: list[dict] = []
    first_exercise_code = None
    i = 0
    while i < len(cells):
        cell = cells[i]
        out.append(cell)
        i += 1
        label = exercise_label(cell)
        if label is None:
            continue
        following = cells[i] if i < len(cells) else None
        after = cells[i + 1] if i + 1 < len(cells) else None
        if is_solution_cell(following):
            if grade_id(after) == f"{label}-check":  # already split
                answer, check = following, after
                i += 2
            else:
                answer, check = split_exercise(following, label)
                i += 1
            grade_code(answer, check, label)
            out += [answer, check]
            if first_exercise_code is None:
                first_exercise_code = answer
        else:
            questions = len(QUESTION.findall(source_of(cell)))
            if grade_id(following) == f"{label}-answer":
                grade_written(following, label, questions)
                out.append(following)
                i += 1
            else:
                out.append(written_answer(label, questions))
    nb["cells"] = out
    renumber_from(out, first_exercise_code)
    return nb


def renumber_from(cells: list[dict], start_cell: dict | None) -> None:
    """Consecutive execution counts from the first exercise cell on (they are a chapter's last)."""
    if start_cell is None or start_cell.get("execution_count") is None:
        return
    count = start_cell["execution_count"]
    started = False
    for cell in cells:
        if cell is start_cell:
            started = True
        if started and cell["cell_type"] == "code" and cell.get("execution_count") is not None:
            cell["execution_count"] = count
            count += 1


def graded_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade")]


INSTALL_MARK = "# Colab / a fresh kernel:"
INSTALL_ID = "install-fusionlib"


def release() -> tuple[str, str]:
    """The repository URL (``_config.yml``) and the version to install (``fusionlib.__version__``)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    url = config["repository"]["url"].rstrip("/")
    init = (ROOT / "fusionlib" / "__init__.py").read_text(encoding="utf-8")
    version = re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE).group(1)
    return url, version


def install_source(url: str, version: str) -> str:
    return (
        f"{INSTALL_MARK} install the book's library when it is missing, at release v{version}\n"
        "# with the package versions it was tested with (pyproject.toml pins them).\n"
        "try:\n"
        "    import fusionlib\n"
        "except ImportError:  # pragma: no cover - only outside the repository\n"
        f'    %pip install -q "fusionlib @ git+{url}@v{version}"\n'
        "    import fusionlib"
    )


def install_cell(nb: dict, url: str, version: str) -> dict:
    """Return the notebook with its install cell up to date (a new dict)."""
    nb = copy.deepcopy(nb)
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    source = as_lines(install_source(url, version))
    if code and source_of(code[0]).startswith(INSTALL_MARK):
        code[0]["source"] = source
        return nb
    counts = [c.get("execution_count") for c in code]
    first_count = next((n for n in counts if n is not None), None)
    for cell in code:  # the install cell runs first: every count after it moves up by one
        if cell.get("execution_count") is not None:
            cell["execution_count"] += 1
        for out in cell.get("outputs", []):
            if out.get("execution_count") is not None:
                out["execution_count"] += 1
    new = {
        "cell_type": "code",
        "execution_count": first_count,
        "id": INSTALL_ID,
        "metadata": {"tags": ["remove-cell"]},
        "outputs": [],
        "source": source,
    }
    at = cells.index(code[0]) if code else len(cells)
    cells.insert(at, new)
    return nb


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def convert(nb: dict) -> dict:
    """Both kinds of course cells: nbgrader's (where there are exercises) and the install cell."""
    return install_cell(nbgrader_cells(nb), *release())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a notebook would change"
    )
    args = parser.parse_args(argv)
    stale = []
    for path in args.notebooks:
        before = json.loads(path.read_text(encoding="utf-8"))
        after = convert(before)
        graded = graded_cells(after)
        points = sum(c["metadata"]["nbgrader"]["points"] for c in graded)
        changed = after != before
        if args.check:
            if changed:
                stale.append(path)
            print(f"{path}: {'would change' if changed else 'up to date'}")
            continue
        if changed:
            path.write_text(dumps(after), encoding="utf-8")
        print(
            f"{path}: {len(graded)} graded cells, {points} points"
            f" ({'updated' if changed else 'unchanged'})"
        )
    if stale:
        print(f"{len(stale)} notebooks are not up to date: run scripts/course_cells.py on them")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
