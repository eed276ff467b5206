"""VQA fine-tuning settings, tried one run at a time: what do batch size and the optimizer do to the relational questions?

Chapters 5 and 6 fine-tune the pretrained ViLBERT and UNITER (or fresh ones)
on the world's questions with ``fusionlib.experiments.pretrain.finetune_vqa``
(UNITER's settings: AdamW betas (0.9, 0.98), 10% warm-up, clipping at 5; the
``full`` recipe's batch and steps). This script runs one such fine-tune with
any of those settings changed, from the committed pretrained checkpoint of the
recipe (``--start pretrained``) or from scratch, on every label or on the low
label share, and scores it on the whole test split.

    python scripts/trials/vqa_finetune.py --model vilbert --batch 512 --betas 0.9 0.999 --clip 1 --warmup 0.05

One JSON record per run is appended to ``--out`` (default
``results/trials/vqa_finetune.jsonl``): the settings, the validation curves
(overall, relational, non-relational and each question family), the test
metrics, the wall time, the device and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("vilbert", "uniter"), required=True)
    parser.add_argument("--start", choices=("pretrained", "scratch"), default="pretrained")
    parser.add_argument("--labels", choices=("all", "low"), default="all")
    parser.add_argument("--recipe", choices=("smoke", "small", "full"), default="full")
    parser.add_argument("--steps", type=int, help="default: the recipe's")
    parser.add_argument("--batch", type=int, help="default: the recipe's")
    parser.add_argument("--lr", type=float, help="default: the recipe's")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98))
    parser.add_argument("--clip", type=float, default=5.0, help="max gradient norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        default=os.path.join(REPO, "results", "trials", "vqa_finetune.jsonl"),
        help="JSON lines file a record per run is appended to",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup is a share of the steps in [0, 1), got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fusionlib import checkpoints, runtime
    from fusionlib.data.datasets import make_tensor_loader
    from fusionlib.experiments import book as book_experiments
    from fusionlib.experiments import load_book_world, pretrain
    from fusionlib.experiments.uniter import vqa_step
    from fusionlib.metrics import evaluate_vqa
    from fusionlib.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    commit = checkpoints.git_commit()
    recipe = pretrain.VQA_RECIPES[args.recipe]
    steps = args.steps or recipe.steps[args.labels]
    batch = args.batch or recipe.batch_size
    lr = args.lr or recipe.lr
    book = load_book_world(runtime.RECIPE_PROFILE[args.recipe], progress=not args.no_progress)
    loaders = {
        "vilbert": book_experiments._vilbert_questions,
        "uniter": book_experiments._uniter_questions,
    }
    questions = loaders[args.model](book, args.recipe, "cpu")
    encoder = (
        book_experiments._pretrained_encoder(args.model, book, args.recipe)
        if args.start == "pretrained"
        else None
    )
    torch.manual_seed(args.seed)
    model = pretrain.vqa_model(args.model, book, args.recipe, encoder)
    config = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=int(args.warmup * steps),
        betas=tuple(args.betas),
        grad_clip=args.clip,
        eval_every=recipe.eval_every,
        seed=args.seed,
        amp=False,
    )
    val_loader = make_tensor_loader(questions.val, 1000, shuffle=False)
    started = time.perf_counter()
    history = train(
        model,
        make_tensor_loader(questions.train[args.labels], batch, seed=args.seed, drop_last=True),
        config,
        vqa_step,
        eval_fn=lambda m: evaluate_vqa(m, val_loader, prefix="val_"),
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    test = pretrain.evaluate_vqa_model(model.eval(), questions)
    record = {
        "model": args.model,
        "start": args.start,
        "labels": args.labels,
        "recipe": args.recipe,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "warmup_steps": config.warmup_steps,
        "betas": list(config.betas),
        "grad_clip": config.grad_clip,
        "seed": args.seed,
        "val": history.val,
        "test": test,
        "seconds": seconds,
        "device": checkpoints.device_label(torch.device("cpu")),
        "commit": commit,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(
        f"{args.model} {args.start} {args.labels}, {steps} x {batch}, betas {tuple(config.betas)}, "
        f"clip {config.grad_clip}, warm-up {config.warmup_steps}: test relational "
        f"{test['relational_accuracy']:.3f}, non-relational {test['non_relational_accuracy']:.3f} "
        f"({runtime.format_seconds(seconds)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
