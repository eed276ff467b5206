"""Checks that tell a student whether an exercise is right, and if not, what is wrong.

Each chapter has a module (``fusionlib.exercises.ch01`` …) of ``check_*``
functions. A check takes the student's function (or answer), runs it on cases
whose right answer the library knows, and either prints a short "correct"
line or raises :class:`ExerciseFailure` with a message that says *what* is
wrong: a shape, an unnormalised row, a masked position that still gets
weight, a missing scale…

The instructor notebooks hold the solutions between nbgrader's
``### BEGIN SOLUTION`` / ``### END SOLUTION`` markers; ``make assignments``
strips them for students.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class ExerciseFailure(AssertionError):
    """The student's answer is wrong; the message says how."""


def fail(message: str) -> None:
    raise ExerciseFailure(message)


def call_student(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the student's function, turning "not written yet" into a helpful failure."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        fail(
            f"{getattr(fn, '__name__', 'your function')} is not implemented yet: replace "
            "`raise NotImplementedError` with your code."
        )
    except ExerciseFailure:
        raise
    except Exception as error:  # noqa: BLE001 - a student's bug, reported, not hidden
        fail(f"{getattr(fn, '__name__', 'your function')} raised {type(error).__name__}: {error}")


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
