"""make assignments: student notebooks have no solutions, and their checks fail helpfully."""

import pathlib
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_assignments import strip_solutions, student_version  # noqa: E402

NOTEBOOKS = sorted(
    p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name[0].isdigit()
)  # chapters, not the FAQ


def test_strip_solutions_keeps_indentation_and_signature():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\ncheck(f)"
    stripped, n = strip_solutions(source)
    assert n == 1
    assert (
        stripped == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\ncheck(f)"
    )
    with pytest.raises(ValueError, match="unbalanced"):
        strip_solutions("### BEGIN SOLUTION\nx = 1\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_chapter_has_exercises_and_the_student_version_has_no_solution(path):
    instructor = nbformat.read(path, as_version=4)
    student, blocks = student_version(instructor)
    assert blocks >= 3, f"{path.name}: a chapter needs at least three exercises with solutions"
    text = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    assert "### BEGIN SOLUTION" not in text and "raise NotImplementedError()" in text
    assert all(not c.get("outputs") for c in student.cells if c.cell_type == "code")
    checks = [
        c for c in student.cells if c.cell_type == "code" and "NotImplementedError()" in c.source
    ]
    assert all(".check_" in c.source or "check_" in c.source for c in checks), (
        "every solution cell should call its check"
    )


def test_student_chapter_1_runs_to_the_exercises_and_checks_say_what_is_missing(
    tmp_path, monkeypatch
):
    from nbclient import NotebookClient

    monkeypatch.setenv("FUSIONLIB_PROFILE", "smoke")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    student, _ = student_version(
        nbformat.read(ROOT / "notebooks" / "01_attention.ipynb", as_version=4)
    )
    NotebookClient(
        student,
        timeout=300,
        allow_errors=True,
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    exercise_cells = [
        c for c in student.cells if c.cell_type == "code" and "NotImplementedError()" in c.source
    ]
    other_cells = [c for c in student.cells if c.cell_type == "code" and c not in exercise_cells]
    for cell in other_cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:200]
    for cell in exercise_cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert errors and errors[0].ename == "ExerciseFailure", cell.source[:200]
        assert "is not implemented yet" in errors[0].evalue
