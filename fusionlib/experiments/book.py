"""Every checkpoint the book uses, in the order ``scripts/train_book.py`` trains them.

Each :class:`BookExperiment` ties a checkpoint name (``"ch03/cross_attention"``)
to the functions that build its data, fingerprint its recipe, train it and
evaluate it. A chapter first asks :func:`chapter_recipe` which recipe it can
show (the largest whose checkpoints all match its data, under
``$FUSIONLIB_TRAIN=auto``), then :func:`obtain` for each model: loaded when
its checkpoint matches, trained otherwise (:mod:`fusionlib.checkpoints`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from fusionlib import checkpoints, runtime
from fusionlib.experiments import fusion, light, pretrain
from fusionlib.experiments.world import BookWorld

__all__ = ["BookExperiment", "BOOK_EXPERIMENTS", "chapter_recipe", "experiment", "obtain"]


@dataclasses.dataclass(frozen=True)
class BookExperiment:
    """One trained model of the book and how to make, fingerprint and score it."""

    name: str  # checkpoint name, "ch03/cross_attention"
    chapter: str  # results file stem, "03_cross_attention_fusion"
    headline: str  # the metric quoted when it loads, e.g. "relational_accuracy"
    golden: tuple[str, ...]  # metrics the golden tests reproduce
    data: Callable[[BookWorld, str, Any], Any]  # (book, recipe, device) -> data
    spec: Callable[[BookWorld, str], dict[str, Any]]  # (book, recipe) -> fingerprinted spec
    train: Callable[
        ..., tuple[nn.Module, dict[str, Any], float]
    ]  # (book, data, recipe, device, checkpoint_dir, progress)
    evaluate: Callable[
        [nn.Module, Any, str], dict[str, float]
    ]  # (model, data, recipe) -> test metrics

    def batch_size(self, book: BookWorld, recipe: str) -> int:
        return int(self.spec(book, recipe)["batch_size"])

    def steps(self, book: BookWorld, recipe: str) -> int:
        return int(self.spec(book, recipe)["train"]["steps"])


def _vqa_data(book: BookWorld, recipe: str, device: Any) -> fusion.VQAData:
    # One function for chapters 3 and 7: train_book.py and the golden tests share data between
    # experiments whose data builders are the same code.
    return fusion.vqa_data(book, recipe, device)


def _vqa_experiment(
    name: str,
    chapter: str,
    headline: str,
    spec: Callable[[BookWorld, str], dict[str, Any]],
    train: Callable[..., tuple[nn.Module, dict[str, Any], float]],
) -> BookExperiment:
    """A model trained and scored on chapter 3's questions: chapter 3's setups and chapter 7's sweep."""
    return BookExperiment(
        name=name,
        chapter=chapter,
        headline=headline,
        golden=("accuracy", "relational_accuracy", "non_relational_accuracy"),
        data=_vqa_data,
        spec=spec,
        train=lambda book, data, recipe, device=None, checkpoint_dir=None, progress=True: train(
            book, data, recipe, device=device, checkpoint_dir=checkpoint_dir, progress=progress
        ),
        evaluate=lambda model, data, recipe: fusion.evaluate_fusion_model(model, data, recipe),
    )


def _fusion_experiment(setup: str) -> BookExperiment:
    return _vqa_experiment(
        f"ch03/{setup}",
        "03_cross_attention_fusion",
        "relational_accuracy",
        spec=lambda book, recipe: fusion.fusion_spec(setup, book, recipe),
        train=lambda book, data, recipe, **kw: fusion.train_fusion_model(
            setup, book, data, recipe, **kw
        ),
    )


def _light_experiment(size: light.LightSize, seed: int) -> BookExperiment:
    return _vqa_experiment(
        light.light_name(size, seed),
        "07_efficiency",
        "accuracy",
        spec=lambda book, recipe: light.light_spec(size, seed, book, recipe),
        train=lambda book, data, recipe, **kw: light.train_light_model(
            size, seed, book, data, recipe, **kw
        ),
    )


def _vilbert_data(book: BookWorld, recipe: str, device: Any) -> pretrain.PretrainData:
    return pretrain.pretrain_data("vilbert", book, recipe, device)


def _uniter_data(book: BookWorld, recipe: str, device: Any) -> pretrain.PretrainData:
    # A function of its own, not a lambda from one factory: train_book.py and the golden tests
    # share data between experiments whose builders are the same code, and the two models'
    # data differ (ViLBERT's locations are scaled, UNITER's are not).
    return pretrain.pretrain_data("uniter", book, recipe, device)


def _pretraining_experiment(model: str, seed: int, word_order: bool = True) -> BookExperiment:
    """Chapter 5's ViLBERT or chapter 6's UNITER pretrained; ``word_order=False``: the bag-of-words baseline.

    Without position embeddings the model sees each text as a bag of words
    (``TextEmbeddings(positions=False)``): what it then gets right needs no word order.
    """
    prefix, chapter, data = {
        "vilbert": ("ch05", "05_vilbert", _vilbert_data),
        "uniter": ("ch06", "06_uniter", _uniter_data),
    }[model]
    changes = {} if word_order else {"word_order": False}
    kind = "pretrained" if word_order else "bag_of_words"
    return BookExperiment(
        name=f"{prefix}/{model}_{kind}_seed{seed}",
        chapter=chapter,
        headline="itm_captions",
        golden=("itm_captions", "itm_descriptions", "edit_all", "shape_word", "colour_word_true"),
        data=data,
        spec=lambda book, recipe: pretrain.pretrain_spec(
            model, book, recipe, seed=seed, model_changes=changes
        ),
        train=lambda book, data, recipe, device=None, checkpoint_dir=None, progress=True: (
            pretrain.train_pretraining(
                model,
                book,
                data,
                recipe,
                seed=seed,
                model_changes=changes,
                device=device,
                checkpoint_dir=checkpoint_dir,
                progress=progress,
            )
        ),
        # The test split's probes; the curves during training read the validation split's.
        evaluate=lambda m, data, recipe: pretrain.grounding_metrics(m, data, "test", prefix=""),
    )


def _vilbert_questions(book: BookWorld, recipe: str, device: Any) -> pretrain.QuestionData:
    return pretrain.question_data(
        "vilbert", book, _vilbert_data(book, recipe, device), recipe, device
    )


def _uniter_questions(book: BookWorld, recipe: str, device: Any) -> pretrain.QuestionData:
    return pretrain.question_data(
        "uniter", book, _uniter_data(book, recipe, device), recipe, device
    )


def _pretrained_encoder(model: str, book: BookWorld, recipe: str) -> nn.Module:
    """Chapter 5's (6's) pretrained model of ``recipe``; it must have been trained first."""
    pretraining = _pretraining_experiment(model, 0)
    name = pretraining.name
    found = checkpoints.find_checkpoint(name, pretraining.spec(book, recipe))
    if found is None:
        raise FileNotFoundError(
            f"fine-tuning from {name} needs its {recipe} checkpoint, and neither "
            f"{checkpoints.checkpoint_root()} nor {checkpoints.cache_checkpoint_root()} has one "
            f"that matches today's recipe: run `python scripts/train_book.py --recipe {recipe} --only {name}` first"
        )
    encoder, _, _ = checkpoints.load_checkpoint(name, found[1])
    return encoder


def _finetuned_experiment(model: str, start: str, labels: str, seed: int) -> BookExperiment:
    """VQA fine-tuned on ``labels`` from the pretrained model (``start="pretrained"``) or from scratch.

    Every seed fine-tunes the same pretrained model (seed 0's): the seeds draw the
    answer head (and, from scratch, the whole model) and the order of the batches.
    """
    if start not in ("pretrained", "scratch"):
        raise ValueError(f"start must be 'pretrained' or 'scratch', got {start!r}")
    prefix, chapter, data = {
        "vilbert": ("ch05", "05_vilbert", _vilbert_questions),
        "uniter": ("ch06", "06_uniter", _uniter_questions),
    }[model]

    def spec(book: BookWorld, recipe: str) -> dict[str, Any]:
        begin = (
            _pretraining_experiment(model, 0).spec(book, recipe) if start == "pretrained" else None
        )
        return pretrain.vqa_spec(model, book, recipe, labels, begin, seed)

    def train(book, data, recipe, device=None, checkpoint_dir=None, progress=True):
        encoder = _pretrained_encoder(model, book, recipe) if start == "pretrained" else None
        return pretrain.finetune_vqa(
            model,
            book,
            data,
            recipe,
            labels,
            pretrained=encoder,
            seed=seed,
            device=device,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )

    return BookExperiment(
        name=f"{prefix}/{model}_vqa_{labels}_{start}_seed{seed}",
        chapter=chapter,
        headline="relational_accuracy",
        golden=("accuracy", "relational_accuracy", "non_relational_accuracy"),
        data=data,
        spec=spec,
        train=train,
        evaluate=lambda m, data, recipe: pretrain.evaluate_vqa_model(m, data),
    )


VQA_SEEDS = (0, 1, 2)


def _finetuned_experiments(model: str) -> tuple[BookExperiment, ...]:
    # Low labels first: they are what pretraining is for, and the cheaper runs.
    return tuple(
        _finetuned_experiment(model, start, labels, seed)
        for labels in ("low", "all")
        for start in ("pretrained", "scratch")
        for seed in VQA_SEEDS
    )


# Priority order: cheapest first, so that a run stopped by its budget has finished as many as it could.
# On 2 CPU cores the full recipe's relation network (g over all 100 region pairs, 4 x 256) costs more
# than the other five together. Chapter 3's models come first (chapter 7's sweep retrains chapter 3's
# model at other sizes); then chapter 7's sweep, smallest size first, each size's three seeds together;
# then chapters 5 and 6's pretraining, the longest runs, their VQA fine-tuning, which needs them, and
# last the bag-of-words baselines the chapters set beside the pretrained models.
BOOK_EXPERIMENTS: tuple[BookExperiment, ...] = tuple(
    _fusion_experiment(s)
    for s in (
        "question_only",
        "image_only",
        "late_fusion",
        "cross_attention",
        "cross_attention_geometry",
        "relation_network",
    )
) + tuple(_light_experiment(size, seed) for size, seed, _ in light.light_runs())
BOOK_EXPERIMENTS += tuple(_pretraining_experiment(m, 0) for m in pretrain.MODELS)
BOOK_EXPERIMENTS += tuple(e for m in pretrain.MODELS for e in _finetuned_experiments(m))
BOOK_EXPERIMENTS += tuple(_pretraining_experiment(m, 0, word_order=False) for m in pretrain.MODELS)


def experiment(name: str) -> BookExperiment:
    """The experiment behind checkpoint ``name``."""
    for e in BOOK_EXPERIMENTS:
        if e.name == name:
            return e
    raise KeyError(
        f"no book experiment named {name!r}; the book has {[e.name for e in BOOK_EXPERIMENTS]}"
    )


def chapter_recipe(prefix: str, book: BookWorld, mode: str | None = None) -> str:
    """The recipe a chapter shows: the largest whose checkpoints (every name under ``prefix``) all match.

    With ``$FUSIONLIB_TRAIN=always``, or when some are missing, it is the
    profile's own recipe, which :func:`obtain` then trains (or loads from the
    cache). Showing one recipe for all of a chapter's models keeps its
    comparisons fair: same budget, same data, same evaluation.
    """
    mode = mode or checkpoints.train_mode()
    own = checkpoints.profile_recipe()
    names = [e for e in BOOK_EXPERIMENTS if e.name.startswith(prefix.rstrip("/") + "/")]
    if not names:
        raise ValueError(
            f"prefix {prefix!r} names no book experiment; they are {[e.name for e in BOOK_EXPERIMENTS]}"
        )
    if mode == "always":
        return own
    for recipe in reversed(checkpoints.RECIPES):
        if checkpoints.recipe_rank(recipe) < checkpoints.recipe_rank(own):
            break
        if all(
            checkpoints.find_checkpoint(e.name, e.spec(book, recipe)) is not None for e in names
        ):
            return recipe
    return own


def obtain(
    name: str,
    book: BookWorld,
    data: Any,
    recipe: str | None = None,
    device: torch.device | str | None = None,
    mode: str | None = None,
    progress: bool = True,
) -> checkpoints.Obtained:
    """Load or train checkpoint ``name`` with ``recipe`` on ``book`` and ``data``.

    ``recipe`` defaults to the profile's; :func:`chapter_recipe` picks the one a
    chapter should show. See :func:`fusionlib.checkpoints.train_or_load`.
    """
    exp = experiment(name)
    recipe = recipe or checkpoints.profile_recipe()
    device = runtime.device() if device is None else torch.device(device)
    return checkpoints.train_or_load(
        name,
        chapter=exp.chapter,
        specs={recipe: exp.spec(book, recipe)},
        train_recipe=recipe,
        train=lambda: exp.train(book, data, recipe, device=device, progress=progress),
        evaluate=lambda model: exp.evaluate(model, data, recipe),
        headline=exp.headline,
        mode=mode,
        device=device,
    )
