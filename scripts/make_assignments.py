"""Build the nbgrader course from the chapters and generate the student versions: ``make assignments``.

    python scripts/make_assignments.py [--course assignments] [CHAPTER ...]

CHAPTER is a chapter's name (``01_attention``) or its notebook; by default
every chapter whose exercises carry nbgrader's cell metadata (written by
``scripts/course_cells.py``). For each one:

1. ``notebooks/<chapter>.ipynb`` is copied to ``<course>/source/<chapter>/``
   with its solution cells unfolded (they start collapsed in JupyterLab in
   ``notebooks/``, and a collapsed cell would hide the stub from students);
2. ``nbgrader generate_assignment <chapter> --force`` writes the student
   version to ``<course>/release/<chapter>/``: solutions replaced by
   ``# YOUR CODE HERE`` / ``raise NotImplementedError()``, free-text
   answers by ``YOUR ANSWER HERE``, outputs cleared, the checks locked, and
   every graded cell with its points recorded in ``<course>/gradebook.db``.

nbgrader reads ``nbgrader_config.py`` at the repository root (the course
folder, the course id, the smoke profile and the cell timeout for
autograding). The README's "Teaching with it" goes on from here: release,
collect, autograde, feedback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def nbgrader_command() -> list[str]:
    """nbgrader from this interpreter's environment."""
    return [sys.executable, "-m", "nbgrader"]


def nbgrader_env() -> dict[str, str]:
    """The environment for nbgrader: it runs ``alembic`` from PATH, so this environment's bin comes first."""
    bin_dir = str(pathlib.Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def has_nbgrader_cells(nb: dict) -> bool:
    return any(c.get("metadata", {}).get("nbgrader", {}).get("grade") for c in nb["cells"])


BOOK_ONLY_TAGS = {"hide-input", "remove-input", "remove-cell"}


def instructor_copy(nb: dict) -> dict:
    """The chapter as nbgrader's source: graded cells shown in full, without execution timestamps.

    In ``notebooks/`` the solution cells start collapsed in JupyterLab and carry
    the book's tags (``hide-input`` and friends); a student version must show
    every exercise cell wherever it is opened.
    """
    for cell in nb["cells"]:
        meta = cell.get("metadata", {})
        meta.pop("execution", None)
        if "nbgrader" not in meta:
            continue
        jupyter = meta.get("jupyter")
        if jupyter is not None:
            jupyter.pop("source_hidden", None)
            if not jupyter:
                del meta["jupyter"]
        if "tags" in meta:
            meta["tags"] = [t for t in meta["tags"] if t not in BOOK_ONLY_TAGS]
            if not meta["tags"]:
                del meta["tags"]
    return nb


def chapter_path(name: str) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.suffix == ".ipynb":
        return path.resolve()
    return NOTEBOOKS / f"{name}.ipynb"


def generate(chapter: pathlib.Path, course: pathlib.Path) -> None:
    nb = json.loads(chapter.read_text(encoding="utf-8"))
    if not has_nbgrader_cells(nb):
        raise SystemExit(
            f"{chapter.name} has no nbgrader cells: run `python scripts/course_cells.py {chapter}` first"
        )
    name = chapter.stem
    source = course / "source" / name
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    (source / chapter.name).write_text(
        json.dumps(instructor_copy(nb), indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    subprocess.run(
        [
            *nbgrader_command(),
            "generate_assignment",
            name,
            "--force",
            f"--CourseDirectory.root={course}",
            "--log-level=WARN",
        ],
        cwd=ROOT,  # nbgrader reads nbgrader_config.py from here
        check=True,
        env=nbgrader_env(),
    )
    release = course / "release" / name / chapter.name
    shown = release.relative_to(ROOT) if release.is_relative_to(ROOT) else release
    print(f"{shown}: the student version of {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("chapters", nargs="*")
    parser.add_argument("--course", type=pathlib.Path, default=ROOT / "assignments")
    args = parser.parse_args(argv)
    course = args.course.resolve()
    if args.chapters:
        chapters = [chapter_path(name) for name in args.chapters]
    else:
        chapters = []
        for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
            if has_nbgrader_cells(json.loads(path.read_text(encoding="utf-8"))):
                chapters.append(path)
            else:
                print(f"skipped {path.name}: no nbgrader cells yet (scripts/course_cells.py)")
    for chapter in chapters:
        generate(chapter, course)
    return 0


if __name__ == "__main__":
    sys.exit(main())
