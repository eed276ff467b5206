"""Chapter 6b's ablation, one record per (row, seed): ``python scripts/ablation.py --recipe full``.

    python scripts/ablation.py --recipe full                   # results/06b_ablation.jsonl (committed)
    python scripts/ablation.py --recipe full --budget 3000     # stop after ~50 min; run again to go on
    python scripts/ablation.py --recipe smoke --rows none MLM --seeds 0   # .cache/ablation/, a minute
    python scripts/ablation.py --recipe small --rows "+WRA" "+WRA, joint masking"

For every row of ``fusionlib.experiments.ablation.ABLATION_ROWS`` (``--rows``,
default all) and every seed (``--seeds``, default 0 1 2), the row is
pretrained, fine-tuned on the low-label VQA set and scored on the test split
(``fusionlib.experiments.ablation.run_ablation``), and one JSON line is
appended to ``--out``: ``row``, ``seed``, ``recipe``, ``fingerprint``,
``itm_trained``, ``metrics`` (``vqa``, ``retrieval``, and ``probes`` for
pretrained rows), ``seconds`` (``pretrain``, ``finetune``, ``evaluate``),
``device``, ``threads``, ``commit`` (read when the script starts: the code
loaded then is the code that runs), ``date`` (UTC) and ``torch``.

``results/06b_ablation.jsonl`` holds the full recipe's records, the ones
chapter 6b's tables are built from (``ablation.current_records`` keeps those
that today's code would reproduce, ``ablation.summarise`` gives each row's mean
and range over seeds). Smaller recipes write under the cache
(``.cache/ablation/``), so their records are never committed.

A model that a committed checkpoint already holds (the same spec, whatever
its name) is loaded instead of trained: chapter 6's UNITER is the ``+WRA``
row's seed 0, and its low-label runs from scratch are the ``none`` row's
(the record's ``reused`` names them). A (row, seed) whose fingerprint is
already in ``--out`` is skipped. The pretraining data and questions are
built once per invocation. Training state
is saved as it goes under ``--work`` (``.cache/ablation/work/<recipe>``), so a
run that is killed, or stopped by ``--budget``, continues from its last save
when the script is started again.

Exit status: 0 when every selected run is recorded, 3 when the budget ran out
first (run again to resume), 1 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from fusionlib import checkpoints, runtime  # noqa: E402
from fusionlib.experiments import ablation, load_book_world, pretrain  # noqa: E402

BUDGET_SPENT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe", choices=tuple(pretrain.PRETRAIN_RECIPES), required=True, help="recipe size"
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=tuple(ablation.ABLATION_ROWS),
        default=list(ablation.ABLATION_ROWS),
        metavar="ROW",
        help=f"rows to run, of {list(ablation.ABLATION_ROWS)} (default: all)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=list(ablation.ABLATION_SEEDS),
        metavar="SEED",
        help="seeds to run (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON-lines file to append to (default: results/06b_ablation.jsonl for full, "
        "else .cache/ablation/06b_ablation_<recipe>.jsonl)",
    )
    parser.add_argument(
        "--work",
        default=None,
        help="resumable training state (default: .cache/ablation/work/<recipe>)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's; 1 is faster on a CPU shared with other work)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds (state is kept; run again to resume)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    args = parser.parse_args(argv)
    bad = [s for s in args.seeds if s < 0]
    if bad:
        parser.error(f"--seeds must be ints >= 0, got {bad}")
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be a positive int, got {args.threads}")
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    # Each (row, seed) once, in the order asked.
    args.rows = list(dict.fromkeys(args.rows))
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def _append(path: str, record: dict) -> None:
    """One write per record, flushed to disk: a run killed later loses nothing already recorded."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ["FUSIONLIB_PROFILE"] = runtime.RECIPE_PROFILE[args.recipe]
    recipe = args.recipe
    out = os.path.abspath(args.out or ablation.records_path(recipe))
    work = os.path.abspath(
        args.work or os.path.join(runtime.cache_dir(), "ablation", "work", recipe)
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = runtime.device()
    commit = checkpoints.git_commit()  # the code loaded now is the code that runs
    print(runtime.summary())
    runs = [(row, seed) for row in args.rows for seed in args.seeds]
    print(f"recipe {recipe} | {len(runs)} runs | out {out} | work {work}")

    status = 0
    try:
        with runtime.time_budget(args.budget):
            book = load_book_world(runtime.RECIPE_PROFILE[recipe], progress=not args.no_progress)
            print(book, f"| {runtime.format_seconds(book.seconds)}")
            recorded = {
                (r.get("row"), r.get("seed"), r.get("fingerprint"))
                for r in (ablation.read_records(out) if os.path.exists(out) else [])
            }
            todo = []
            for row, seed in runs:
                spec_fingerprint = checkpoints.fingerprint(
                    ablation.ablation_spec(row, seed, book, recipe)
                )
                if (row, seed, spec_fingerprint) in recorded:
                    print(f"{row!r} seed {seed}: recorded ({spec_fingerprint}), skipped")
                else:
                    todo.append((row, seed, spec_fingerprint))
            if todo:
                # Built once: every row reads the same captions, probes and questions.
                data = pretrain.pretrain_data("uniter", book, recipe, device)
                questions = pretrain.question_data("uniter", book, data, recipe, device)
                os.makedirs(os.path.dirname(out), exist_ok=True)
            for row, seed, spec_fingerprint in todo:
                print(f"{row!r} seed {seed}: running the {recipe} recipe ({spec_fingerprint})")
                # Named by fingerprint: a changed spec never resumes old state.
                state = os.path.join(work, spec_fingerprint)
                record = ablation.run_ablation(
                    row,
                    seed,
                    book,
                    data,
                    questions,
                    recipe,
                    device=device,
                    progress=not args.no_progress,
                    checkpoint_dir=state,
                )
                record.update(
                    device=checkpoints.device_label(device),
                    threads=torch.get_num_threads(),
                    commit=commit,
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    torch=torch.__version__,
                )
                # The alarm waits until the record is written and its state removed: a budget that runs
                # out here stops the script after this run, not halfway through its line.
                with runtime.budget_held():
                    _append(out, record)
                    shutil.rmtree(state, ignore_errors=True)
                vqa, seconds = record["metrics"]["vqa"], record["seconds"]
                loaded = [name for name in record["reused"].values() if name]
                print(
                    f"{row!r} seed {seed}: relational {vqa['relational_accuracy']:.3f}, "
                    f"non-relational {vqa['non_relational_accuracy']:.3f} | "
                    f"{runtime.format_seconds(sum(seconds.values()))}"
                    + (f" (loaded {', '.join(loaded)})" if loaded else "")
                    + f"; appended to {out}"
                )
    except runtime.BudgetSpent:
        status = BUDGET_SPENT
        print(
            f"budget of {args.budget:g} s spent; the training state is in {work}: run again to resume"
        )
    print(f"ablation: {runtime.format_seconds(time.perf_counter() - started)} in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
