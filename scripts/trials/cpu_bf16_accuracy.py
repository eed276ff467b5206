"""Does bf16 autocast on a CPU cost accuracy? Chapter 3's model, one seed, fp32 against bf16.

Trains one of chapter 3's models (default: the cross-attention model) on the
``small`` recipe (chapter 3's data, schedule, batch and seed) twice on the
CPU: with ``TrainConfig(cpu_amp="off")`` (fp32, the recipe as the book
trains it) and with ``cpu_amp="bf16"`` (bf16 autocast in every training
step; the weights, the optimizer and the evaluation stay float32). Both are
scored on the whole test split. bf16 is worth keeping only if the final test
accuracy stays within 1 point.

    python scripts/trials/cpu_bf16_accuracy.py                  # both precisions, 2 threads
    python scripts/trials/cpu_bf16_accuracy.py --precision bf16 --threads 1

One JSON record per run is appended to ``--out`` (default
``results/trials/07_cpu_bf16_accuracy.jsonl``): the options, the test
metrics, the wall time and steps/s, the CPU, its native-bf16 answer
(:func:`fusionlib.runtime.cpu_bf16_support`), the load average before and
after (timings on a shared machine are only comparable when it was quiet)
and the commit. With ``--precision both`` the last line printed is the
difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

PRECISIONS = {"fp32": "off", "bf16": "bf16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", default="cross_attention", help="one of chapter 3's setups")
    parser.add_argument("--recipe", choices=("smoke", "small", "full"), default="small")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        default=os.path.join(REPO, "results", "trials", "07_cpu_bf16_accuracy.jsonl"),
        help="JSON lines file a record per run is appended to",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads <= 0:
        parser.error(f"--threads must be positive, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fusionlib import checkpoints, runtime
    from fusionlib.bench.models import _cpu_name
    from fusionlib.experiments import fusion, load_book_world

    if args.setup not in fusion.SETUP_NAMES:
        raise SystemExit(f"--setup must be one of {fusion.SETUP_NAMES}, got {args.setup!r}")
    torch.set_num_threads(args.threads)
    commit = checkpoints.git_commit()
    book = load_book_world(runtime.RECIPE_PROFILE[args.recipe], progress=not args.no_progress)
    data = fusion.vqa_data(book, args.recipe, "cpu")
    kind, config = fusion.fusion_setups(
        args.recipe, len(book.tokenizer), len(book.answers), book.region_dim
    )[args.setup]
    native, why = runtime.cpu_bf16_support()
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    results = {}
    for precision in precisions:
        train_config = dataclasses.replace(
            fusion.fusion_train_config(args.recipe, args.seed), cpu_amp=PRECISIONS[precision]
        )
        load_before = list(os.getloadavg())
        started = time.perf_counter()
        model, history, seconds = fusion.train_vqa_model(
            kind,
            config,
            train_config,
            fusion.BATCH_SIZE[args.recipe],
            data,
            args.recipe,
            seed=args.seed,
            device="cpu",
            progress=not args.no_progress,
        )
        wall = time.perf_counter() - started
        test = fusion.evaluate_fusion_model(model, data, args.recipe)
        record = {
            "trial": "cpu_bf16_accuracy",
            "setup": args.setup,
            "recipe": args.recipe,
            "seed": args.seed,
            "precision": precision,
            "cpu_amp": train_config.cpu_amp,
            "steps": train_config.steps,
            "batch_size": fusion.BATCH_SIZE[args.recipe],
            "test": test,
            "final_val": {k: v[-1] for k, v in history["val"].items() if k.startswith("val_")},
            "final_train_loss": history["train"]["loss"][-1],
            "train_seconds": seconds,
            "wall_seconds": wall,
            "steps_per_s": train_config.steps / seconds,
            "threads": torch.get_num_threads(),
            "cpu": _cpu_name(),
            "cpu_bf16_native": native,
            "cpu_bf16_why": why,
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
            "torch": torch.__version__,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        results[precision] = record
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"{precision}: test accuracy {test['accuracy']:.4f} (relational "
            f"{test['relational_accuracy']:.4f}), {seconds:.0f} s, "
            f"{train_config.steps / seconds:.2f} steps/s, load {load_before[0]:.2f}",
            flush=True,
        )
    if len(results) == 2:
        gap = 100 * (results["bf16"]["test"]["accuracy"] - results["fp32"]["test"]["accuracy"])
        print(
            f"bf16 - fp32: {gap:+.2f} points of test accuracy "
            f"({'within' if abs(gap) <= 1.0 else 'outside'} the 1-point target); "
            f"speed-up {results['fp32']['train_seconds'] / results['bf16']['train_seconds']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
