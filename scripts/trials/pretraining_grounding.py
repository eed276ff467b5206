"""When does pretraining ground words in regions? One pretraining run of ViLBERT or UNITER, with its probes.

Pretrains a fresh model with :func:`fusionlib.experiments.pretrain.train_pretraining`
(captions and descriptions, false and minimal-edit ITM negatives) and records,
every ``eval_every`` steps, the held-out probes of
:func:`~fusionlib.experiments.pretrain.grounding_metrics`: ITM against false
images, the text against its minimal edits kind by kind, and masked colour and
shape words (exact, and judged by truth). One JSON record per run (options,
curves, wall time, commit) is appended to ``--out``, e.g.::

    python scripts/trials/pretraining_grounding.py --model uniter --seed 0
    python scripts/trials/pretraining_grounding.py --model uniter --weight mrfr@captions=0 \\
        --weight mrfr@descriptions=0

``--weight TASK=W`` reweights one task of :func:`~fusionlib.experiments.pretrain.task_mix`;
``--set FIELD=VALUE`` changes a model config field (e.g. ``hard_negative_share=0.75``);
``--grounded P`` masks colours, shapes and places at P;
``--mlm-first N`` trains MLM alone for the first N steps (:func:`~fusionlib.experiments.pretrain.task_schedule`).
Each run uses ``--threads`` CPU threads (default 1: two cores run two trials side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from fusionlib import checkpoints, runtime  # noqa: E402
from fusionlib.experiments import load_book_world, pretrain  # noqa: E402


def _pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{what} must look like NAME=VALUE, got {text!r}")
    return key, value


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=pretrain.MODELS, required=True)
    parser.add_argument("--recipe", choices=tuple(pretrain.PRETRAIN_RECIPES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument(
        "--weight", action="append", default=[], type=lambda t: _pair(t, "--weight")
    )
    parser.add_argument("--set", action="append", default=[], type=lambda t: _pair(t, "--set"))
    parser.add_argument(
        "--mlm-first",
        type=int,
        default=None,
        help="steps of MLM alone before the full mix (default: the recipe's mlm_first_steps)",
    )
    parser.add_argument(
        "--grounded",
        type=float,
        default=None,
        help="MLM's chance for the grounded words (colours, shapes, places); default: the recipe's",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default=os.path.join(REPO, "results", "trials", "pretraining_grounding.jsonl")
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    book = load_book_world(runtime.RECIPE_PROFILE[args.recipe], progress=False)
    mix = pretrain.task_mix(args.model, **{k: float(v) for k, v in args.weight})
    model_changes = {k: _value(v) for k, v in args.set}
    if args.grounded is not None:
        model_changes.update(pretrain.grounded_masking(book, args.grounded))
    train_changes = {"steps": args.steps} if args.steps else {}
    if args.steps:
        r = pretrain.PRETRAIN_RECIPES[args.recipe]
        train_changes["warmup_steps"] = min(r.warmup_steps, args.steps // 10)
    commit = checkpoints.git_commit()  # the code loaded now is the code that trains
    data = pretrain.pretrain_data(args.model, book, args.recipe, "cpu")
    started = time.perf_counter()
    _, history, seconds = pretrain.train_pretraining(
        args.model,
        book,
        data,
        args.recipe,
        seed=args.seed,
        mix=mix,
        model_changes=model_changes,
        train_changes=train_changes,
        device="cpu",
        progress=not args.no_progress,
        mlm_first_steps=args.mlm_first,
    )
    record = {
        "model": args.model,
        "recipe": args.recipe,
        "seed": args.seed,
        "steps": args.steps or pretrain.PRETRAIN_RECIPES[args.recipe].steps,
        "batch_size": pretrain.PRETRAIN_RECIPES[args.recipe].batch_size,
        "mix": mix,
        "schedule": pretrain.task_schedule(args.model, args.recipe, mix, args.mlm_first),
        "model_changes": model_changes,
        "threads": args.threads,
        "seconds": seconds,
        "wall_seconds": time.perf_counter() - started,
        "val": history["val"],
        "train_tail": {
            k: v[-50:] for k, v in history["train"].items() if k in ("step", "task", "loss")
        },
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(
        args.out, "a", encoding="utf-8"
    ) as f:  # one write per record: runs side by side append whole lines
        f.write(json.dumps(record) + "\n")
    last = {k: round(v[-1], 3) for k, v in history["val"].items() if k.startswith("val_")}
    print(json.dumps(last))
    print(
        f"{args.model} seed {args.seed}: {runtime.format_seconds(seconds)}; appended to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
