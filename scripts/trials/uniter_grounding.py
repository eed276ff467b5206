"""Trial runs behind chapter 6's ablation: when does a small UNITER ground words in regions?

Pretrains a fresh UNITER on the world's training captions with a task mix and,
every tenth of the run, measures on 512 held-out test pairs:

* ``itm_val``: image-text matching accuracy (half the pairs swapped, chance 0.5);
* ``shape_mlm``: accuracy at *every* shape word ("square", "circle", ...) masked
  at once: which shape the named colour has is in the image, not in the caption;
* ``colour_mlm``: the same for every colour word (all six colours are in every
  scene, so this needs relations, not just grounding).

It appends one JSON record per run (options, curves, wall time, commit) to
``--out``. The runs quoted in chapter 6 (section 6.10) are in
``results/trials/06_uniter_grounding.jsonl``; for example::

    python scripts/trials/uniter_grounding.py --mix mlm --steps 3000 --batch 128
    python scripts/trials/uniter_grounding.py --mix mlm+itm --steps 3000 --layers 2

With ``--finetune-steps N`` the pretrained encoder (or, with ``--mix none``, a
fresh one) is then fine-tuned for N steps on chapter 6's low-label VQA set (the
first 10% of the training scenes) and scored on the test questions, and its ITM
head ranks the captions of the first ``--retrieval-images`` test images: chapter
6b's fine-tuned ablation, run for every row and seed (section 6b.6), e.g.::

    python scripts/trials/uniter_grounding.py --mix mlm+itm --no-wra --steps 4800 --eval-every 150 \
        --stop-at 0.95 --finetune-steps 250 --out results/trials/06b_finetuned_ablation.jsonl

Each run uses one CPU thread (2 cores run two trials side by side); a 4-layer
run of 3,000 steps of 128 took 11 minutes that way, 1,200 steps of 512 18 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from typing import Any

import torch

from fusionlib import runtime
from fusionlib.data.datasets import (
    CaptionDataset,
    QuestionDataset,
    TensorBatches,
    make_tensor_loader,
    retrieval_set,
)
from fusionlib.data.shapes import WorldConfig, answer_vocab, generate_split
from fusionlib.data.tokenizer import world_tokenizer
from fusionlib.metrics import evaluate_vqa, image_text_recall, retrieval_chance
from fusionlib.models import uniter
from fusionlib.train import TrainConfig, train
from fusionlib.vision import DetectorConfig, load_or_build_features

MIXES = {
    "none": {},  # no pretraining (with --finetune-steps)
    "mlm": {"mlm": 1},
    "itm": {"itm": 1},
    "mlm+itm": {"mlm": 1, "itm": 1},
    "mlm+itm+mrc-kl": {"mlm": 2, "itm": 2, "mrc_kl": 1},  # chapter 6's ablation rows
    "uniter": dict(uniter.UNITER_TASK_MIX),  # itm 2, mlm 2, mrfr 1, mrc-kl 1
}


def held_out_metrics(
    model: uniter.UniterForPretraining,
    pairs: dict,
    captions: dict,
    word_ids: dict[str, torch.Tensor],
) -> dict[str, float]:
    """ITM accuracy on ``pairs`` (prepared for ITM) and MLM accuracy with every word of a kind masked.

    The ``eval_fn`` of :func:`fusionlib.train.train`, which calls it in eval mode under ``torch.no_grad()``.
    """
    logits = model.itm_logits(pairs)
    result = {"itm_val": float((logits.argmax(-1) == pairs["itm_labels"]).float().mean())}
    for kind, ids in word_ids.items():
        result[f"{kind}_mlm"] = uniter.masked_word_accuracy(model, captions, ids)
    return result


def finetune_and_retrieve(
    model: uniter.UniterForPretraining,
    args: argparse.Namespace,
    world: WorldConfig,
    scenes: dict,
    feats: dict,
    tok: Any,
    stats: dict,
) -> dict:
    """Chapter 6b's evaluation of a pretrained encoder: low-label VQA fine-tuning and ITM retrieval.

    Fine-tunes a copy of the encoder (mean pooling, as chapter 6's VQA model) on
    the questions of the first 10% of the training scenes; the retrieval uses the
    pretrained ITM head itself, as chapter 6b does. Returns ``vqa`` (accuracy,
    relational and non-relational accuracy on the test split), the two set
    sizes, ``retrieval`` (``i2t_R@K``/``t2i_R@K``), its ``retrieval_chance``,
    the ``retrieval_set`` sizes and the ``seconds`` all of it took.
    """
    answers = answer_vocab(world)
    low_label = TensorBatches(
        QuestionDataset(scenes["train"][: len(scenes["train"]) // 10], feats["train"], tok, answers)
    )
    test = TensorBatches(QuestionDataset(scenes["test"], feats["test"], tok, answers))
    for data in (low_label, test):
        data.standardise(stats)
    vqa = uniter.UniterForVQA.from_encoder(model, num_answers=len(answers), vqa_pooling="mean")
    steps = args.finetune_steps
    config = TrainConfig(
        steps=steps,
        lr=args.lr,
        warmup_steps=steps // 10,
        betas=(0.9, 0.98),
        grad_clip=5.0,
        seed=args.seed,
        amp=False,
    )
    start = time.perf_counter()
    train(
        vqa,
        make_tensor_loader(low_label, args.batch, seed=args.seed, drop_last=True),
        config,
        uniter.vqa_step,
        progress=False,
    )
    scores = evaluate_vqa(vqa, make_tensor_loader(test, 1024, shuffle=False))
    retrieval_scenes = scenes["test"][: args.retrieval_images]
    ret = retrieval_set(retrieval_scenes, feats["test"], tok, stats)
    similarity = uniter.pair_scores(model, ret.images, ret.captions, batch_size=512)  # (N_i, N_c)
    return {
        "vqa": {
            k: scores[k] for k in ("accuracy", "relational_accuracy", "non_relational_accuracy")
        },
        "test_questions": len(test),
        "low_label_questions": len(low_label),
        "retrieval": image_text_recall(similarity, ret.caption_image),
        "retrieval_chance": retrieval_chance(len(retrieval_scenes), world.num_captions),
        "retrieval_set": {"images": len(retrieval_scenes), "captions": len(ret.caption_image)},
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", choices=sorted(MIXES), default="uniter")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--init", type=float, default=0.05, help="initializer_range (chapter 6 uses 0.05)"
    )
    parser.add_argument("--mask-probability", type=float, default=0.15)
    parser.add_argument(
        "--wra",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add WRA to ITM steps (UNITER's code does; --no-wra for the ablation's rows before +WRA)",
    )
    parser.add_argument("--masking", choices=("conditional", "joint"), default="conditional")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="probe every this many steps (default: steps / 10)",
    )
    parser.add_argument(
        "--stop-at",
        type=float,
        default=None,
        help="stop once the shape-word accuracy reaches this (the run counts as grounded)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="then fine-tune on the low-label VQA set this many steps and score VQA and retrieval",
    )
    parser.add_argument(
        "--retrieval-images", type=int, default=40, help="test images ranked for retrieval"
    )
    parser.add_argument("--save", default=None, help="save the pretrained model to this directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out",
        default=os.path.join(runtime.repo_root(), "results", "trials", "06_uniter_grounding.jsonl"),
    )
    args = parser.parse_args()
    # Checked here, not hours later when pretraining is over and the record would be lost.
    if args.finetune_steps < 0:
        parser.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.mix == "none" and not args.finetune_steps:
        parser.error("--mix none pretrains nothing: it needs --finetune-steps > 0")
    if args.finetune_steps and not 2 <= args.retrieval_images <= WorldConfig().num_test:
        parser.error(
            f"--retrieval-images must be in [2, {WorldConfig().num_test}] (the test images), "
            f"got {args.retrieval_images}"
        )
    torch.set_num_threads(args.threads)

    world, detector = WorldConfig(), DetectorConfig()
    tok = world_tokenizer(world)
    scenes = {split: generate_split(world, split) for split in ("train", "test")}
    feats = {
        split: load_or_build_features(
            world,
            detector,
            split,
            scenes=scenes[split],
            train_scenes=scenes["train"],
            progress=False,
        )
        for split in scenes
    }
    train_captions = TensorBatches(CaptionDataset(scenes["train"], feats["train"], tok))
    stats = train_captions.standardise()
    test_captions = TensorBatches(CaptionDataset(scenes["test"], feats["test"], tok))
    test_captions.standardise(stats)
    captions = next(iter(make_tensor_loader(test_captions, 512, seed=5, drop_last=True)))
    config = uniter.UniterConfig.small(
        len(tok),
        feats["train"].num_classes,
        initializer_range=args.init,
        dropout=args.dropout,
        num_layers=args.layers,
        mask_probability=args.mask_probability,
        use_wra=args.wra,
        masking=args.masking,
        itm_negatives="random",
    )  # as every record ran
    pairs = uniter.prepare_pretraining_batch(
        captions, "itm", config, torch.Generator().manual_seed(1)
    )
    word_ids = {
        "shape": torch.tensor(
            tok.convert_tokens_to_ids(["square", "circle", "squares", "circles"])
        ),
        "colour": torch.tensor(tok.convert_tokens_to_ids(list(world.colors))),
    }

    mix = MIXES[args.mix]
    torch.manual_seed(args.seed)
    model = uniter.UniterForPretraining(config)
    train_config = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.steps // 10,
        betas=(0.9, 0.98),
        grad_clip=5.0,
        seed=args.seed,
        amp=False,
        eval_every=args.eval_every or max(1, args.steps // 10),
        stop_when=None if args.stop_at is None else ("shape_mlm", args.stop_at),
    )
    loaders = {
        task: make_tensor_loader(train_captions, args.batch, seed=args.seed, drop_last=True)
        for task in mix
    }
    # The code that runs is the code at the start: a commit made while the run trains must not be recorded.
    git = ["git", "-C", runtime.repo_root()]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            [*git, "status", "--porcelain", "--", "fusionlib", "scripts/trials"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    start = time.perf_counter()
    if mix:
        history = train(
            model,
            loaders,
            train_config,
            uniter.pretraining_step,
            task_mix=mix,
            eval_fn=lambda m: held_out_metrics(m, pairs, captions, word_ids),
            progress=False,
        )
        held_out = {
            k: [[s, round(v, 4)] for s, v in zip(*history.series(k))]
            for k in ("itm_val", "shape_mlm", "colour_mlm")
        }
        stopped_at, updates = (
            history.stopped_at,
            {t: len(v[0]) for t, v in history.task_losses().items()},
        )
    else:  # no pretraining: the fresh model, probed once
        with torch.no_grad():
            held_out = {
                k: [[0, round(v, 4)]]
                for k, v in held_out_metrics(model.eval(), pairs, captions, word_ids).items()
            }
        history, stopped_at, updates = None, None, {}
    record = {
        "options": vars(args) | {"out": None},
        "mix_weights": mix,
        "seconds": time.perf_counter() - start,
        "held_out": held_out,
        "stopped_grounded_at": stopped_at,
        "updates_per_task": updates,
        "commit": commit,
        "uncommitted_changes": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
    }
    if "itm" in mix:
        steps, accuracy = history.series("itm_accuracy", "train")
        n = max(1, len(accuracy) // 10)
        record["itm_train"] = [
            [
                steps[min(i + n, len(steps)) - 1],
                round(sum(accuracy[i : i + n]) / len(accuracy[i : i + n]), 4),
            ]
            for i in range(0, len(accuracy), n)
        ]
    if args.save:
        model.save_pretrained(args.save)
    if args.finetune_steps:
        record["finetuned"] = finetune_and_retrieve(model, args, world, scenes, feats, tok, stats)
    record["seconds_total"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
