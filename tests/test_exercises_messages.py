"""A failed check reads as its message first: no chained traceback, no frames of the checker."""

from __future__ import annotations

import re
import traceback

import nbformat
import pytest
from nbclient import NotebookClient

from fusionlib.exercises import ExerciseFailure, call_student, ch01


def not_written(q, k, mask):
    raise NotImplementedError()


def unscaled(q, k, mask):
    import torch

    return torch.softmax((q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf")), dim=-1)


def failure_of(check, *args) -> ExerciseFailure:
    with pytest.raises(ExerciseFailure) as info:
        check(*args)
    return info.value


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (not_written, "not_written is not implemented yet"),
        (unscaled, "you forgot to divide the scores by sqrt(d_k)"),
    ],
)
def test_a_failure_is_an_assertion_with_the_message_and_no_chain(answer, message):
    error = failure_of(ch01.check_attention_weights, answer)
    assert isinstance(error, AssertionError)  # nbgrader counts it as a failed test
    assert str(error).startswith(message)
    assert error.__cause__ is None and error.__suppress_context__
    printed = "".join(traceback.format_exception(error))
    assert "During handling of the above exception" not in printed
    lines = error._render_traceback_()  # what IPython shows
    assert re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) == f"ExerciseFailure: {error}"
    assert "fusionlib.exercises.ch01.check_attention_weights" in lines[1]
    assert len(lines) == 2


def test_a_crash_in_the_students_code_names_its_line():
    namespace: dict = {}
    exec(compile("def f(x):\n    y = x + 1\n    return y[0]\n", "<cell>", "exec"), namespace)
    with pytest.raises(ExerciseFailure) as info:
        call_student(namespace["f"], 1)
    assert str(info.value) == (
        "f raised TypeError: 'int' object is not subscriptable (line 3 of your cell)"
    )
    # A check's own try/except (here: the answer is not a number) does not chain either.
    error = failure_of(ch01.check_score_variance, lambda d_k: "d_k")
    assert str(error) == "return a number, got str" and error.__suppress_context__


def test_in_a_kernel_the_failure_shows_the_message_first_in_two_lines():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from fusionlib.exercises import ch01 as checks"),
        nbformat.v4.new_code_cell("def split_heads(x, H):\n    raise NotImplementedError()"),
        nbformat.v4.new_code_cell("checks.check_split_merge_heads(split_heads, lambda x: x)"),
    ]
    NotebookClient(nb, timeout=120, allow_errors=True).execute()
    (error,) = [o for o in nb.cells[2].outputs if o.output_type == "error"]
    shown = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in error.traceback]
    assert shown == [
        (
            "ExerciseFailure: split_heads is not implemented yet: replace `raise NotImplementedError` "
            "with your code."
        ),
        (
            "(raised by fusionlib.exercises.ch01.check_split_merge_heads; change your answer and run "
            "the check again)"
        ),
    ]
