"""Train every checkpoint the book uses and record it in the manifest: ``python scripts/train_book.py``.

    python scripts/train_book.py --recipe full                 # checkpoints/ (committed), on GPU or CPU
    python scripts/train_book.py --recipe full --budget 3000   # stop after ~50 min; run again to go on
    python scripts/train_book.py --recipe smoke                # CI: .cache/checkpoints/, seconds
    python scripts/train_book.py --only ch03/cross_attention   # one checkpoint (or a prefix: --only ch03)

Checkpoints are trained in the order of ``fusionlib.experiments.BOOK_EXPERIMENTS``.
One whose fingerprint already matches the manifest is skipped. Training
state is saved as it goes under ``--work`` (``.cache/train_book/<recipe>``),
so a run that is killed, or stopped by ``--budget``, continues from its last
save when started again, with exactly the batches it would have used.
``--archive`` packs the output folder into one ``.tar.gz`` (for a GPU machine
without network access, whose files come back as one archive).

Exit status: 0 when every selected checkpoint is up to date, 3 when the
budget ran out first (run again to resume), 1 on an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BUDGET_SPENT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe",
        choices=("smoke", "small", "full"),
        default=None,
        help="recipe to train (default: the profile's: smoke, cpu -> small, gpu -> full)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="NAME",
        help="checkpoint names or prefixes, e.g. ch03 or ch03/cross_attention",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (state is kept; run again to resume)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="where weights and manifest go (default: checkpoints/ for full, else .cache/checkpoints)",
    )
    parser.add_argument(
        "--work",
        default=None,
        help="resumable training state (default: .cache/train_book/<recipe>)",
    )
    parser.add_argument(
        "--archive", default=None, metavar="PATH.tar.gz", help="also pack --out into this archive"
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train even when a checkpoint's fingerprint matches (e.g. to replace CPU-trained ones on a GPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's; 1 is faster on a CPU shared with other work)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be a positive int, got {args.threads}")
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from fusionlib import (
        checkpoints,
        runtime,
    )  # runtime reads the profile when asked, not on import
    from fusionlib.experiments import BOOK_EXPERIMENTS, load_book_world

    if args.recipe is not None:
        os.environ["FUSIONLIB_PROFILE"] = runtime.RECIPE_PROFILE[args.recipe]

    recipe = args.recipe or checkpoints.profile_recipe()
    out = os.path.abspath(
        args.out
        or (
            checkpoints.checkpoint_root()
            if recipe == "full"
            else checkpoints.cache_checkpoint_root()
        )
    )
    work = os.path.abspath(args.work or os.path.join(runtime.cache_dir(), "train_book", recipe))
    selected = [
        e
        for e in BOOK_EXPERIMENTS
        if args.only is None
        or any(e.name == o or e.name.startswith(o.rstrip("/") + "/") for o in args.only)
    ]
    if not selected:
        raise SystemExit(f"--only {args.only} matches none of {[e.name for e in BOOK_EXPERIMENTS]}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    runtime.seed_everything(0)
    device = runtime.device()
    commit = checkpoints.git_commit()  # the code loaded now is the code that trains
    print(runtime.summary())
    print(f"recipe {recipe} | {len(selected)} checkpoints | out {out} | work {work}")

    status = 0
    try:
        with runtime.time_budget(args.budget):
            book = load_book_world(runtime.RECIPE_PROFILE[recipe], progress=not args.no_progress)
            print(book, f"| {runtime.format_seconds(book.seconds)}")
            if recipe == "full":
                # The committed models go with the detector whose features they read (checkpoints/world/).
                from fusionlib import vision

                vision.commit_detector(
                    book.world, book.detector, book.scenes["train"], progress=False, root=out
                )
            data_cache: dict[int, object] = {}
            for exp in selected:
                spec = exp.spec(book, recipe)
                record = checkpoints.read_manifest(out).get(exp.name)
                if (
                    record is not None
                    and record.fingerprint == checkpoints.fingerprint(spec)
                    and not args.retrain
                ):
                    print(f"{exp.name}: up to date ({checkpoints.describe(record, exp.headline)})")
                    continue
                key = id(exp.data.__code__)  # experiments that share a data builder share the data
                if key not in data_cache:
                    data_cache.clear()  # one data set in memory at a time
                    data_cache[key] = exp.data(book, recipe, device)
                data = data_cache[key]
                # Keyed by the recipe's fingerprint too: the state of a run whose recipe has since
                # changed is never resumed into the new one.
                state_dir = os.path.join(work, exp.name, checkpoints.fingerprint(spec)[:16])
                print(
                    f"{exp.name}: training the {recipe} recipe "
                    f"({exp.steps(book, recipe):,} steps x {exp.batch_size(book, recipe)})"
                )
                model, history, seconds = exp.train(
                    book,
                    data,
                    recipe,
                    device=device,
                    checkpoint_dir=state_dir,
                    progress=not args.no_progress,
                )
                record = checkpoints.save_checkpoint(
                    model,
                    name=exp.name,
                    chapter=exp.chapter,
                    recipe=recipe,
                    spec=spec,
                    steps=exp.steps(book, recipe),
                    batch_size=exp.batch_size(book, recipe),
                    device=device,
                    wall_seconds=seconds,
                    history=history,
                    evaluate=lambda m: exp.evaluate(m, data, recipe),
                    root=out,
                    commit=commit,
                )
                shutil.rmtree(os.path.join(work, exp.name), ignore_errors=True)
                print(f"{exp.name}: saved, {checkpoints.describe(record, exp.headline)}")
    except runtime.BudgetSpent:
        status = BUDGET_SPENT
        print(
            f"budget of {args.budget:g} s spent; the training state is in {work}: "
            "run again to resume"
        )

    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=os.path.basename(out.rstrip("/")))
        print(f"packed {out} into {args.archive}")
    print(f"train_book: {runtime.format_seconds(time.perf_counter() - started)} in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
