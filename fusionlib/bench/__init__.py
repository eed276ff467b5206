"""Benchmarks: ``python -m fusionlib.bench NAME [options]``.

Each benchmark is a module here with ``main(argv=None)``. They print tables,
they are not timed tests: timings depend on the machine, so CI never asserts
on them. Names: ``attention`` (chapter 1), ``data`` and ``features``
(chapter 2), ``models`` and ``train`` (chapter 7).
"""

from __future__ import annotations

import importlib
import statistics
import time
from typing import Callable

BENCHMARKS = ("attention", "data", "features", "models", "train")


def run(name: str, argv: list[str] | None = None) -> None:
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    importlib.import_module(f"fusionlib.bench.{name}").main(argv)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved (A B C A B C ...).

    Interleaving spreads drifts of the machine (other processes, clocks)
    evenly over the contenders, so their ratio is fair even when the absolute
    times wander.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
