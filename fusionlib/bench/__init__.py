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
from typing import Any, Callable

from fusionlib import fileio, runtime

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


def write_report(report: dict[str, Any], results_name: str, out: str | None = None) -> str:
    """Write a benchmark's report: to ``out`` as plain JSON when given, else as ``results/<results_name>.json``.

    The default goes through :func:`fusionlib.runtime.write_results`, so the
    file carries the environment and obeys its rule for committed results.
    Returns the path written.
    """
    if out:
        return fileio.atomic_write_json(out, report)
    return runtime.write_results(results_name, report)
