"""Benchmark: how fast the synthetic world is generated (chapter 2; closing note of chapter 7).

``python -m fusionlib.bench data`` generates the whole default world
(Sort-of-CLEVR: 9,800 train + 500 val + 200 test images, 20 questions and 5
captions each) and prints scenes per second, the time for the world, and how
that time splits between drawing the images and everything else (layout,
captions, questions). Generation is single-threaded Python + PIL, so this is
a one-core number; pin it to be sure: ``taskset -c 0 python -m fusionlib.bench data``.

It also times the truth judge (:func:`fusionlib.data.truth.truth_matrix`):
the 1,000 captions of the test split against 10,000 scenes, on one thread.

The budgets: the whole default Sort-of-CLEVR (10,000 images with 20
questions each) in under 10 s on one core, and the 1,000 x 10,000 truth
matrix in under 2 s.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from typing import Any

from .. import runtime
from ..data import truth
from ..data.shapes import SPLITS, WorldConfig, generate_scene, render

BUDGET_S = 10.0  # for the 10,000 Sort-of-CLEVR images
SORT_OF_CLEVR_IMAGES = 10_000
TRUTH_BUDGET_S = 2.0  # for 1,000 captions x 10,000 scenes
TRUTH_CAPTIONS, TRUTH_SCENES = 1_000, 10_000


def run(config: WorldConfig, max_scenes: int | None = None) -> dict[str, Any]:
    """Generate ``config``'s splits (or the first ``max_scenes`` scenes) and time it."""
    plan = []
    for split in SPLITS:
        plan += [(split, i) for i in range(config.split_size(split))]
    if max_scenes is not None:
        plan = plan[:max_scenes]
    start = time.perf_counter()
    scenes = [generate_scene(config, i, split) for split, i in plan]
    total = time.perf_counter() - start
    start = time.perf_counter()
    for scene in scenes:
        render(scene.objects, config.image_size)
    drawing = time.perf_counter() - start
    questions = sum(len(s.questions) for s in scenes)
    captions = sum(len(s.captions) for s in scenes)
    per_scene = total / len(scenes)
    texts = [c for s in reversed(scenes) for c in s.captions][
        :TRUTH_CAPTIONS
    ]  # the test split's first
    judged = scenes[:TRUTH_SCENES]
    with runtime.num_threads(1):
        truth.truth_matrix(texts[:10], judged[:10])  # warm-up
        start = time.perf_counter()
        matrix = truth.truth_matrix(texts, judged)
        truth_seconds = time.perf_counter() - start
    return {
        "scenes": len(scenes),
        "questions": questions,
        "captions": captions,
        "seconds": total,
        "scenes_per_s": len(scenes) / total,
        "render_seconds": drawing,
        "sort_of_clevr_seconds": per_scene * SORT_OF_CLEVR_IMAGES,
        "truth_shape": tuple(matrix.shape),
        "truth_seconds": truth_seconds,
        "truth_true_share": float(matrix.float().mean()) if matrix.numel() else 0.0,
        "cpus_allowed": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.bench data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--scenes",
        type=int,
        default=None,
        help="time only the first N scenes (default: the whole default world)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print the 15 most expensive functions"
    )
    args = parser.parse_args(argv)
    if args.scenes is not None and args.scenes < 1:
        parser.error(f"--scenes must be >= 1, got {args.scenes}")

    config = WorldConfig()
    result = run(config, args.scenes)
    budget_ok = result["sort_of_clevr_seconds"] < BUDGET_S
    print(
        f"world: {config.image_size} px, {config.num_objects} objects, {config.num_questions} questions and "
        f"{config.num_captions} captions per scene (key {config.key()}); CPUs allowed: {result['cpus_allowed']}"
    )
    print(
        f"generated {result['scenes']:,} scenes ({result['questions']:,} questions, {result['captions']:,} captions) "
        f"in {result['seconds']:.2f} s"
    )
    print(f"scenes per second: {result['scenes_per_s']:,.0f}")
    print(
        f"  of which drawing the images: {result['render_seconds']:.2f} s "
        f"({result['render_seconds'] / result['seconds']:.0%})"
    )
    print(
        f"Sort-of-CLEVR, {SORT_OF_CLEVR_IMAGES:,} images x {config.num_questions} questions: "
        f"{result['sort_of_clevr_seconds']:.2f} s (budget {BUDGET_S:.0f} s: {'ok' if budget_ok else 'OVER'})"
    )
    n_texts, n_scenes = result["truth_shape"]
    truth_ok = result["truth_seconds"] < TRUTH_BUDGET_S
    print(
        f"truth matrix, {n_texts:,} captions x {n_scenes:,} scenes on one thread: {result['truth_seconds']:.2f} s "
        f"(budget {TRUTH_BUDGET_S:.0f} s for 1,000 x 10,000: {'ok' if truth_ok else 'OVER'}); "
        f"{result['truth_true_share']:.1%} of the pairs are true"
    )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(config, min(args.scenes or 2_000, 2_000))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return result


if __name__ == "__main__":
    main()
