"""Make student versions of the chapters: ``make assignments`` -> ``assignments/``.

Solution code in the instructor notebooks sits between nbgrader's markers::

    ### BEGIN SOLUTION
    ...
    ### END SOLUTION

Each such block is replaced, at its indentation, by nbgrader's stub
(``# YOUR CODE HERE`` and ``raise NotImplementedError()``), outputs are
cleared, and the ``hide-input`` tag is dropped so students see the cell. The
checks from ``fusionlib.exercises`` then fail with "not implemented yet" until
the student fills the stub in. The result opens in plain Jupyter or in
nbgrader, which reads the same markers.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)### BEGIN SOLUTION[^\n]*\n.*?^[ \t]*### END SOLUTION[^\n]*$",
    re.MULTILINE | re.DOTALL,
)


def strip_solutions(source: str) -> tuple[str, int]:
    """Replace every solution block by the stub; return the new source and the number of blocks."""
    if source.count("### BEGIN SOLUTION") != source.count("### END SOLUTION"):
        raise ValueError("unbalanced ### BEGIN SOLUTION / ### END SOLUTION markers")

    def stub(match: re.Match) -> str:
        indent = match.group("indent")
        return f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError()"

    return BLOCK.subn(stub, source)


def student_version(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    nb = nbformat.from_dict(nb)
    blocks = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.source, n = strip_solutions(cell.source)
        blocks += n
        cell.outputs, cell.execution_count = [], None
        if n and "tags" in cell.metadata:
            cell.metadata["tags"] = [t for t in cell.metadata["tags"] if t != "hide-input"]
    return nb, blocks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "assignments")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        nb, blocks = student_version(nbformat.read(path, as_version=4))
        target = args.out / path.name
        nbformat.write(nb, target)
        print(
            f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}: {blocks} solutions stripped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
