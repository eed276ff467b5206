"""Teaching with nbgrader: the chapters' graded cells, and a course run end to end on chapter 1.

The end-to-end test is what an instructor does (README, "Teaching with it"):
``make assignments`` (``nbgrader generate_assignment``), ``nbgrader
release_assignment``, a student's ``fetch_assignment`` and ``submit``,
``nbgrader collect``, a second submission dropped into ``submitted/`` by hand
(the way LMS downloads arrive), ``nbgrader autograde`` with the smoke profile
and ``nbgrader generate_feedback``. A second test grades chapter 3, a chapter
that trains (or loads) six models before its last exercises. Together they take
about two minutes, most of it the chapters executed twice each.
"""

from __future__ import annotations

import copy
import getpass
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import course_cells  # noqa: E402
import make_assignments  # noqa: E402

CHAPTERS = sorted(p for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
CHAPTER_1 = ROOT / "notebooks" / "01_attention.ipynb"


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def nbgrader_of(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def by_grade_id(nb: dict) -> dict[str, dict]:
    return {nbgrader_of(c)["grade_id"]: c for c in nb["cells"] if nbgrader_of(c)}


def source(cell: dict) -> str:
    return course_cells.source_of(cell)


# -- the committed chapters -------------------------------------------------------


def converted(path: pathlib.Path) -> dict:
    nb = load(path)
    if not course_cells.graded_cells(nb):
        pytest.skip(f"{path.name} has no nbgrader cells yet: run scripts/course_cells.py on it")
    return nb


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_exercise_of_a_chapter_has_points_and_the_script_would_change_nothing(path):
    nb = converted(path)
    assert course_cells.convert(nb) == nb, f"run scripts/course_cells.py {path.relative_to(ROOT)}"
    labels = [course_cells.exercise_label(c) for c in nb["cells"]]
    labels = [label for label in labels if label]
    graded = course_cells.graded_cells(nb)
    assert len(labels) >= 4 and len(graded) == len(labels), "one graded cell per exercise"
    assert all(nbgrader_of(c)["points"] > 0 for c in graded)
    ids = by_grade_id(nb)
    for label in labels:
        if f"{label}-check" in ids:
            answer, check = ids[label], ids[f"{label}-check"]
            assert nbgrader_of(answer)["solution"] and not nbgrader_of(answer)["grade"]
            assert "### BEGIN SOLUTION" in source(answer) and "checks.check_" not in source(answer)
            assert nbgrader_of(check)["locked"] and source(check).startswith("checks.check_")
            # The book shows the solution behind its toggle and the check's output, as before.
            assert "hide-input" in answer["metadata"]["tags"] and not answer["outputs"]
            assert check["metadata"]["tags"] == ["remove-input"] and check["outputs"]
            assert answer["metadata"]["jupyter"]["source_hidden"] is True  # folded in Lab
            assert nb["cells"].index(check) == nb["cells"].index(answer) + 1
        else:
            written = ids[f"{label}-answer"]
            assert written["cell_type"] == "markdown" and nbgrader_of(written)["solution"]
            assert written["metadata"]["tags"] == ["remove-cell"]  # not on the book's pages


def test_course_cells_splits_an_exercise_once_and_keeps_its_statements():
    exercise = {"cell_type": "markdown", "id": "m", "metadata": {}, "source": []}
    exercise["source"] = course_cells.as_lines(
        "```{exercise} Add one\n:label: ex-t-add\nWrite `f`.\n```"
    )
    think = copy.deepcopy(exercise)
    think["source"] = course_cells.as_lines(
        "```{exercise} Think about it\n:label: ex-t-think\n1. Why?\n2. How?\n```"
    )
    code = {
        "cell_type": "code",
        "execution_count": 7,
        "id": "c",
        "metadata": {"tags": ["hide-input"], "execution": {"x": 1}},
        "outputs": [{"name": "stdout", "output_type": "stream", "text": ["Correct: yes\n"]}],
        "source": course_cells.as_lines(
            "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\n\n"
            "checks.check_f(f)\nprint(f(1))"
        ),
    }
    nb = {"cells": [exercise, code, think], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    once = course_cells.nbgrader_cells(nb)
    assert course_cells.nbgrader_cells(once) == once
    answer, check, written = once["cells"][1], once["cells"][2], once["cells"][4]
    assert (
        source(answer)
        == "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION"
    )
    assert source(check) == "checks.check_f(f)\nprint(f(1))"
    assert (answer["execution_count"], check["execution_count"]) == (7, 8)
    assert check["outputs"] == code["outputs"] and answer["outputs"] == []
    assert check["metadata"]["execution"] == {"x": 1} and "execution" not in answer["metadata"]
    assert nbgrader_of(check)["points"] == course_cells.CODE_POINTS
    assert nbgrader_of(written)["points"] == 2 * course_cells.QUESTION_POINTS
    assert source(written) == course_cells.ANSWER_STUB


# -- a course run on chapter 1 ----------------------------------------------------


def nbgrader(*args: str, cwd: pathlib.Path = ROOT) -> str:
    env = make_assignments.nbgrader_env()
    env.pop(
        "FUSIONLIB_PROFILE", None
    )  # nbgrader_config.py gives the grading kernels the smoke profile
    result = subprocess.run(
        [*make_assignments.nbgrader_command(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"nbgrader {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


WRONG_WEIGHTS = """def attention_weights(q, k, mask):
    scores = q @ k.transpose(-2, -1)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)"""


def test_instructor_generates_releases_collects_autogrades_and_returns_feedback(tmp_path):
    course, exchange, home = tmp_path / "course", tmp_path / "exchange", tmp_path / "student"
    exchange.mkdir()
    home.mkdir()
    where = [f"--CourseDirectory.root={course}", f"--Exchange.root={exchange}"]

    # make assignments (for chapter 1 only): the student version has stubs, no solutions.
    make_assignments.main(["--course", str(course), "01_attention"])
    release = load(course / "release" / "01_attention" / "01_attention.ipynb")
    text = "\n".join(source(c) for c in release["cells"])
    assert "BEGIN SOLUTION" not in text and "source_hidden" not in json.dumps(release)
    assert (
        "attention_weights(q, k, mask):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
        in text
    )
    assert not any(c.get("outputs") for c in release["cells"])
    cells = by_grade_id(release)
    assert cells["ex-ch01-weights-check"]["metadata"]["editable"] is False
    assert "tags" not in cells["ex-ch01-weights"]["metadata"]  # no book tags left to hide it

    # Release, and a student fetches, answers and submits.
    nbgrader("release_assignment", "01_attention", *where)
    nbgrader("fetch_assignment", "01_attention", "--course=fusion", *where, cwd=home)
    fetched = home / "01_attention" / "01_attention.ipynb"
    solutions = by_grade_id(load(ROOT / "notebooks" / "01_attention.ipynb"))
    answered = load(fetched)
    for cell in answered["cells"]:
        grade_id = nbgrader_of(cell).get("grade_id", "")
        if nbgrader_of(cell).get("solution") and cell["cell_type"] == "code":
            cell["source"] = solutions[grade_id]["source"]
        elif nbgrader_of(cell).get("solution"):
            cell["source"] = ["1. It stores each row's log-sum-exp and recomputes the weights."]
    fetched.write_text(json.dumps(answered), encoding="utf-8")
    nbgrader("submit", "01_attention", "--course=fusion", *where, cwd=home)
    nbgrader("collect", "01_attention", *where)
    student = getpass.getuser()

    # A second submission arrives as a file: one answer wrong, one left as the stub, one check deleted.
    wrong = copy.deepcopy(release)
    kept = []
    for cell in wrong["cells"]:
        grade_id = nbgrader_of(cell).get("grade_id")
        if grade_id == "ex-ch01-weights":
            cell["source"] = course_cells.as_lines(WRONG_WEIGHTS)
        elif grade_id in ("ex-ch01-causal", "ex-ch01-variance"):
            cell["source"] = solutions[grade_id]["source"]
        elif grade_id == "ex-ch01-variance-check":
            continue  # nbgrader puts the locked check back (OverwriteCells.add_missing_cells)
        kept.append(cell)
    wrong["cells"] = kept
    submitted = course / "submitted" / "wrong" / "01_attention"
    submitted.mkdir(parents=True)
    (submitted / "01_attention.ipynb").write_text(json.dumps(wrong), encoding="utf-8")

    nbgrader("autograde", "01_attention", *where)  # nbgrader_config.py: smoke profile, 300 s a cell
    nbgrader("generate_feedback", "01_attention", *where)

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "fusion") as gb:
        right = gb.find_submission("01_attention", student)
        partial = gb.find_submission("01_attention", "wrong")
        scores = {
            "correct": (right.code_score, right.max_code_score),
            "wrong": (partial.code_score, partial.max_code_score),
            "written": right.max_written_score,
        }
        # The free-text answer waits for a person; once graded, the correct submission has every point.
        grade = gb.find_grade("ex-ch01-think-answer", "01_attention", "01_attention", student)
        grade.manual_score = grade.max_score
        gb.db.commit()
        total = (right.score, right.max_score)
    print(f"autograde scores: {scores}; correct submission after manual grading: {total}")
    assert scores["correct"] == (8.0, 8.0)  # 4 code exercises of 2 points
    assert scores["wrong"] == (
        4.0,
        8.0,
    )  # weights wrong, heads not written; the deleted check counts
    assert scores["written"] == 2.0 and total == (10.0, 10.0)

    graded = load(course / "autograded" / student / "01_attention" / "01_attention.ipynb")
    printed = json.dumps([c.get("outputs") for c in graded["cells"] if c["cell_type"] == "code"])
    assert "profile=smoke" in printed, "autograding should run with the smoke profile"

    feedback = (course / "feedback" / "wrong" / "01_attention" / "01_attention.html").read_text(
        encoding="utf-8"
    )
    plain = re.sub(r"<[^>]+>", "", feedback)
    assert "ExerciseFailure: you forgot to divide the scores by sqrt(d_k)" in plain
    assert "split_heads is not implemented yet" in plain
    assert "During handling of the above exception" not in plain
    assert "Traceback (most recent call last)" not in plain  # the message alone, first


# -- a training chapter -----------------------------------------------------------

WRONG_MASKED_MEAN = """def mean_over_regions(regions, region_mask):
    return regions.mean(dim=1)"""


def test_a_training_chapter_autogrades_whole_in_seconds(tmp_path):
    """Chapter 3 obtains six models before its last exercises: autograding runs it whole, fast."""
    chapter = "03_cross_attention_fusion"
    course = tmp_path / "course"
    where = [f"--CourseDirectory.root={course}"]
    make_assignments.main(["--course", str(course), chapter])
    release = load(course / "release" / chapter / f"{chapter}.ipynb")
    solutions = by_grade_id(load(ROOT / "notebooks" / f"{chapter}.ipynb"))
    code_answers = [
        grade_id
        for grade_id, cell in by_grade_id(release).items()
        if nbgrader_of(cell).get("solution") and cell["cell_type"] == "code"
    ]
    assert code_answers == [
        "ex-ch03-masked-mean",
        "ex-ch03-rn-cost",
        "ex-ch03-cross-step",
        "ex-ch03-iou",
    ]

    def submission(student: str, answers: dict[str, str]) -> None:
        nb = copy.deepcopy(release)
        for cell in nb["cells"]:
            grade_id = nbgrader_of(cell).get("grade_id")
            if grade_id in answers:
                cell["source"] = course_cells.as_lines(answers[grade_id])
        folder = course / "submitted" / student / chapter
        folder.mkdir(parents=True)
        (folder / f"{chapter}.ipynb").write_text(json.dumps(nb), encoding="utf-8")

    right = {grade_id: source(solutions[grade_id]) for grade_id in code_answers}
    submission("right", right)
    # The masked mean averages the padding too; the relation-network cost is left as the stub.
    wrong = {**right, "ex-ch03-masked-mean": WRONG_MASKED_MEAN}
    del wrong["ex-ch03-rn-cost"]
    submission("wrong", wrong)

    nbgrader("autograde", chapter, *where)
    nbgrader("generate_feedback", chapter, *where)

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "fusion") as gb:
        scores = {
            student: (
                gb.find_submission(chapter, student).code_score,
                gb.find_submission(chapter, student).max_code_score,
            )
            for student in ("right", "wrong")
        }
    print(f"{chapter} autograde scores: {scores}")
    assert scores == {"right": (8.0, 8.0), "wrong": (4.0, 8.0)}

    graded = load(course / "autograded" / "right" / chapter / f"{chapter}.ipynb")
    printed = json.dumps([c.get("outputs") for c in graded["cells"] if c["cell_type"] == "code"])
    assert "profile=smoke" in printed
    # The training cell ran: each of the six models loaded from its checkpoint (the committed full
    # recipe's, or a smoke one cached here) or trained with the smoke recipe, in seconds either way.
    obtained = re.findall(r"\b(?:loaded|trained) (ch03/\w+)", printed)
    assert len(obtained) == len(set(obtained)) == 6, obtained

    feedback = (course / "feedback" / "wrong" / chapter / f"{chapter}.html").read_text(
        encoding="utf-8"
    )
    plain = re.sub(r"<[^>]+>", "", feedback)
    assert "ExerciseFailure: you averaged over every region slot" in plain
    assert "rn_pairs is not implemented yet" in plain
