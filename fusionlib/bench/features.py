"""Benchmark: train the region detector and extract region features for the whole world (chapter 2).

``python -m fusionlib.bench features`` generates the default Sort-of-CLEVR
world (9,800 + 500 + 200 = 10,500 images), trains the detector with the
default :class:`~fusionlib.vision.DetectorConfig`, reports its test accuracy
on ground-truth boxes, and times region-feature extraction for every image.
The aim is extraction under 60 s on 2 CPU cores. Nothing is read
from or written to the feature cache: every number is measured fresh.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fusionlib import runtime
from fusionlib.data.shapes import WorldConfig, generate_split
from fusionlib.vision import (
    DetectorConfig,
    evaluate_detector,
    extract_region_features,
    train_detector,
)

EXTRACTION_BUDGET_S = 60.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.bench features", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default 2, the target machine)"
    )
    parser.add_argument(
        "--device", default="cpu", help="device for training and extraction (default cpu)"
    )
    parser.add_argument(
        "--steps", type=int, default=DetectorConfig().steps, help="detector training steps"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per extraction batch")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.threads <= 0:
        parser.error(f"--threads must be positive, got {args.threads}")

    world = WorldConfig()
    cfg = DetectorConfig(steps=args.steps)
    report: dict = {"threads": args.threads, "device": args.device, "detector_steps": cfg.steps}
    with runtime.num_threads(args.threads):
        start = time.perf_counter()
        splits = {name: generate_split(world, name) for name in ("train", "val", "test")}
        report["generate_seconds"] = time.perf_counter() - start
        scenes = splits["train"] + splits["val"] + splits["test"]
        report["images"] = len(scenes)

        detector, history = train_detector(
            world, cfg, splits["train"], progress=args.progress, device=args.device
        )
        report["train_seconds"] = history["train_seconds"]
        report["detector_params"] = history["num_params"]
        report["test_accuracy"] = evaluate_detector(detector, splits["test"])

        detector.to(runtime.device(args.device))
        start = time.perf_counter()
        features = extract_region_features(
            detector, scenes, batch_size=args.batch_size, progress=args.progress
        )
        runtime.synchronize(runtime.device(args.device))
        report["extract_seconds"] = time.perf_counter() - start
        report["regions"] = int(features.mask.sum())

    fmt = runtime.format_seconds
    print(f"device {args.device}, {args.threads} CPU threads, torch {torch.__version__}")
    print(f"world: {report['images']:,} images generated in {fmt(report['generate_seconds'])}")
    print(
        f"detector: {report['detector_params']:,} params, {cfg.steps} steps x {cfg.batch_size} images "
        f"trained in {fmt(report['train_seconds'])}; test accuracy on object boxes {report['test_accuracy']:.4f}"
    )
    verdict = "within" if report["extract_seconds"] < EXTRACTION_BUDGET_S else "OVER"
    print(
        f"region features: {report['images']:,} images, {report['regions']:,} regions extracted in "
        f"{fmt(report['extract_seconds'])} ({report['images'] / report['extract_seconds']:,.0f} images/s; "
        f"{verdict} the {EXTRACTION_BUDGET_S:.0f} s budget)"
    )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
