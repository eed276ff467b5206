"""Datasets and batching: scenes + region features + text -> batch dicts (chapter 2).

Every model in the book reads the same batch dict. :func:`collate` builds it
from items of :class:`QuestionDataset` (VQA, one item per scene x question) or
:class:`CaptionDataset` (pretraining, one item per scene x caption). ``B`` is
the batch size, ``T`` the longest text in the batch, ``R`` the regions per
image, ``D`` the region feature size and ``C`` the detector's classes.

Keys of every batch:

===================== ============ ======= ================================================
key                   shape        dtype   meaning
===================== ============ ======= ================================================
input_ids             (B, T)       long    WordPiece ids ``[CLS] ... [SEP]``, right-padded
                                           with the tokenizer's ``[PAD]`` id
attention_mask        (B, T)       bool    True = real token (pads are False), the SDPA
                                           convention used everywhere in fusionlib
region_feats          (B, R, D)    float32 detector box-head features (zeros at padding)
region_boxes          (B, R, 4)    float32 ``x1, y1, x2, y2`` in pixels (zeros at padding)
region_loc5           (B, R, 5)    float32 ViLBERT location ``[x1/W, y1/H, x2/W, y2/H, area]``
region_loc7           (B, R, 7)    float32 UNITER location ``(x1, y1, x2, y2, w, h, w*h)``
                                           normalised
region_mask           (B, R)       bool    True = real region (pads are False)
region_soft_labels    (B, R, C)    float32 detector class distribution (MRC-kl target)
image_feats           (B, D)       float32 the ``[IMG]`` feature (mean of real regions)
image_index           (B,)         long    ``Scene.index`` of the image
===================== ============ ======= ================================================

Questions add ``answer (B,) long`` (index into the ``answers`` list),
``family (B,) long`` (index into ``QUESTION_FAMILIES``), ``relational (B,)
bool`` and ``question_index (B,) long`` (position in ``scene.questions``).
Captions add ``caption_index (B,) long`` (position in ``scene.captions``; -1
for the scene's description). Captions of the synthetic world also carry what
the truth judge (:mod:`fusionlib.data.truth`) needs to tell a true pair from a
false one, so a model's ITM step can pick negatives that are certainly false:

===================== ============ ======= ================================================
text_facts            (B, K, F)    long    the text's facts, ``truth.encode_facts``
image_objects         (B, P, O)    long    the image's objects, ``truth.encode_scenes``
edit_input_ids        (B, E, Te)   long    token ids of minimal edits of the text, each false
                                           of the image (``[PAD]`` rows where there are
                                           fewer than E); only with ``edits=E``
edit_kinds            (B, E)       long    index into ``truth.EDIT_KINDS``, -1 = no edit
===================== ============ ======= ================================================

The regions' ground-truth object index (``RegionFeatures.region_object``) is
deliberately *not* in a batch: a model must find objects from features.

:class:`TensorBatches` and :func:`make_tensor_loader` give the same batches from
tensors that stay on the GPU, without per-item Python (chapter 3's fast path).

:func:`to_hf_dataset` gives the same data as a Hugging Face ``datasets.Dataset``
with an ``Image`` feature, the form real corpora arrive in (``fusionlib.data.hub``).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .. import runtime
from ..vision.regions import RegionFeatures
from .shapes import QUESTION_FAMILIES

REGION_KEYS = (
    "region_feats",
    "region_boxes",
    "region_loc5",
    "region_loc7",
    "region_mask",
    "region_soft_labels",
    "image_feats",
    "image_index",
)
QUESTION_KEYS = ("input_ids",) + REGION_KEYS + ("answer", "family", "relational", "question_index")
CAPTION_KEYS = ("input_ids",) + REGION_KEYS + ("caption_index",)
TRUTH_KEYS = ("text_facts", "image_objects")  # captions of a world the truth judge can read
EDIT_KEYS = ("edit_input_ids", "edit_kinds")  # CaptionDataset(edits=E)
CAPTION_TEXTS = ("captions", "descriptions", "both")
PADDED_KEYS = ("input_ids",)  # variable length: padded by collate, which adds attention_mask


class _RegionTextDataset(Dataset):
    """Shared part: look up an image's regions and a pre-tokenized text."""

    def __init__(
        self,
        scenes: Sequence[Any],
        features: RegionFeatures,
        tokenizer: Any,
        texts: list[str],
        scene_pos: list[int],
        max_length: int,
    ):
        if not isinstance(features, RegionFeatures):
            raise TypeError(f"features must be a RegionFeatures, got {type(features).__name__}")
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if len(texts) == 0:
            raise ValueError("scenes hold no texts to build a dataset from")
        rows = []
        for s in scenes:
            try:
                rows.append(features.row(s.index))
            except KeyError:
                raise ValueError(
                    f"features has no row for scene index {s.index} (split {s.split!r}); "
                    "extract features for the same scenes"
                ) from None
        self.features = features
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer has no pad_token_id; collate needs one to pad input_ids")
        # Tokenize once, up front, in one batched call of the fast (Rust) tokenizer,
        # and only the distinct texts: the world's questions repeat a few hundred
        # templates, so 196,000 questions are ~50x fewer distinct strings.
        position: dict[str, int] = {}
        which = torch.tensor(
            [position.setdefault(t, len(position)) for t in texts], dtype=torch.long
        )
        distinct = list(position)
        enc = tokenizer(
            distinct,
            padding="longest",
            return_tensors="pt",
            return_attention_mask=True,
            return_token_type_ids=False,
        )
        lengths = enc["attention_mask"].sum(dim=1)
        longest = int(lengths.max())
        if longest > max_length:
            worst = distinct[int(lengths.argmax())]
            raise ValueError(
                f"max_length={max_length} is shorter than the longest text ({longest} tokens: "
                f"{worst!r}); raise max_length rather than cut texts"
            )
        self.input_ids = enc["input_ids"]  # (distinct texts, longest)
        self.text_id = which  # (M,) row of input_ids for each item
        self.lengths = lengths
        self.row = torch.tensor([rows[p] for p in scene_pos], dtype=torch.long)
        self.image_index = torch.tensor([scenes[p].index for p in scene_pos], dtype=torch.long)
        # Computed once, not per item: loc5/loc7 of every region of every image.
        self.loc5 = features.loc5
        self.loc7 = features.loc7

    def __len__(self) -> int:
        return len(self.row)

    def _regions(self, i: int) -> dict[str, Tensor]:
        r = int(self.row[i])
        t = int(self.text_id[i])
        f = self.features
        return {
            "input_ids": self.input_ids[t, : int(self.lengths[t])],
            "region_feats": f.feats[r],
            "region_boxes": f.boxes[r],
            "region_loc5": self.loc5[r],
            "region_loc7": self.loc7[r],
            "region_mask": f.mask[r],
            "region_soft_labels": f.soft_labels[r],
            "image_feats": f.image_feats[r],
            "image_index": self.image_index[i],
        }

    def _check_index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        return i % len(self)


class QuestionDataset(_RegionTextDataset):
    """One item per (scene, question): the question's tokens, the image's regions and the answer (VQA).

    ``answers`` is the answer vocabulary (e.g. ``shapes.answer_vocab(config)``);
    an answer outside it raises. Texts longer than ``max_length`` tokens raise
    (nothing is truncated silently).
    """

    def __init__(
        self,
        scenes: Sequence[Any],
        features: RegionFeatures,
        tokenizer: Any,
        answers: Sequence[str],
        max_length: int = 32,
    ):
        answer_ids = {a: i for i, a in enumerate(answers)}
        if len(answer_ids) != len(answers):
            raise ValueError(f"answers must be distinct, got {list(answers)}")
        texts, scene_pos, ans, fam, rel, qpos = [], [], [], [], [], []
        for p, s in enumerate(scenes):
            for k, q in enumerate(s.questions):
                if q.answer not in answer_ids:
                    raise ValueError(
                        f"answer {q.answer!r} of scene {s.index} is not in answers {list(answers)}"
                    )
                if q.family not in QUESTION_FAMILIES:
                    raise ValueError(
                        f"family {q.family!r} of scene {s.index} is not in {QUESTION_FAMILIES}"
                    )
                texts.append(q.text)
                scene_pos.append(p)
                ans.append(answer_ids[q.answer])
                fam.append(QUESTION_FAMILIES.index(q.family))
                rel.append(bool(q.relational))
                qpos.append(k)
        super().__init__(scenes, features, tokenizer, texts, scene_pos, max_length)
        self.answers = list(answers)
        self.batch_keys = QUESTION_KEYS
        self.answer = torch.tensor(ans, dtype=torch.long)
        self.family = torch.tensor(fam, dtype=torch.long)
        self.relational = torch.tensor(rel, dtype=torch.bool)
        self.question_index = torch.tensor(qpos, dtype=torch.long)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = self._check_index(i)
        item = self._regions(i)
        item["answer"] = self.answer[i]
        item["family"] = self.family[i]
        item["relational"] = self.relational[i]
        item["question_index"] = self.question_index[i]
        return item


class CaptionDataset(_RegionTextDataset):
    """One item per (scene, text): the text's tokens and the image's regions (pretraining, retrieval).

    ``text`` chooses the texts: ``"captions"`` (the short captions, one item
    each), ``"descriptions"`` (one item per scene: several facts that single
    out the image, chapter 2) or ``"both"``. ``max_length`` defaults to 40
    tokens for captions and 80 otherwise (descriptions run to about 60).

    ``judge``: add the truth judge's ``text_facts`` and ``image_objects`` to
    every item (see the module docstring), so ITM can draw negatives that are
    false. ``None`` judges when every scene has objects (the synthetic world)
    and skips real corpora, whose scenes have none. ``edits=E`` adds up to
    ``E`` minimal edits of each text (``truth.minimal_edits``, every one false
    of the image) as ``edit_input_ids``/``edit_kinds``: the hard negatives of
    chapter 4. Which ``E`` are kept, when a text has more, is drawn per item
    (seeded by the scene index), taking the edit kinds in turn so every kind
    is represented. The world's colours and shapes come from the detector's
    class names in ``features``.
    """

    def __init__(
        self,
        scenes: Sequence[Any],
        features: RegionFeatures,
        tokenizer: Any,
        max_length: int | None = None,
        text: str = "captions",
        judge: bool | None = None,
        edits: int = 0,
    ):
        if text not in CAPTION_TEXTS:
            raise ValueError(f"text must be one of {CAPTION_TEXTS}, got {text!r}")
        if isinstance(edits, bool) or not isinstance(edits, int) or edits < 0:
            raise ValueError(
                f"edits must be an int >= 0 (how many minimal edits per text), got {edits!r}"
            )
        texts, scene_pos, cpos = [], [], []
        for p, s in enumerate(scenes):
            chosen = []
            if text in ("captions", "both"):
                chosen += list(enumerate(s.captions))
            if text in ("descriptions", "both"):
                if not getattr(s, "description", ""):
                    raise ValueError(
                        f"scene {s.index} has no description; text={text!r} needs one per scene"
                    )
                chosen.append((-1, s.description))
            for k, c in chosen:
                texts.append(c)
                scene_pos.append(p)
                cpos.append(k)
        if max_length is None:
            max_length = 40 if text == "captions" else 80
        super().__init__(scenes, features, tokenizer, texts, scene_pos, max_length)
        self.caption_index = torch.tensor(cpos, dtype=torch.long)
        self.batch_keys = CAPTION_KEYS
        if judge is None:
            judge = len(scenes) > 0 and all(getattr(s, "objects", None) for s in scenes)
        if edits and not judge:
            raise ValueError(
                "edits need the truth judge (judge=True): an edit is kept only if it is false of the image"
            )
        if judge:
            self._add_truth(scenes, texts, scene_pos)
        if edits:
            self._add_edits(scenes, texts, scene_pos, tokenizer, edits, max_length)

    def _add_truth(self, scenes: Sequence[Any], texts: list[str], scene_pos: list[int]) -> None:
        from . import truth

        missing = [s.index for s in scenes if not getattr(s, "objects", None)]
        if missing:
            raise ValueError(
                f"judge=True needs the objects of every scene; scenes {missing[:5]} have none "
                "(a real corpus has no truth judge: use judge=False)"
            )
        distinct: dict[str, int] = {}
        which = torch.tensor(
            [distinct.setdefault(t, len(distinct)) for t in texts], dtype=torch.long
        )
        self.text_facts = truth.encode_facts(list(distinct))[which]  # (M, K, F)
        objects = truth.encode_scenes(scenes)  # (scenes, P, O)
        # Held per feature row, like the regions, so TensorBatches gathers it by the same row index.
        self.image_objects = torch.zeros(
            len(self.features.feats), *objects.shape[1:], dtype=torch.long
        )
        for p, s in enumerate(scenes):
            self.image_objects[self.features.row(s.index)] = objects[p]
        self.batch_keys = self.batch_keys + TRUTH_KEYS

    def _add_edits(
        self,
        scenes: Sequence[Any],
        texts: list[str],
        scene_pos: list[int],
        tokenizer: Any,
        per_text: int,
        max_length: int,
    ) -> None:
        import numpy as np

        from . import truth

        colors, shapes = _world_vocabulary(self.features)
        chosen: list[list[truth.Edit]] = []
        for n, (t, p) in enumerate(zip(texts, scene_pos)):
            edits = truth.minimal_edits(t, scenes[p], colors, shapes)
            if len(edits) > per_text:
                rng = np.random.default_rng([int(scenes[p].index), int(self.caption_index[n]) + 1])
                by_kind: dict[str, list[truth.Edit]] = {}
                for e in edits:
                    by_kind.setdefault(e.kind, []).append(e)
                pools = [list(rng.permutation(len(v))) for v in by_kind.values()]
                lists = list(by_kind.values())
                order = rng.permutation(len(lists))
                kept: list[truth.Edit] = []
                while len(kept) < per_text:  # the kinds in turn, each in a random order
                    for k in order:
                        if pools[k] and len(kept) < per_text:
                            kept.append(lists[k][pools[k].pop()])
                edits = kept
            chosen.append(edits)
        distinct: dict[str, int] = {}
        for edits in chosen:
            for e in edits:
                distinct.setdefault(e.text, len(distinct))
        pad = self.pad_token_id
        index = torch.full(
            (len(texts), per_text), len(distinct), dtype=torch.long
        )  # the last row: no edit
        kinds = torch.full((len(texts), per_text), -1, dtype=torch.long)
        for n, edits in enumerate(chosen):
            for j, e in enumerate(edits):
                index[n, j] = distinct[e.text]
                kinds[n, j] = truth.EDIT_KINDS.index(e.kind)
        if distinct:
            enc = tokenizer(
                list(distinct), padding="longest", return_tensors="pt", return_token_type_ids=False
            )
            longest = int(enc["attention_mask"].sum(dim=1).max())
            if longest > max_length:
                raise ValueError(
                    f"max_length={max_length} is shorter than the longest edit ({longest} tokens); "
                    "raise max_length"
                )
            table = enc["input_ids"]
        else:
            table = torch.empty(0, 1, dtype=torch.long)
        table = torch.cat(
            [table, torch.full((1, table.shape[1]), pad, dtype=torch.long)]
        )  # + an all-[PAD] row
        ids = table[index]
        self.edit_input_ids = ids  # (M, E, Te)
        self.edit_kinds = kinds  # (M, E)
        self.batch_keys = self.batch_keys + EDIT_KEYS

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        i = self._check_index(i)
        item = self._regions(i)
        item["caption_index"] = self.caption_index[i]
        if "text_facts" in self.batch_keys:
            item["text_facts"] = self.text_facts[i]
            item["image_objects"] = self.image_objects[int(self.row[i])]
        if "edit_input_ids" in self.batch_keys:
            item["edit_input_ids"] = self.edit_input_ids[i]
            item["edit_kinds"] = self.edit_kinds[i]
        return item


def _world_vocabulary(features: RegionFeatures) -> tuple[list[str], list[str]]:
    """The world's colours and shapes, in order, read off the detector's ``"<colour> <shape>"`` class names."""
    colors: list[str] = []
    shapes: list[str] = []
    for name in features.class_names:
        parts = name.split()
        if len(parts) != 2:
            continue  # "background"
        if parts[0] not in colors:
            colors.append(parts[0])
        if parts[1] not in shapes:
            shapes.append(parts[1])
    if not colors or not shapes:
        raise ValueError(
            f"features.class_names must name '<colour> <shape>' classes to edit texts with, "
            f"got {features.class_names!r}"
        )
    return colors, shapes


def collate(items: Sequence[dict[str, Tensor]], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Stack items into a batch dict (keys and shapes in the module docstring).

    ``input_ids`` are right-padded with ``pad_token_id`` to the longest in the
    batch and ``attention_mask`` (bool, True = real token) is added; every
    other key is stacked and must have the same shape in every item.
    Raises ``ValueError`` naming the key when items disagree.
    """
    if len(items) == 0:
        raise ValueError("items must hold at least one item, got an empty batch")
    keys = list(items[0].keys())
    if "attention_mask" in keys:
        raise ValueError("items must not carry attention_mask; collate builds it from input_ids")
    for n, item in enumerate(items):
        if set(item.keys()) != set(keys):
            missing = sorted(set(keys) - set(item.keys()))
            extra = sorted(set(item.keys()) - set(keys))
            raise ValueError(
                f"item {n} has different keys from item 0: missing {missing}, extra {extra}"
            )
    batch: dict[str, Tensor] = {}
    for key in keys:
        values = [item[key] for item in items]
        for n, v in enumerate(values):
            if not isinstance(v, Tensor):
                raise TypeError(f"item {n}[{key!r}] must be a tensor, got {type(v).__name__}")
            if v.dtype != values[0].dtype:
                raise ValueError(
                    f"key {key!r}: item {n} has dtype {v.dtype}, item 0 has {values[0].dtype}"
                )
        if key in PADDED_KEYS:
            for n, v in enumerate(values):
                if v.dim() != 1:
                    raise ValueError(
                        f"key {key!r}: item {n} must be 1-d (T,), got {tuple(v.shape)}"
                    )
            longest = max(len(v) for v in values)
            ids = torch.full((len(values), longest), pad_token_id, dtype=values[0].dtype)
            mask = torch.zeros(len(values), longest, dtype=torch.bool)
            for n, v in enumerate(values):
                ids[n, : len(v)] = v
                mask[n, : len(v)] = True
            batch[key] = ids
            batch["attention_mask"] = mask
        else:
            shape = values[0].shape
            for n, v in enumerate(values):
                if v.shape != shape:
                    raise ValueError(
                        f"key {key!r}: item {n} has shape {tuple(v.shape)}, item 0 has {tuple(shape)}"
                    )
            batch[key] = torch.stack(values)
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with :func:`collate` and a generator seeded with ``seed``.

    The same seed gives the same batches in the same order. ``[PAD]`` is taken
    from ``dataset.pad_token_id`` (0 if the dataset has none).
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    pad = getattr(dataset, "pad_token_id", 0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=functools.partial(collate, pad_token_id=pad),
        **kwargs,
    )


def to_hf_dataset(scenes: Sequence[Any], kind: str = "captions") -> "datasets.Dataset":  # noqa: F821
    """The scenes as a Hugging Face ``datasets.Dataset`` with an ``Image`` feature (built offline).

    ``kind="captions"``: one row per caption with columns ``image``, ``image_index``,
    ``caption_index``, ``caption``. ``kind="questions"``: one row per question with
    ``image``, ``image_index``, ``question_index``, ``question``, ``answer``,
    ``family``, ``relational``. Images are stored as PNG (lossless), once per row.
    """
    import datasets
    from PIL import Image

    if kind not in ("captions", "questions"):
        raise ValueError(f"kind must be 'captions' or 'questions', got {kind!r}")
    columns: dict[str, list[Any]] = {"image": [], "image_index": []}
    if kind == "captions":
        columns.update(caption_index=[], caption=[])
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "image_index": datasets.Value("int64"),
                "caption_index": datasets.Value("int64"),
                "caption": datasets.Value("string"),
            }
        )
    else:
        columns.update(question_index=[], question=[], answer=[], family=[], relational=[])
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "image_index": datasets.Value("int64"),
                "question_index": datasets.Value("int64"),
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "family": datasets.Value("string"),
                "relational": datasets.Value("bool"),
            }
        )
    for s in scenes:
        image = Image.fromarray(s.image)
        if kind == "captions":
            for k, c in enumerate(s.captions):
                columns["image"].append(image)
                columns["image_index"].append(s.index)
                columns["caption_index"].append(k)
                columns["caption"].append(c)
        else:
            for k, q in enumerate(s.questions):
                columns["image"].append(image)
                columns["image_index"].append(s.index)
                columns["question_index"].append(k)
                columns["question"].append(q.text)
                columns["answer"].append(q.answer)
                columns["family"].append(q.family)
                columns["relational"].append(bool(q.relational))
    return datasets.Dataset.from_dict(columns, features=features)


# ---------------------------------------------------------------------------
# Device-resident batches (chapter 3): no per-item Python, no host-to-device copies
# ---------------------------------------------------------------------------


STANDARDISED_KEYS = ("region_feats", "region_loc5", "region_loc7")


class RetrievalSet(NamedTuple):
    """Images and texts for retrieval (chapters 2, 5, 6); see :func:`retrieval_set`."""

    images: dict[
        str, Tensor
    ]  # the region keys of a batch, (N_images, R, ...) and image_feats (N_images, D)
    captions: dict[str, Tensor]  # input_ids and attention_mask of the texts, (N_texts, T)
    caption_image: Tensor  # (N_texts,) long: the row of ``images`` each text was written for
    texts: list[str]  # the texts themselves
    truth: Tensor | None  # (N_texts, N_images) bool from the truth judge; None for real corpora


def retrieval_set(
    scenes: Sequence[Any],
    features: RegionFeatures,
    tokenizer: Any,
    statistics: dict[str, tuple[Tensor, Tensor]] | None = None,
    text: str = "captions",
) -> RetrievalSet:
    """Every text of ``scenes`` against every one of their images, for recall@K.

    ``text="captions"``: every short caption; a caption is true of many
    images, so score it truth-aware (any image it is true of is a hit).
    ``text="descriptions"``: one description per image, which singles its
    image out: identification retrieval. The images are in the order of
    ``scenes``, once each; the texts follow :class:`CaptionDataset` (scene by
    scene). ``truth`` holds what the judge says of every (text, image) pair
    (``None`` when the scenes have no objects, as in a real corpus). With
    ``statistics`` (what :meth:`TensorBatches.standardise` returned on the
    training split) the region features and locations are z-scored as the
    model saw them in training. Score a model with
    ``metrics.retrieval_scores(similarity, s.caption_image, s.truth)`` and read
    chance and ceiling from ``metrics.retrieval_bounds(s.truth, s.caption_image)``.
    """
    if text not in ("captions", "descriptions"):
        raise ValueError(f"text must be 'captions' or 'descriptions', got {text!r}")
    if len(scenes) == 0:
        raise ValueError("scenes must hold at least one scene, got none")
    indices = [int(s.index) for s in scenes]
    repeated = sorted(i for i, n in collections.Counter(indices).items() if n > 1)
    if repeated:
        raise ValueError(
            f"scenes must not repeat a scene (one image would count as two); "
            f"scene indices {repeated[:5]} appear more than once"
        )
    if text == "captions":
        silent = [s.index for s in scenes if not s.captions]
        if silent:
            raise ValueError(
                f"every scene needs a caption to be retrieved by; scenes {silent[:5]} have none"
            )
    items = CaptionDataset(scenes, features, tokenizer, text=text)
    batch = collate([items[i] for i in range(len(items))], pad_token_id=tokenizer.pad_token_id)
    position = {index: p for p, index in enumerate(indices)}
    caption_image = torch.tensor([position[int(i)] for i in batch["image_index"]], dtype=torch.long)
    first_caption = torch.searchsorted(
        caption_image, torch.arange(len(scenes))
    )  # texts come scene by scene
    images = {k: batch[k][first_caption] for k in REGION_KEYS if k != "image_index"}
    if statistics is not None:
        images = standardise_batch(images, statistics)
    captions = {k: batch[k] for k in ("input_ids", "attention_mask")}
    texts = [c for s in scenes for c in (s.captions if text == "captions" else [s.description])]
    judged = None
    if "text_facts" in items.batch_keys:
        from . import truth

        judged = truth.truth_matrix(texts, scenes)
    return RetrievalSet(images, captions, caption_image, texts, judged)


def standardise_batch(
    batch: dict[str, Tensor], statistics: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """A copy of ``batch`` with its region features and locations z-scored by ``statistics`` (chapter 3).

    ``statistics`` is what :meth:`TensorBatches.standardise` returned on the
    training split: ``{key: (mean (dim,), std (dim,))}``. Use this for batches
    built outside a :class:`TensorBatches` (``collate`` of a few items, a set
    of retrieval images), so that a model trained on standardised inputs sees
    the same scale there. Keys of ``statistics`` that ``batch`` lacks are
    skipped; padded regions (``region_mask`` False) stay exactly zero, and
    ``image_feats`` moves with ``region_feats``. Other keys are passed on as they are.
    """
    if "region_mask" not in batch:
        raise ValueError(
            "standardise_batch needs batch['region_mask'] to tell real regions from padding"
        )
    out = dict(batch)
    mask = batch["region_mask"]
    for key, (mean, std) in statistics.items():
        if key not in STANDARDISED_KEYS:
            raise ValueError(
                f"statistics keys must be among {list(STANDARDISED_KEYS)}, got {key!r}"
            )
        if key not in batch:
            continue
        x = batch[key]
        if tuple(mean.shape) != (x.shape[-1],) or tuple(std.shape) != (x.shape[-1],):
            raise ValueError(
                f"statistics[{key!r}] must be two ({x.shape[-1]},) tensors for batch[{key!r}] "
                f"{tuple(x.shape)}, got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"batch['region_mask'] must be {tuple(x.shape[:-1])} like batch[{key!r}], "
                f"got {tuple(mask.shape)}"
            )
        mean, std = mean.to(x.device), std.to(x.device)
        out[key] = ((x - mean) / std).masked_fill(~mask[..., None], 0.0)
        if key == "region_feats" and "image_feats" in batch:
            out["image_feats"] = (batch["image_feats"] - mean) / std
    return out


def _batch_as_is(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``collate_fn`` of :func:`make_tensor_loader`: :meth:`TensorBatches.__getitems__` already built the batch."""
    return batch


class TensorBatches(Dataset):
    """A :class:`QuestionDataset` or :class:`CaptionDataset` held as tensors on one device (chapter 3).

    ``dataset[i]`` with per-item Python and :func:`collate` costs about as
    much as a forward and backward pass of a small model on a GPU, so the GPU
    waits for the CPU. Here everything is gathered once: the regions of every
    image ``(images, R, ...)``, the distinct texts padded to the longest
    ``(texts, T_max)`` and the per-item indices and labels ``(M,)``, all on
    ``device``. A batch is then a handful of index operations on the device:
    :meth:`__getitems__` takes a list of item indices and returns the same
    dict, with the same keys, shapes, dtypes and values, that
    ``collate([dataset[i] for i in indices])`` returns (``input_ids`` are
    trimmed to the longest text of the batch, as collate pads them), only on
    ``device``.

    Use it through :func:`make_tensor_loader`, a ``DataLoader`` that hands the
    whole index list of a batch to :meth:`__getitems__`. Because it is an
    ordinary ``DataLoader`` with a ``RandomSampler``,
    :func:`fusionlib.train.train` reseeds its shuffling per epoch and resumes
    it exactly as it does for :func:`make_loader`. ``keys`` restricts the
    batch to the keys a model reads (``attention_mask`` comes with
    ``input_ids``). ``dataset[i]`` is the batch of the one item ``i``.
    """

    def __init__(
        self,
        dataset: _RegionTextDataset,
        device: torch.device | str | None = None,
        keys: Sequence[str] | None = None,
    ):
        if not isinstance(dataset, (QuestionDataset, CaptionDataset)):
            raise TypeError(
                f"dataset must be a QuestionDataset or CaptionDataset, got {type(dataset).__name__}"
            )
        all_keys = dataset.batch_keys
        keys = tuple(all_keys) if keys is None else tuple(k for k in keys if k != "attention_mask")
        unknown = sorted(set(keys) - set(all_keys))
        if unknown:
            raise ValueError(
                f"keys {unknown} are not batch keys of a {type(dataset).__name__}; "
                f"choose from {list(all_keys)} (and attention_mask)"
            )
        if not keys:
            raise ValueError("keys must name at least one batch key")
        self.keys = keys
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pad_token_id = dataset.pad_token_id
        f = dataset.features
        on = {
            "region_feats": f.feats,
            "region_boxes": f.boxes,
            "region_loc5": dataset.loc5,
            "region_loc7": dataset.loc7,
            "region_mask": f.mask,
            "region_soft_labels": f.soft_labels,
            "image_feats": f.image_feats,
            "image_objects": getattr(dataset, "image_objects", None),
        }
        # Per image: (images, R, ...) on the device, gathered by each item's row.
        self.per_image = {k: v.to(self.device) for k, v in on.items() if k in keys}
        per_item = {"image_index": dataset.image_index}
        for name in (
            "answer",
            "family",
            "relational",
            "question_index",
            "caption_index",
            "text_facts",
            "edit_input_ids",
            "edit_kinds",
        ):
            if hasattr(dataset, name):
                per_item[name] = getattr(dataset, name)
        self.per_item = {k: v.to(self.device) for k, v in per_item.items() if k in keys}
        self.row = dataset.row.to(self.device)
        self.text_id = dataset.text_id.to(self.device)
        self.input_ids = dataset.input_ids.to(self.device)  # (texts, T_max)
        self.text_lengths = dataset.lengths.to(self.device)  # (texts,)
        # Each item's text length stays on the host: the batch's T is found without a device read-back.
        self.item_lengths = dataset.lengths[dataset.text_id]  # (M,) on the CPU
        self.positions = torch.arange(self.input_ids.shape[1], device=self.device)

    def __len__(self) -> int:
        return len(self.item_lengths)

    def standardise(
        self,
        statistics: dict[str, tuple[Tensor, Tensor]] | None = None,
        keys: Sequence[str] = STANDARDISED_KEYS,
        scale: dict[str, float] | None = None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Z-score region features and locations in place, per dimension, over the real regions (chapter 3).

        The detector's features are ReLU outputs (mean ~6, std ~7 on the
        default world) while box coordinates lie in [0, 1]; summed into one
        embedding, the location barely moves it and a model takes epochs to
        find out where anything is. Standardising both puts them on one scale.

        Without ``statistics`` the mean and std of each key in ``keys`` are
        measured here, over real regions only, applied and returned ``{key:
        (mean (dim,), std (dim,))}``: do this on the training split and pass
        the result to the other splits. ``scale`` gives a key a standard
        deviation other than 1 (``{"region_loc5": 3.0}``: z-scores times 3);
        it is folded into the returned ``std``, so the other splits get it
        too. Padding stays exactly zero, and
        ``image_feats`` (the mean region feature) is moved with the
        ``region_feats`` statistics, so it stays the mean of the regions.
        Keys this batch set does not hold are skipped.
        """
        unknown = sorted(set(keys) - set(STANDARDISED_KEYS))
        if unknown:
            raise ValueError(f"keys must be among {list(STANDARDISED_KEYS)}, got {unknown}")
        if "region_mask" not in self.per_image:
            raise ValueError(
                "standardise needs region_mask among the keys, to tell real regions from padding"
            )
        mask = self.per_image["region_mask"]
        present = [k for k in keys if k in self.per_image]
        scale = dict(scale or {})
        if statistics is None:
            bad = {
                k: v
                for k, v in scale.items()
                if k not in keys or not (isinstance(v, (int, float)) and v > 0)
            }
            if bad:
                raise ValueError(
                    f"scale must map keys among {list(keys)} to positive numbers, got {bad}"
                )
            statistics = {}
            for key in present:
                real = self.per_image[key][mask]  # (real regions, dim)
                statistics[key] = (
                    real.mean(dim=0),
                    real.std(dim=0).clamp(min=1e-6) / scale.get(key, 1.0),
                )
        elif scale:
            raise ValueError(
                "pass scale when measuring the statistics (on the training split); "
                "the statistics returned then carry it"
            )
        missing = [k for k in present if k not in statistics]
        if missing:
            raise ValueError(f"statistics has no entry for {missing}; it has {sorted(statistics)}")
        used = {k: statistics[k] for k in present}
        self.per_image = standardise_batch(self.per_image, used)
        return used

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        if self.device.type == "cpu":
            # Small gathers: one thread. Waking OpenMP workers for each of them made a
            # batch 25x slower on 2 busy cores (14 ms instead of 0.6 ms).
            with runtime.num_threads(1):
                return self._gather(indices)
        return self._gather(indices)

    def _gather(self, indices: Sequence[int]) -> dict[str, Tensor]:
        if len(indices) == 0:
            raise ValueError("indices must hold at least one item index, got none")
        idx_host = torch.as_tensor(indices, dtype=torch.long)
        n = len(self)
        if bool(((idx_host < -n) | (idx_host >= n)).any()):
            raise IndexError(
                f"indices must lie in [-{n}, {n}) for a dataset of {n} items, "
                f"got values in [{int(idx_host.min())}, {int(idx_host.max())}]"
            )
        idx_host = idx_host % n
        T = int(self.item_lengths[idx_host].max())
        idx = idx_host.to(self.device, non_blocking=True)
        batch: dict[str, Tensor] = {}
        if "input_ids" in self.keys:
            text = self.text_id[idx]
            batch["input_ids"] = self.input_ids[text, :T]
            batch["attention_mask"] = self.positions[:T] < self.text_lengths[text][:, None]
        if self.per_image:
            row = self.row[idx]
            for key, value in self.per_image.items():
                batch[key] = value[row]
        for key, value in self.per_item.items():
            batch[key] = value[idx]
        return {
            k: batch[k]
            for k in (
                *(("input_ids", "attention_mask") if "input_ids" in self.keys else ()),
                *(k for k in self.keys if k != "input_ids"),
            )
        }

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])


def make_tensor_loader(
    batches: TensorBatches,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over a :class:`TensorBatches` that builds each batch in one call, on its device.

    Same shuffling (and so, for the same ``seed``, the same batches) as
    :func:`make_loader` over the wrapped dataset. No workers: the data is
    already where the model is.
    """
    if not isinstance(batches, TensorBatches):
        raise TypeError(f"batches must be a TensorBatches, got {type(batches).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return DataLoader(
        batches,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_batch_as_is,
    )
