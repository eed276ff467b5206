"""Checks that tell a student whether an exercise is right, and if not, what is wrong.

Each chapter has a module (``fusionlib.exercises.ch01`` …) of ``check_*``
functions. A check takes the student's function (or answer), runs it on cases
whose right answer the library knows, and either prints a short "correct"
line or raises :class:`ExerciseFailure` with a message that says *what* is
wrong: a shape, an unnormalised row, a masked position that still gets
weight, a missing scale…

A failure reads as the check's message first. In Jupyter it shows as
``ExerciseFailure: <message>`` and the name of the check, not as a traceback
through the checking code (``ExerciseFailure._render_traceback_``, which
IPython calls); nowhere is it chained to the error it reports ("During
handling of the above exception…"). It stays an ``AssertionError``, so
nbgrader counts a failed check as a failed test.

The instructor notebooks hold the solutions between nbgrader's
``### BEGIN SOLUTION`` / ``### END SOLUTION`` markers, in answer cells
followed by a locked cell that calls the check (``scripts/course_cells.py``);
``make assignments`` generates the student versions with nbgrader.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn

import torch


class ExerciseFailure(AssertionError):
    """The student's answer is wrong; the message says how."""

    def _render_traceback_(self) -> list[str]:
        """What Jupyter shows: the message, then which check raised it (no frames of the checker)."""
        lines = [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]
        check = _raising_check(self.__traceback__)
        if check:
            lines.append(f"(raised by {check}; change your answer and run the check again)")
        return lines


def _raising_check(tb: TracebackType | None) -> str | None:
    """The last ``check_*`` function of ``fusionlib.exercises`` on a traceback."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(__name__) and code.co_name.startswith("check_"):
            found = f"{module}.{code.co_name}"
        tb = tb.tb_next
    return found


def fail(message: str) -> NoReturn:
    """Raise the failure; never chained to an exception being handled (a check's own try/except)."""
    raise ExerciseFailure(message) from None


def _where_in_student_code(fn: Callable[..., Any], error: BaseException) -> str:
    """``" (line 3 of your cell: x = ...)"`` for the deepest frame of the student's cell."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if f.filename == code.co_filename
    ]
    if not frames:
        return ""
    frame = frames[-1]
    line = f": {frame.line.strip()}" if frame.line else ""
    return f" (line {frame.lineno} of your cell{line})"


def call_student(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the student's function, turning "not written yet" and crashes into a helpful failure."""
    name = getattr(fn, "__name__", "your function")
    try:
        return fn(*args, **kwargs)
    except ExerciseFailure:
        raise
    except NotImplementedError:
        message = (
            f"{name} is not implemented yet: replace `raise NotImplementedError` with your code."
        )
    except Exception as error:  # noqa: BLE001 - a student's bug, reported, not hidden
        message = (
            f"{name} raised {type(error).__name__}: {error}{_where_in_student_code(fn, error)}"
        )
    fail(message)


def expect_tensor(name: str, got: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        fail(f"{name} should be a torch.Tensor, got {type(got).__name__}")
    if shape is not None and tuple(got.shape) != tuple(shape):
        fail(f"{name} should have shape {tuple(shape)}, got {tuple(got.shape)}")
    if got.is_floating_point() and not torch.isfinite(got).all():
        fail(f"{name} contains NaN or inf")
    return got


def passed(message: str) -> None:
    print(f"Correct: {message}")


def random_boxes(n: int, image_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``(n, 4)`` xyxy pixel boxes, at least 1 pixel wide and high, inside an ``(H, W)`` image."""
    H, W = image_size
    xy1 = torch.rand(n, 2, generator=generator) * torch.tensor([W / 2, H / 2])
    wh = 1 + torch.rand(n, 2, generator=generator) * torch.tensor([W / 2 - 1, H / 2 - 1])
    return torch.cat([xy1, xy1 + wh], dim=1)
