"""Chapters 5 and 6's pretraining: ViLBERT and UNITER on the world's captions and descriptions.

Defined once here and used by the chapters, ``scripts/train_book.py``, the
golden tests and ``scripts/trials/pretraining_grounding.py``:

* :data:`PRETRAIN_RECIPES` -- steps, batch, learning rate and evaluation per recipe size;
* :func:`pretrain_config` -- the book's small ViLBERT (chapter 5) or UNITER (chapter 6),
  with ITM negatives the truth judge calls false and a share of minimal edits (chapter 4);
* :func:`pretrain_data` -- captions and descriptions of every training image, each kind
  in batches of its own (a description is five times longer than a caption, and a mixed
  batch pads every caption to it), plus held-out probes built once;
* :func:`task_mix` and :func:`pretraining_step` -- which loss each step trains, on which texts;
* :func:`grounding_metrics` -- the held-out probes: ITM against false images, the text
  against each of its minimal edits, and masked colour and shape words;
* :func:`train_pretraining` -- the whole run, resumable from a checkpoint directory;
* :func:`question_data`, :func:`finetune_vqa` -- VQA with every label or with the questions
  of a tenth of the images, from the pretrained encoder or from scratch.

A task name is ``"<objective>@<texts>"``: ``"all@captions"`` is a ViLBERT step
(its three losses summed) on a batch of captions, ``"itm@descriptions"`` a
UNITER ITM step on a batch of descriptions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from fusionlib import embeddings, itm, runtime
from fusionlib.checkpoints import fingerprint, recipe_rank
from fusionlib.data import truth
from fusionlib.data.datasets import (
    CaptionDataset,
    QuestionDataset,
    TensorBatches,
    make_tensor_loader,
    retrieval_set,
)
from fusionlib.experiments import uniter as book_uniter
from fusionlib.experiments.world import BookWorld
from fusionlib.layers import masked_mean
from fusionlib.models import uniter, vilbert
from fusionlib.metrics import evaluate_vqa, retrieval_bounds, retrieval_scores
from fusionlib.models.vl_base import pair_scores, pretraining_model
from fusionlib.train import _RESULT_FIELDS, TrainConfig, train

__all__ = [
    "MODELS",
    "PLACE_WORDS",
    "TEXT_KINDS",
    "PretrainRecipe",
    "PRETRAIN_RECIPES",
    "pretrain_config",
    "WordProbe",
    "Probes",
    "PretrainData",
    "pretrain_data",
    "task_mix",
    "task_schedule",
    "grounded_words",
    "grounded_masking",
    "pretraining_step",
    "grounding_metrics",
    "RETRIEVAL_KINDS",
    "retrieval_metrics",
    "colour_attention",
    "referent_occlusion",
    "pretrain_spec",
    "train_pretraining",
    "LABEL_SETTINGS",
    "VQARecipe",
    "VQA_RECIPES",
    "QuestionData",
    "question_data",
    "vqa_model",
    "vqa_spec",
    "finetune_vqa",
    "evaluate_vqa_model",
]

MODELS = ("vilbert", "uniter")
TEXT_KINDS = ("captions", "descriptions")
MAX_TEXT_LEN = 80  # descriptions run to about 60 tokens, their minimal edits a few more
# The words of the captions that name a place: a relation ("left of", "above") or a quadrant
# ("top left"). Predicting one masked needs the geometry of the regions the caption names.
PLACE_WORDS = ("left", "right", "top", "bottom", "above", "below")


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """How long and how big one pretraining run is (the same for both models, so they compare)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    probe_images: int  # held-out images (of val, and of test) whose texts the probes read
    edits_per_text: int  # minimal edits kept per text (CaptionDataset(edits=...))
    hard_share: float  # of the ITM negatives, the share that are minimal edits of the text
    mlm_first_steps: int = 0  # steps of MLM alone before the full mix (task_schedule)
    grounded_probability: float | None = None  # MLM's chance for grounded_words (None: 15% for all)


# Every recipe starts with masked words alone (mlm_first_steps) and masks the grounded words at 50%
# (grounded_probability). On the small recipe, seed 0, without them UNITER's task-sampled mix stayed
# on the ITM plateau for 3,000 steps; with them both models grounded colour words within about 600
# steps of ITM starting, and ViLBERT read place words (0.90) from the regions' geometry
# (results/trials/pretraining_grounding.jsonl; chapters 5 and 6).
PRETRAIN_RECIPES = {
    "smoke": PretrainRecipe(
        steps=40,
        batch_size=32,
        lr=1e-3,
        warmup_steps=5,
        eval_every=20,
        probe_images=20,
        edits_per_text=2,
        hard_share=0.5,
        mlm_first_steps=10,
        grounded_probability=0.5,
    ),
    "small": PretrainRecipe(
        steps=3000,
        batch_size=128,
        lr=1e-3,
        warmup_steps=300,
        eval_every=300,
        probe_images=200,
        edits_per_text=4,
        hard_share=0.5,
        mlm_first_steps=1500,
        grounded_probability=0.5,
    ),
    "full": PretrainRecipe(
        steps=6000,
        batch_size=256,
        lr=1e-3,
        warmup_steps=600,
        eval_every=500,
        probe_images=200,
        edits_per_text=4,
        hard_share=0.5,
        mlm_first_steps=1500,
        grounded_probability=0.5,
    ),
}


def grounded_words(book: BookWorld) -> tuple[str, ...]:
    """The words only the image decides: the world's colours and shapes, and :data:`PLACE_WORDS`."""
    return (*book.world.colors, *book.world.shapes, *PLACE_WORDS)


def grounded_masking(book: BookWorld, probability: float) -> dict[str, Any]:
    """The model config fields that make MLM choose :func:`grounded_words` at ``probability``."""
    ids = book.tokenizer.convert_tokens_to_ids(list(grounded_words(book)))
    return {"grounded_word_ids": tuple(ids), "grounded_word_probability": probability}


def _check_model(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def pretrain_config(
    name: str, book: BookWorld, recipe: str, **changes: Any
) -> vilbert.ViLBERTConfig | uniter.UniterConfig:
    """The book's ViLBERT (``"vilbert"``, chapter 5) or UNITER (``"uniter"``, chapter 6) for ``book``.

    Both are 128 wide, with no dropout (the world is small and the models are
    limited by training time, not by overfitting) and weights drawn with std
    0.05 (chapter 6, section 6.4: at BERT's 0.02 a model this narrow sits on
    the ITM plateau). ITM negatives are texts the truth judge calls false of
    the image, and ``hard_share`` of them minimal edits of the image's own
    text (chapter 4). With the recipe's ``grounded_probability``, MLM
    chooses :func:`grounded_words` at that chance and every other word at 15%
    (Bitton et al., 2021; :func:`fusionlib.masking.mask_tokens`). ``changes``
    override any field.
    """
    _check_model(name)
    r = PRETRAIN_RECIPES[_recipe(recipe)]
    common = dict(
        dropout=0.0,
        initializer_range=0.05,
        vqa_pooling="mean",
        itm_negatives="false",
        hard_negative_share=r.hard_share,
        max_text_len=MAX_TEXT_LEN,
    )
    if r.grounded_probability is not None:
        common.update(grounded_masking(book, r.grounded_probability))
    classes = len(book.features["train"].class_names)
    if name == "vilbert":
        fields = dict(
            common,
            region_dim=book.region_dim,
            # [IMG]'s box goes through the same location embedding as the regions': at their origin
            # once the locations are standardised (chapter 5, section 5.1).
            img_location=vilbert.STANDARDISED_IMG_LOCATION,
            **changes,
        )
        return vilbert.ViLBERTConfig.co_attention_first(len(book.tokenizer), classes, **fields)
    fields = dict(
        common,
        region_dim=book.region_dim,
        itm_negative_probability=0.5,
        mrc_background_class=classes - 1,
        **changes,
    )
    return book_uniter.uniter_config(len(book.tokenizer), classes, **fields)


def _recipe(recipe: str) -> str:
    recipe_rank(recipe)  # a clear error for an unknown recipe
    return recipe


def task_mix(name: str, **changes: float) -> dict[str, float]:
    """``{task: weight}`` for :func:`fusionlib.train.train`: each step samples one task.

    ViLBERT sums its three losses on every batch (``"all"``); UNITER samples
    one task per batch with the paper's weights (MLM 2, ITM 2, MRFR 1,
    MRC-kl 1). Captions and descriptions are sampled 5 : 1, as they are in
    the data (five captions and one description per image). ``changes`` set
    a task's weight (0 drops it).
    """
    _check_model(name)
    objectives = {"all": 1.0} if name == "vilbert" else dict(uniter.UNITER_TASK_MIX)
    mix = {
        f"{objective}@{texts}": weight * share
        for objective, weight in objectives.items()
        for texts, share in (("captions", 5.0), ("descriptions", 1.0))
    }
    for task, weight in changes.items():
        if task not in mix:
            raise ValueError(f"no task {task!r} to reweight; the mix has {sorted(mix)}")
        mix[task] = float(weight)
    mix = {task: weight for task, weight in mix.items() if weight > 0}
    if not mix:
        raise ValueError("the task mix must keep at least one task with a positive weight")
    return mix


_Schedule = Mapping[str, float] | list[tuple[int, dict[str, float]]]


def task_schedule(
    name: str,
    recipe: str,
    mix: Mapping[str, float] | None = None,
    mlm_first_steps: int | None = None,
) -> dict[str, float] | list[tuple[int, dict[str, float]]]:
    """What each step may train: MLM alone for the recipe's ``mlm_first_steps``, then ``mix``.

    Masked words are the only task that asks a model to read the regions'
    geometry word by word; ITM and masked regions summed with it from the
    first step slow that down (chapter 5 measures it). With
    ``mlm_first_steps=0`` this is ``mix`` itself (default :func:`task_mix`);
    otherwise a schedule for :func:`fusionlib.train.train`:
    ``[(1, {MLM on captions and descriptions, 5 : 1}), (mlm_first_steps + 1, mix)]``.
    ``mlm_first_steps`` overrides the recipe's.
    """
    _check_model(name)
    mix = dict(mix) if mix is not None else task_mix(name)
    first = PRETRAIN_RECIPES[_recipe(recipe)].mlm_first_steps
    if mlm_first_steps is not None:
        if (
            isinstance(mlm_first_steps, bool)
            or not isinstance(mlm_first_steps, int)
            or mlm_first_steps < 0
        ):
            raise ValueError(f"mlm_first_steps must be an int >= 0, got {mlm_first_steps!r}")
        first = mlm_first_steps
    if not first:
        return mix
    mlm = {"mlm@captions": 5.0, "mlm@descriptions": 1.0}
    return [(1, mlm), (first + 1, mix)]


def _schedule_tasks(schedule: _Schedule) -> list[str]:
    """Every task a schedule names, the last phase's first (their loaders' seeds stay put)."""
    phases = [schedule] if isinstance(schedule, Mapping) else [m for _, m in schedule][::-1]
    return list(dict.fromkeys(t for mix in phases for t in mix))


def pretraining_step(model: nn.Module, batch: dict[str, Tensor], task: str) -> dict[str, Tensor]:
    """One step of ``task`` (``"<objective>@<texts>"``): ViLBERT's or UNITER's own pretraining step."""
    objective, _, _ = task.partition("@")
    scorer = getattr(model, "_orig_mod", model)
    if isinstance(scorer, vilbert.ViLBERTForPretraining):
        return vilbert.pretraining_step(model, batch, objective)
    if isinstance(scorer, uniter.UniterForPretraining):
        return uniter.pretraining_step(model, batch, objective)
    raise TypeError(
        f"model must be a ViLBERTForPretraining or UniterForPretraining, got {type(scorer).__name__}"
    )


# ---------------------------------------------------------------------------
# Data and probes
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class WordProbe:
    """Every colour (or shape) word of the probe texts, to be masked one at a time.

    ``batch`` holds one row per occurrence: the text with that one word
    masked and its image. ``target (N,)`` the word's id; ``true_ids (N, W)``
    bool over :attr:`word_ids`, which words make the text true of the image
    (the truth judge), so a prediction can be scored exactly and by truth.
    """

    word_ids: Tensor  # (W,) token ids of the world's colours (or shapes)
    batch: dict[str, Tensor]
    position: Tensor  # (N,) where the masked word is
    target: Tensor  # (N,) its token id
    true_ids: Tensor  # (N, W) bool


@dataclasses.dataclass
class Probes:
    """The held-out probes of one split: its first ``probe_images`` images' texts, read by :func:`grounding_metrics`."""

    texts: dict[str, TensorBatches]  # "captions" / "descriptions", with their minimal edits
    itm: dict[str, dict[str, Tensor]]  # text kind -> (own + false image) pairs and "labels"
    words: dict[str, WordProbe]  # "colour" / "shape" / "place"


@dataclasses.dataclass
class PretrainData:
    """Training batches per text kind and held-out probes, on one device, standardised alike."""

    train: dict[str, TensorBatches]  # "captions" / "descriptions"
    probes: dict[str, Probes]  # "val" (curves during training) / "test" (the checkpoint's record)
    statistics: dict[str, tuple[Tensor, Tensor]]
    location_scale: float


def _model_keys(name: str) -> tuple[str, ...]:
    regions = ("region_feats", "region_mask", "image_index", "region_soft_labels")
    if name == "vilbert":
        return ("input_ids", *regions, "region_loc5", "image_feats", "caption_index")
    return ("input_ids", *regions, "region_loc7", "caption_index")


def _location_scale(name: str, book: BookWorld, recipe: str) -> tuple[str, float]:
    """The location key a model reads and the spread it is standardised to (chapter 5, section 5.1).

    ViLBERT's region embedding adds a projection of 64 features to one of 5
    box numbers: at initialisation the features move it far more, so the
    locations are scaled up by the ratio (measured on a fresh model). UNITER
    puts a LayerNorm on each part before adding them, so plain z-scores do.
    """
    if name == "uniter":
        return "region_loc7", 1.0
    config = pretrain_config(name, book, recipe)
    scale = embeddings.location_scale(
        lambda: vilbert.ViLBERTForPretraining(config).vilbert.region_embeddings
    )[2]
    return "region_loc5", scale


def _itm_probe(
    data: TensorBatches, texts: list[str], scenes: list, features: Any, seed: int
) -> dict[str, Tensor]:
    """Each probe text with its own image (label 1) and with one probe image it is false of (label 0).

    The false image is drawn once, with ``seed``, among ``scenes`` (the probe
    images) by the truth judge, so every evaluation scores the same pairs.
    """
    n = len(data)
    own = data.__getitems__(list(range(n)))
    judged = truth.truth_matrix(texts, scenes)  # (texts, probe images)
    generator = torch.Generator().manual_seed(seed)
    false_rows = []
    for i in range(n):
        candidates = torch.nonzero(~judged[i]).squeeze(1)
        if len(candidates) == 0:
            raise ValueError(f"probe text {texts[i]!r} is true of every probe image")
        pick = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
        false_rows.append(features.row(scenes[pick].index))
    where = torch.tensor(false_rows, device=data.row.device)
    swapped = dict(own)
    for key, value in data.per_image.items():
        swapped[key] = value[where]
    probe = {k: torch.cat([own[k], swapped[k]]) for k in own}
    probe["labels"] = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
    return probe


def _word_probe(
    data: TensorBatches, scenes: list, texts: list[str], words: list[str], tokenizer: Any
) -> WordProbe:
    ids = tokenizer.convert_tokens_to_ids(words)
    word_ids = torch.tensor(ids)
    batch = data.__getitems__(list(range(len(data))))
    input_ids = batch["input_ids"].cpu()
    rows, positions = torch.nonzero(
        torch.isin(input_ids, word_ids) & batch["attention_mask"].cpu(), as_tuple=True
    )
    true_ids = torch.zeros(len(rows), len(words), dtype=torch.bool)
    for n, (r, p) in enumerate(zip(rows.tolist(), positions.tolist())):
        for w, word_id in enumerate(ids):
            filled = input_ids[r].clone()
            filled[p] = word_id
            text = tokenizer.decode(filled, skip_special_tokens=True)
            try:
                true_ids[n, w] = truth.is_true(text, scenes[r])
            except ValueError:  # "one circle and five circles": not a sentence, so not true
                true_ids[n, w] = False
    device = batch["input_ids"].device
    probe = {k: v[rows.to(device)] for k, v in batch.items()}
    probe["input_ids"] = probe["input_ids"].clone()
    probe["input_ids"][torch.arange(len(rows), device=device), positions.to(device)] = (
        tokenizer.mask_token_id
    )
    return WordProbe(word_ids, probe, positions, input_ids[rows, positions], true_ids)


def _probes(
    book: BookWorld,
    split: str,
    recipe: PretrainRecipe,
    keys: tuple[str, ...],
    device: torch.device,
    statistics: dict[str, tuple[Tensor, Tensor]],
) -> Probes:
    scenes = book.scenes[split][: recipe.probe_images]
    by_index = {s.index: s for s in scenes}
    texts, itm_pairs, words = {}, {}, {}
    owners, strings = {}, {}
    for k, kind in enumerate(TEXT_KINDS):
        held = CaptionDataset(
            scenes,
            book.features[split],
            book.tokenizer,
            max_length=MAX_TEXT_LEN,
            text=kind,
            judge=True,
            edits=recipe.edits_per_text,
        )
        texts[kind] = TensorBatches(held, device=device, keys=keys)
        texts[kind].standardise(statistics)
        owners[kind] = [by_index[int(i)] for i in held.image_index]
        strings[kind] = [
            s.description if c < 0 else s.captions[c]
            for s, c in zip(owners[kind], held.caption_index.tolist())
        ]
        itm_pairs[kind] = _itm_probe(
            texts[kind], strings[kind], scenes, book.features[split], seed=k
        )
    for word, vocabulary in (
        ("colour", book.world.colors),
        ("shape", book.world.shapes),
        ("place", PLACE_WORDS),
    ):
        words[word] = _word_probe(
            texts["captions"],
            owners["captions"],
            strings["captions"],
            list(vocabulary),
            book.tokenizer,
        )
    return Probes(texts, itm_pairs, words)


def pretrain_data(
    name: str, book: BookWorld, recipe: str, device: torch.device | str | None = None
) -> PretrainData:
    """Captions and descriptions of the training images, and the held-out probes, for model ``name``.

    Every text carries the truth judge's facts (ITM draws false negatives)
    and up to ``edits_per_text`` minimal edits (the hard negatives). Region
    features and locations are z-scored with the training images' statistics
    (:func:`_location_scale`). The probes read the texts of the first
    ``probe_images`` images of the validation split (curves during training)
    and of the test split (what a checkpoint records).
    """
    _check_model(name)
    r = PRETRAIN_RECIPES[_recipe(recipe)]
    device = runtime.device() if device is None else torch.device(device)
    keys = _model_keys(name) + ("text_facts", "image_objects", "edit_input_ids", "edit_kinds")
    train_sets = {
        kind: TensorBatches(
            CaptionDataset(
                book.scenes["train"],
                book.features["train"],
                book.tokenizer,
                max_length=MAX_TEXT_LEN,
                text=kind,
                judge=True,
                edits=r.edits_per_text,
            ),
            device=device,
            keys=keys,
        )
        for kind in TEXT_KINDS
    }
    location_key, scale = _location_scale(name, book, recipe)
    statistics = train_sets["captions"].standardise(scale={location_key: scale})
    train_sets["descriptions"].standardise(statistics)
    probes = {split: _probes(book, split, r, keys, device, statistics) for split in ("val", "test")}
    return PretrainData(train_sets, probes, statistics, scale)


# ---------------------------------------------------------------------------
# What the probes measure
# ---------------------------------------------------------------------------


def _itm_log_odds(scorer: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = scorer.itm_logits(_trim(batch))  # (b, 2)
    return logits[:, 1] - logits[:, 0]


def _trim(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns every row of ``batch`` has (probes gather rows of differing lengths)."""
    longest = int(batch["attention_mask"].sum(dim=1).max())
    return dict(
        batch,
        input_ids=batch["input_ids"][:, :longest],
        attention_mask=batch["attention_mask"][:, :longest],
    )


@torch.no_grad()
def grounding_metrics(
    model: nn.Module, data: PretrainData, split: str = "val", prefix: str | None = None
) -> dict[str, float]:
    """The held-out probes of ``split`` for a pretraining model (chapters 5 and 6).

    Every key starts with ``prefix`` (default ``"<split>_"``):

    * ``itm_<texts>``: ITM accuracy (the head's argmax) on the probe texts paired
      with their own image and with an image they are false of (chance 0.5);
    * ``edit_<kind>``: how often the ITM score of a text beats that of its
      minimal edit of that kind on the same image (chance 0.5), and ``edit_all``;
    * ``<colour|shape|place>_word``: MLM accuracy with one colour (shape, or
      place: :data:`PLACE_WORDS`) word of a caption masked, the rest intact;
      ``<...>_word_true``: the share whose predicted word makes the caption
      true of the image (the truth judge: a relation may hold for more than
      one colour), and ``<...>_word_unique``: the share of masked words that
      only the original word makes true (what exact accuracy can reach at
      most, near). A place word can be read only from the regions' geometry.
    """
    if split not in data.probes:
        raise ValueError(f"split must be one of {sorted(data.probes)}, got {split!r}")
    probes = data.probes[split]
    prefix = f"{split}_" if prefix is None else prefix
    scorer = pretraining_model(model, "the probes read its ITM and MLM heads")
    device = next(scorer.parameters()).device
    was_training = scorer.training
    scorer.eval()
    out: dict[str, float] = {}
    try:
        for kind, probe in probes.itm.items():
            batch = {k: v.to(device) for k, v in probe.items() if k != "labels"}
            # The head's argmax says "match" where logit 1 beats logit 0 (a tie picks 0, "no match").
            log_odds = itm.score_pairs(lambda b: _itm_log_odds(scorer, b), batch)
            out[f"{prefix}itm_{kind}"] = float(
                ((log_odds > 0).long() == probe["labels"]).float().mean()
            )
        scores, edited, owners, kinds, offset = [], [], [], [], 0
        for batches in probes.texts.values():
            pairs = itm.edit_pairs(
                batches.__getitems__(list(range(len(batches)))), batches.pad_token_id
            )
            scores.append(
                itm.score_pairs(lambda b: scorer.retrieval_score(_trim(b)), pairs.matched)
            )
            edited.append(itm.score_pairs(lambda b: scorer.retrieval_score(_trim(b)), pairs.edited))
            owners.append(pairs.owner + offset)
            kinds.append(pairs.kind)
            offset += len(scores[-1])
        # Captions and descriptions as one set of (text, edit) pairs, scored by chapter 4's rule.
        both = itm.EditPairs({}, {}, torch.cat(owners), torch.cat(kinds))
        won = itm.edit_accuracy(torch.cat(scores), torch.cat(edited), both)
        out.update({f"{prefix}edit_{k}": v for k, v in won.items() if not k.startswith("n_")})
        for word, probe in probes.words.items():
            batch = {k: v.to(device) for k, v in probe.batch.items()}
            rows = torch.arange(len(probe.target))
            chunks = []
            for i in range(0, len(rows), 512):
                chunk = _trim({k: v[i : i + 512] for k, v in batch.items()})
                mlm = scorer(chunk, "mlm").mlm_logits.float().cpu()  # (b, T, vocab)
                chunks.append(mlm[torch.arange(len(mlm)), probe.position[i : i + 512]])
            logits = torch.cat(chunks)  # (N, vocab): at each masked word
            among = logits[:, probe.word_ids].argmax(-1)  # the best of the world's words
            predicted = logits.argmax(-1)
            out[f"{prefix}{word}_word"] = float((predicted == probe.target).float().mean())
            right_word = probe.word_ids[among] == predicted
            out[f"{prefix}{word}_word_true"] = float(
                (probe.true_ids[rows, among] & right_word).float().mean()
            )
            out[f"{prefix}{word}_word_unique"] = float((probe.true_ids.sum(-1) == 1).float().mean())
    finally:
        scorer.train(was_training)
    return out


RETRIEVAL_KINDS = {"identification": "descriptions", "captions": "captions"}


def retrieval_metrics(
    model: nn.Module,
    book: BookWorld,
    data: PretrainData,
    split: str = "test",
    batch_size: int = 1000,
) -> dict[str, dict[str, dict[str, float]]]:
    """Both kinds of retrieval over every image of ``split``, with their chance and ceiling (chapters 5, 6).

    ``"identification"``: each image's one description against every image;
    a description singles its image out, so exact-match recall can reach 1.
    ``"captions"``: every short caption against every image; a caption is
    true of many images, so read the truth-aware keys (``truth_t2i_R@1``:
    the top image makes the caption true). Every (image, text) pair is scored
    by the model's ITM head (:func:`fusionlib.models.vl_base.pair_scores`).
    Returns ``{kind: {"model" | "chance" | "ceiling": retrieval_scores keys}}``.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    scorer = pretraining_model(model, "retrieval ranks pairs by its ITM head")
    out = {}
    for kind, text in RETRIEVAL_KINDS.items():
        found = retrieval_set(
            book.scenes[split], book.features[split], book.tokenizer, data.statistics, text=text
        )
        scores = pair_scores(scorer, found.images, found.captions, batch_size=batch_size)
        out[kind] = {
            "model": retrieval_scores(scores, found.caption_image, found.truth),
            **retrieval_bounds(found.truth, found.caption_image),
        }
    return out


def _colour_ids(book: BookWorld) -> Tensor:
    """``(colours,)``: the token ids of the world's colour words, in ``book.world.colors`` order."""
    return torch.tensor(book.tokenizer.convert_tokens_to_ids(list(book.world.colors)))


def _region_colours(book: BookWorld, split: str, batch: Mapping[str, Tensor]) -> Tensor:
    """``(B, R)``: the colour index of each region's most likely detector class, -1 for background."""
    colours = list(book.world.colors)
    names = list(book.features[split].class_names)
    of_class = torch.tensor(
        [colours.index(n.split()[0]) if n.split()[0] in colours else -1 for n in names]
    )
    return of_class[batch["region_soft_labels"].argmax(-1).cpu()]


def _probe_captions(
    scorer: nn.Module, data: PretrainData, split: str, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """The probe captions of ``split`` in trimmed batches on ``scorer``'s device, with it in eval mode."""
    if split not in data.probes:
        raise ValueError(f"split must be one of {sorted(data.probes)}, got {split!r}")
    device = next(scorer.parameters()).device
    texts = data.probes[split].texts["captions"]
    was_training = scorer.training
    scorer.eval()
    try:
        for start in range(0, len(texts), batch_size):
            rows = list(range(start, min(start + batch_size, len(texts))))
            yield {k: v.to(device) for k, v in _trim(texts.__getitems__(rows)).items()}
    finally:
        scorer.train(was_training)


@torch.no_grad()
def colour_attention(
    model: nn.Module,
    book: BookWorld,
    data: PretrainData,
    split: str = "test",
    batch_size: int = 500,
) -> list[dict[str, float]]:
    """Do colour words look at regions of their colour? One row per fusion layer (chapters 5, 6).

    For every colour word of the probe captions of ``split`` (true of their
    image), the attention the word gives the regions (heads averaged,
    :meth:`~fusionlib.models.vl_base.VisionLanguagePretraining.word_region_attention`)
    is renormalised over the image's real regions; ``share`` is the part of it
    on regions the detector calls that colour, ``uniform`` what a word spreading
    its attention evenly would put there. ``share`` well above ``uniform``: the
    word has found its object. Words whose colour no region has (a detector
    miss) are left out and counted in ``missing``.
    """
    scorer = pretraining_model(model, "its attention maps are read")
    colour_ids = _colour_ids(book)
    sums: list[dict[str, float]] = []
    for batch in _probe_captions(scorer, data, split, batch_size):
        ids = batch["input_ids"].cpu()
        is_colour = torch.isin(ids, colour_ids) & batch["attention_mask"].cpu()  # (B, T)
        word_colour = (
            (ids[..., None] == colour_ids).float().argmax(-1)
        )  # (B, T), valid where is_colour
        region_colour = _region_colours(book, split, batch)  # (B, R), -1 background
        real = batch["region_mask"].cpu()[:, None, :]  # (B, 1, R)
        same = (region_colour[:, None, :] == word_colour[..., None]) & real  # (B, T, R)
        found = is_colour & same.any(-1)
        uniform = same.sum(-1) / real.sum(-1).clamp(min=1)  # (B, T)
        for layer, attention in enumerate(scorer.word_region_attention(batch)):
            w = attention.float().mean(1).cpu()  # (B, T, R), heads averaged
            on_image = (w * real).sum(-1).clamp(min=1e-12)
            share = (w * same).sum(-1) / on_image
            if len(sums) <= layer:
                sums.append({"share": 0.0, "uniform": 0.0, "n": 0, "missing": 0})
            sums[layer]["share"] += float(share[found].sum())
            sums[layer]["uniform"] += float(uniform[found].sum())
            sums[layer]["n"] += int(found.sum())
            sums[layer]["missing"] += int((is_colour & ~found).sum())
    return [
        {
            "share": row["share"] / max(row["n"], 1),
            "uniform": row["uniform"] / max(row["n"], 1),
            "n": row["n"],
            "missing": row["missing"],
        }
        for row in sums
    ]


@torch.no_grad()
def referent_occlusion(
    model: nn.Module,
    book: BookWorld,
    data: PretrainData,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 500,
) -> dict[str, Any]:
    """Hide the regions a caption names, or as many others: does the match fall? (chapters 5, 6).

    For every probe caption of ``split`` (each true of its image) that names a
    colour some region has, the ITM head scores three versions of its image:
    ``"whole"``; ``"referents_hidden"``, without the regions the detector
    calls a colour the caption names; and ``"others_hidden"``, without as
    many other real regions, drawn at random with ``seed``. A hidden region
    leaves ``region_mask``; ViLBERT's ``[IMG]`` feature is the mean of the
    visible regions in all three (as its pretraining computes it after
    masking), so nothing of a hidden region leaks. Each version gets the mean
    ITM log-odds and the share judged a match. A model that grounds its
    decision in the named objects loses the match when they go, and keeps it
    when as many others go. Captions with fewer other regions than named
    ones are left out (``skipped``).
    """
    scorer = pretraining_model(model, "the ITM head scores the occluded images")
    colour_ids = _colour_ids(book)
    generator = torch.Generator().manual_seed(seed)
    sums = {
        v: {"log_odds": 0.0, "match": 0.0} for v in ("whole", "referents_hidden", "others_hidden")
    }
    n = skipped = hidden = 0
    for batch in _probe_captions(scorer, data, split, batch_size):
        ids, real = batch["input_ids"].cpu(), batch["region_mask"].cpu()
        named = (ids[..., None] == colour_ids).any(1)  # (B, colours) the caption names
        region_colour = _region_colours(book, split, batch)  # (B, R)
        referent = real & (region_colour >= 0) & named.gather(1, region_colour.clamp(min=0))
        k = referent.sum(1)
        others = real & ~referent
        keep = (k > 0) & (others.sum(1) >= k)
        skipped += int(((k > 0) & ~keep).sum())
        if not keep.any():
            continue
        # k of the other real regions per row, uniformly: the k best of random scores.
        noise = torch.rand(real.shape, generator=generator).masked_fill(~others, -1.0)
        rank = noise.argsort(1, descending=True).argsort(1)
        drawn = others & (rank < k[:, None])
        rows = keep.nonzero().squeeze(1)
        for version, hide in (
            ("whole", torch.zeros_like(real)),
            ("referents_hidden", referent),
            ("others_hidden", drawn),
        ):
            occluded = {key: v[rows.to(v.device)] for key, v in batch.items()}
            visible = (real & ~hide)[rows].to(occluded["region_mask"].device)
            occluded["region_mask"] = visible
            if "image_feats" in occluded:
                occluded["image_feats"] = masked_mean(occluded["region_feats"], visible)
            log_odds = _itm_log_odds(scorer, occluded).float().cpu()
            sums[version]["log_odds"] += float(log_odds.sum())
            sums[version]["match"] += float((log_odds > 0).float().sum())
        n += len(rows)
        hidden += int(k[rows].sum())
    out: dict[str, Any] = {
        version: {key: value / max(n, 1) for key, value in row.items()}
        for version, row in sums.items()
    }
    out.update(n=n, skipped=skipped, regions_hidden=hidden / max(n, 1))
    return out


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _train_config(recipe: str, seed: int, **changes: Any) -> TrainConfig:
    r = PRETRAIN_RECIPES[_recipe(recipe)]
    fields = dict(
        steps=r.steps,
        lr=r.lr,
        warmup_steps=r.warmup_steps,
        eval_every=r.eval_every,
        log_every=25,
        seed=seed,
        amp=False,  # fp32 (with TF32 matmuls on a GPU): at this size bf16's casts cost more than they save
    )
    fields.update(changes)
    return TrainConfig(**fields)


def pretrain_spec(
    name: str,
    book: BookWorld,
    recipe: str,
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    model_changes: Mapping[str, Any] | None = None,
    train_changes: Mapping[str, Any] | None = None,
    mlm_first_steps: int | None = None,
) -> dict[str, Any]:
    """Everything a pretrained model depends on: its fingerprint's input (:mod:`fusionlib.checkpoints`).

    ``mix`` is the full mix (default :func:`task_mix`); the spec records the
    schedule of :func:`task_schedule`.
    """
    config = pretrain_config(name, book, recipe, **dict(model_changes or {}))
    train_config = _train_config(recipe, seed, **dict(train_changes or {}))
    r = PRETRAIN_RECIPES[recipe]
    return {
        "model": f"{name}_pretraining",
        "model_config": config.to_dict(),
        "data": book.data_spec(),
        "train": {k: train_config.to_dict()[k] for k in _RESULT_FIELDS + ("eval_every",)},
        "batch_size": r.batch_size,
        "task_mix": task_schedule(name, recipe, mix, mlm_first_steps),
        "texts": {"kinds": list(TEXT_KINDS), "edits_per_text": r.edits_per_text},
        "standardise": "train z-score; ViLBERT's region_loc5 x its location scale",
        "step": "experiments.pretrain.pretraining_step",
    }


def train_pretraining(
    name: str,
    book: BookWorld,
    data: PretrainData,
    recipe: str,
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    model_changes: Mapping[str, Any] | None = None,
    train_changes: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    mlm_first_steps: int | None = None,
) -> tuple[nn.Module, dict[str, Any], float]:
    """Pretrain ViLBERT or UNITER from scratch; ``(model, history dict, wall seconds)``.

    The model is built right after ``torch.manual_seed(seed)``. Each task of
    the schedule has its own loader over its kind of text (:func:`task_mix`,
    :func:`task_schedule`; ``mix`` is the full mix); the
    probes of :func:`grounding_metrics` run every ``eval_every`` steps. With
    ``checkpoint_dir`` the run saves as it goes and resumes from there.
    """
    _check_model(name)
    r = PRETRAIN_RECIPES[_recipe(recipe)]
    device = runtime.device() if device is None else torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = pretrain_config(name, book, recipe, **dict(model_changes or {}))
    train_config = _train_config(
        recipe, seed, checkpoint_dir=checkpoint_dir, **dict(train_changes or {})
    )
    schedule = task_schedule(name, recipe, mix, mlm_first_steps)
    torch.manual_seed(seed)
    model = (
        vilbert.ViLBERTForPretraining(config)
        if name == "vilbert"
        else uniter.UniterForPretraining(config)
    )
    loaders = {
        task: make_tensor_loader(
            data.train[task.partition("@")[2]], r.batch_size, seed=seed + k, drop_last=True
        )
        for k, task in enumerate(_schedule_tasks(schedule))
    }
    history = train(
        model,
        loaders,
        train_config,
        pretraining_step,
        eval_fn=lambda m: grounding_metrics(m, data),
        task_mix=schedule,
        device=device,
        progress=progress,
        resume=checkpoint_dir is not None,
    )
    return model.eval(), history.to_dict(), history.seconds


# ---------------------------------------------------------------------------
# Downstream: VQA from a pretrained encoder or from scratch
# ---------------------------------------------------------------------------

LABEL_SETTINGS = (
    "all",
    "low",
)  # every training question, or those of the first tenth of the images
LOW_LABEL_SHARE = 0.1


@dataclasses.dataclass(frozen=True)
class VQARecipe:
    """Fine-tuning length per label setting; the same for a pretrained and a fresh encoder."""

    steps: dict[str, int]  # label setting -> steps
    batch_size: int
    lr: float
    eval_every: int
    val_images: int  # validation curves on the first val images (cheaper on a CPU)


VQA_RECIPES = {
    "smoke": VQARecipe(
        steps={"all": 20, "low": 20}, batch_size=32, lr=1e-3, eval_every=10, val_images=20
    ),
    "small": VQARecipe(
        steps={"all": 1000, "low": 400}, batch_size=128, lr=1e-3, eval_every=250, val_images=100
    ),
    # Batch 512, as every earlier full run of chapters 5 and 6 fine-tuned: with every label ViLBERT is
    # limited by the questions it sees, not by its settings. At batch 256 its relational accuracy
    # stopped at 0.790, at 512 it reached 0.900 and was still rising (seed 0,
    # results/trials/vqa_finetune.jsonl); a smaller batch would also starve the from-scratch runs.
    "full": VQARecipe(
        steps={"all": 3000, "low": 600}, batch_size=512, lr=1e-3, eval_every=500, val_images=200
    ),
}


@dataclasses.dataclass
class QuestionData:
    """The world's questions for a model, standardised with its pretraining data's statistics."""

    train: dict[str, TensorBatches]  # label setting -> training questions
    val: TensorBatches
    test: TensorBatches


def question_data(
    name: str,
    book: BookWorld,
    data: PretrainData,
    recipe: str,
    device: torch.device | str | None = None,
) -> QuestionData:
    """VQA questions for model ``name``, z-scored exactly as its pretraining captions (``data.statistics``).

    ``"low"`` keeps the questions of the first tenth of the training images:
    fewer images, not fewer questions per image, as when labels are scarce.
    """
    _check_model(name)
    r = VQA_RECIPES[_recipe(recipe)]
    device = runtime.device() if device is None else torch.device(device)
    location = "region_loc5" if name == "vilbert" else "region_loc7"
    keys = ("input_ids", "region_feats", "region_mask", location, "answer", "family", "relational")
    keys += ("image_feats",) if name == "vilbert" else ()
    train_scenes = book.scenes["train"]
    low = train_scenes[: max(1, round(LOW_LABEL_SHARE * len(train_scenes)))]

    def batches(scenes: list, split: str) -> TensorBatches:
        questions = QuestionDataset(scenes, book.features[split], book.tokenizer, book.answers)
        out = TensorBatches(questions, device=device, keys=keys)
        out.standardise({k: v for k, v in data.statistics.items() if k in keys})
        return out

    return QuestionData(
        train={"all": batches(train_scenes, "train"), "low": batches(low, "train")},
        val=batches(book.scenes["val"][: r.val_images], "val"),
        test=batches(book.scenes["test"], "test"),
    )


def vqa_model(
    name: str, book: BookWorld, recipe: str, pretrained: nn.Module | None = None
) -> nn.Module:
    """A VQA model of the book: the pretrained encoder with a fresh answer head, or all fresh (``None``).

    Both read the mean of the words' outputs (``vqa_pooling="mean"``,
    chapter 5, section 5.8), so a fresh model and a pretrained one differ in
    their starting weights only.
    """
    _check_model(name)
    answers = len(book.answers)
    task = vilbert.ViLBERTForVQA if name == "vilbert" else uniter.UniterForVQA
    if pretrained is not None:
        return task.from_encoder(pretrained, num_answers=answers)
    return task(pretrain_config(name, book, recipe, num_answers=answers))


def vqa_spec(
    name: str, book: BookWorld, recipe: str, labels: str, start: Mapping[str, Any] | None, seed: int
) -> dict[str, Any]:
    """What a fine-tuned VQA model depends on; ``start`` is the pretrained checkpoint's spec (None: scratch)."""
    if labels not in LABEL_SETTINGS:
        raise ValueError(f"labels must be one of {LABEL_SETTINGS}, got {labels!r}")
    r = VQA_RECIPES[_recipe(recipe)]
    return {
        "model": f"{name}_vqa",
        "model_config": pretrain_config(
            name, book, recipe, num_answers=len(book.answers)
        ).to_dict(),
        "data": book.data_spec(),
        "labels": labels,
        "low_label_share": LOW_LABEL_SHARE if labels == "low" else 1.0,
        "train": {
            "steps": r.steps[labels],
            "batch_size": r.batch_size,
            "lr": r.lr,
            "seed": seed,
            "optimizer": "AdamW (0.9, 0.98), 10% warm-up, cosine, clip 5",
        },
        "batch_size": r.batch_size,
        "start": "scratch" if start is None else fingerprint(dict(start)),
    }


def finetune_vqa(
    name: str,
    book: BookWorld,
    questions: QuestionData,
    recipe: str,
    labels: str,
    pretrained: nn.Module | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], float]:
    """Fine-tune a VQA model on ``labels`` (``"all"`` or ``"low"``); ``(model, history dict, seconds)``.

    UNITER's fine-tuning settings for both models: AdamW with betas
    (0.9, 0.98), 10% warm-up then cosine decay, gradient clipping at 5, fp32.
    The head (and, from scratch, the whole model) is drawn right after
    ``torch.manual_seed(seed)``; batches are shuffled with ``seed``.
    """
    r = VQA_RECIPES[_recipe(recipe)]
    if labels not in LABEL_SETTINGS:
        raise ValueError(f"labels must be one of {LABEL_SETTINGS}, got {labels!r}")
    device = runtime.device() if device is None else torch.device(device)
    torch.manual_seed(seed)
    model = vqa_model(name, book, recipe, pretrained)
    val_loader = make_tensor_loader(questions.val, 1000, shuffle=False)
    _, history = book_uniter.finetune_vqa(
        model,
        questions.train[labels],
        r.steps[labels],
        lr=r.lr,
        batch_size=r.batch_size,
        seed=seed,
        device=device,
        progress=progress,
        eval_fn=lambda m: evaluate_vqa(m, val_loader, prefix="val_"),
        eval_every=r.eval_every,
        checkpoint_dir=checkpoint_dir,
    )
    return model.eval(), history.to_dict(), history.seconds


def evaluate_vqa_model(model: nn.Module, questions: QuestionData) -> dict[str, float]:
    """Test accuracy overall, relational, non-relational and per question family (4,000 questions)."""
    return evaluate_vqa(model, make_tensor_loader(questions.test, 1000, shuffle=False))
