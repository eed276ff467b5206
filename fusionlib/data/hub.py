"""Real corpora, opt-in: COCO Captions, Flickr30k and VQAv2 in the world's sample format (chapter 2).

The book trains on the synthetic world because it runs offline in minutes.
The same pipeline reads real image-text data: this module maps a real corpus
onto the sample format of :mod:`fusionlib.data.shapes` — an image, captions,
questions with an answer — so the datasets, region features and models of
later chapters take either. Real images come without object boxes
(``objects == []``); region features then come from a grid or a detector.

Nothing here downloads by default. A corpus comes from either

- a **local folder** in the ``datasets`` ``imagefolder`` layout: the images
  next to a ``metadata.jsonl`` (one flat folder is split ``"train"``; or one
  sub-folder per split, ``train/``, ``validation/``, ``test/``, each with its
  own ``metadata.jsonl``)::

      coco/metadata.jsonl   {"file_name": "COCO_val2014_000000000042.jpg", "captions": ["a dog ...", "..."]}
      coco/COCO_val2014_000000000042.jpg

  with one line per image for captions (``captions``: a list, or ``caption``:
  one string; lines repeating a ``file_name`` are merged) and one line per
  *question* for VQAv2 (``question``, ``answers``: the 10 annotators'
  answers; lines of the same image are grouped into one sample);
  :func:`metadata_from_coco_captions`, :func:`metadata_from_karpathy` and
  :func:`metadata_from_vqa` write these files from the official annotations;
- or a **dataset id** on the Hugging Face Hub, through ``datasets.load_dataset``
  (columns are recognised by the names listed in ``CAPTION_COLUMNS``,
  ``QUESTION_COLUMNS``, ``ANSWER_COLUMNS``, ``IMAGE_KEY_COLUMNS``).

When neither is available (offline, or a path that does not exist) the error
says what to download and where to put it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..fileio import atomic_write
from .shapes import Question, SceneObject

CORPORA = ("coco_captions", "flickr30k", "vqav2")
VQA_FAMILY = "vqa"

# Column names recognised in metadata.jsonl files and Hub datasets, in order of preference.
CAPTION_COLUMNS = ("captions", "caption", "sentences", "raw", "answer")
QUESTION_COLUMNS = ("question",)
ANSWER_COLUMNS = ("answers", "multiple_choice_answer", "answer")
IMAGE_KEY_COLUMNS = ("image_id", "img_id", "file_name", "filename")

# What to download, for the error messages and the book.
DOWNLOADS = {
    "coco_captions": (
        "COCO Captions (https://cocodataset.org/#download): the images\n"
        "  http://images.cocodataset.org/zips/train2014.zip and http://images.cocodataset.org/zips/val2014.zip\n"
        "  and the captions http://images.cocodataset.org/annotations/annotations_trainval2014.zip\n"
        "  (annotations/captions_train2014.json, captions_val2014.json); then\n"
        "  fusionlib.data.hub.metadata_from_coco_captions('annotations/captions_val2014.json', 'coco/validation')\n"
        "  with the val2014 images moved into coco/validation/.\n"
        "  On the Hub (with images): e.g. 'lmms-lab/COCO-Caption' (splits 'val', 'test')."
    ),
    "flickr30k": (
        "Flickr30k: the images from https://shannon.cs.illinois.edu/DenotationGraph/ (request form),\n"
        "  the captions and Karpathy splits dataset_flickr30k.json from\n"
        "  https://cs.stanford.edu/people/karpathy/deepimagesent/ ; then\n"
        "  fusionlib.data.hub.metadata_from_karpathy('dataset_flickr30k.json', 'flickr30k')\n"
        "  with each image moved into the folder of its split (flickr30k/train/, validation/, test/).\n"
        "  On the Hub (with images): e.g. 'lmms-lab/flickr30k' (split 'test')."
    ),
    "vqav2": (
        "VQAv2 (https://visualqa.org/download.html): the questions v2_Questions_Val_mscoco.zip,\n"
        "  the answers v2_Annotations_Val_mscoco.zip and the COCO images val2014.zip\n"
        "  (http://images.cocodataset.org/zips/val2014.zip); then\n"
        "  fusionlib.data.hub.metadata_from_vqa('v2_OpenEnded_mscoco_val2014_questions.json',\n"
        "      'v2_mscoco_val2014_annotations.json', 'vqav2/validation', image_prefix='COCO_val2014_')\n"
        "  with the val2014 images moved into vqav2/validation/.\n"
        "  On the Hub (with images): e.g. 'lmms-lab/VQAv2' (split 'validation')."
    ),
}

LAYOUT = (
    "Expected layout (the `datasets` imagefolder format):\n"
    "  <folder>/metadata.jsonl and the images beside it (loaded as split 'train'), or\n"
    "  <folder>/train/metadata.jsonl, <folder>/validation/metadata.jsonl, ... (one folder per split);\n"
    "  metadata.jsonl, one JSON object per line:\n"
    '    coco_captions, flickr30k: {"file_name": "img1.jpg", "captions": ["a caption", "another"]}\n'
    "    vqav2 (one line per question):\n"
    '      {"file_name": "img1.jpg", "question": "what is it?", "answers": ["dog", "dog", "cat"]}'
)


class CorpusNotFoundError(FileNotFoundError):
    """The corpus is neither in the given folder nor reachable on the Hub; the message says what to fetch."""


@dataclass
class RealSample:
    """One image of a real corpus in the world's sample format.

    ``image`` is an RGB ``PIL.Image`` (use :meth:`image_array` for ``(H, W, 3)``
    uint8). ``questions`` use family ``"vqa"``, ``relational=False``, no colour,
    and the most common of the annotators' answers. ``objects`` is empty: real
    images come without boxes.
    """

    image: Any  # PIL.Image.Image (RGB) or np.ndarray (H, W, 3) uint8
    captions: list[str]
    questions: list[Question]
    objects: list[SceneObject] = field(default_factory=list)
    source: str = ""  # the corpus name
    image_id: str = ""  # file name or id from the corpus

    def image_array(self) -> np.ndarray:
        """The image as ``(H, W, 3)`` uint8."""
        if isinstance(self.image, np.ndarray):
            return self.image
        return np.asarray(self.image.convert("RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------- loading


def load_corpus(
    name: str,
    path_or_id: str | os.PathLike,
    split: str = "train",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[RealSample]:
    """Load a real corpus as a list of :class:`RealSample` (one per image).

    ``name`` is one of ``CORPORA``; ``path_or_id`` a local imagefolder (see the
    module docstring) or a Hub dataset id; ``limit`` keeps the first ``limit``
    images (in order of first appearance); ``cache_dir`` is passed to
    ``datasets.load_dataset`` (its Arrow cache). For a whole corpus prefer
    :func:`iter_corpus`, which does not hold every image at once.
    """
    return list(iter_corpus(name, path_or_id, split=split, limit=limit, cache_dir=cache_dir))


def iter_corpus(
    name: str,
    path_or_id: str | os.PathLike,
    split: str = "train",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[RealSample]:
    """Like :func:`load_corpus`, one sample at a time (images are decoded as they are reached)."""
    if name not in CORPORA:
        raise ValueError(f"name must be one of {CORPORA}, got {name!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    ds = _load_dataset(name, path_or_id, split, cache_dir)
    return _samples(name, ds, limit)


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a folder.
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or os.sep != "/"
        and os.sep in path
    )


def _not_found(name: str, what: str) -> CorpusNotFoundError:
    return CorpusNotFoundError(
        f"{what}\n\nTo use {name}, download it:\n  {DOWNLOADS[name]}\n\n{LAYOUT}"
    )


def _load_dataset(
    name: str, path_or_id: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None
):
    import datasets

    source = os.path.expanduser(os.fspath(path_or_id))
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    if os.path.isdir(source):
        has_metadata = os.path.isfile(os.path.join(source, "metadata.jsonl")) or any(
            os.path.isfile(os.path.join(source, d, "metadata.jsonl")) for d in os.listdir(source)
        )
        if not has_metadata:
            raise _not_found(
                name,
                f"{source!r} is a folder but holds no metadata.jsonl (nor do its sub-folders).",
            )
        try:
            return datasets.load_dataset(
                "imagefolder", data_dir=source, split=split, cache_dir=cache_dir
            )
        except ValueError as err:
            if "split" in str(err).lower():
                splits = sorted(
                    d
                    for d in os.listdir(source)
                    if os.path.isfile(os.path.join(source, d, "metadata.jsonl"))
                )
                raise ValueError(
                    f"split {split!r} is not in {source!r} (a flat folder is split 'train'; "
                    f"split folders found: {splits or 'none'}): {err}"
                ) from err
            raise
    if os.path.exists(source):
        raise _not_found(
            name, f"{source!r} is a file, not a folder with metadata.jsonl and images."
        )
    if _looks_local(source):
        raise _not_found(name, f"No folder at {source!r}.")
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except (
        OSError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
    ) as err:  # ConnectionError, DatasetNotFoundError: OSErrors
        offline = (
            " (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
            if datasets.config.HF_HUB_OFFLINE
            else ""
        )
        raise _not_found(
            name,
            f"{source!r} is not a local folder, and the Hub dataset {source!r} could not be "
            f"loaded{offline}: {type(err).__name__}: {err}",
        ) from err


def _first(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _texts(value: Any) -> list[str]:
    """Captions from a cell: a string, a list of strings, or a list of {"raw"|"caption": str} dicts."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    out = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("raw", item.get("caption"))
        if isinstance(item, str) and item.strip():
            out.append(item.strip())
    return out


def majority_answer(answers: Any) -> str:
    """The most common answer (ties: the one given first); accepts strings or {"answer": str} dicts."""
    if isinstance(answers, str):
        answers = [answers]
    flat = [a["answer"] if isinstance(a, dict) else a for a in answers or []]
    flat = [a.strip() for a in flat if isinstance(a, str) and a.strip()]
    if not flat:
        raise ValueError(f"answers must hold at least one non-empty answer, got {answers!r}")
    return Counter(flat).most_common(1)[0][0]


def _samples(name: str, ds, limit: int | None) -> Iterator[RealSample]:
    from datasets import Image as ImageFeature

    columns = list(ds.column_names)
    image_col = (
        "image"
        if "image" in columns
        else next((c for c, f in ds.features.items() if isinstance(f, ImageFeature)), None)
    )
    if image_col is None:
        raise ValueError(f"the {name} data has no image column (columns: {columns})")
    if name == "vqav2":
        q_col, a_col = _first(columns, QUESTION_COLUMNS), _first(columns, ANSWER_COLUMNS)
        if q_col is None or a_col is None:
            raise ValueError(
                f"vqav2 needs a question column {QUESTION_COLUMNS} and an answers column "
                f"{ANSWER_COLUMNS}; found columns {columns}"
            )
        questions_col, answers_col = ds[q_col], ds[a_col]
    else:
        c_col = _first(columns, CAPTION_COLUMNS)
        if c_col is None:
            raise ValueError(
                f"{name} needs a caption column, one of {CAPTION_COLUMNS}; found columns {columns}"
            )
        captions_col = ds[c_col]

    # Rows of one image (VQA: one row per question) become one sample.
    key_col = _first(columns, IMAGE_KEY_COLUMNS)
    if key_col is not None:
        keys = [str(k) for k in ds[key_col]]
    else:
        raw = ds.cast_column(image_col, ImageFeature(decode=False))[image_col]
        keys = [r.get("path") or f"row{i}" for i, r in enumerate(raw)]
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)

    for n, (key, rows) in enumerate(groups.items()):
        if limit is not None and n >= limit:
            return
        image = ds[rows[0]][image_col]
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        captions: list[str] = []
        questions: list[Question] = []
        for row in rows:
            if name == "vqav2":
                text = questions_col[row]
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(
                        f"row {row} ({key}) of the vqav2 data has no question: {text!r}"
                    )
                questions.append(
                    Question(text.strip(), majority_answer(answers_col[row]), VQA_FAMILY, False, "")
                )
            else:
                captions += _texts(captions_col[row])
        if name != "vqav2" and not captions:
            raise ValueError(f"image {key!r} of the {name} data has no caption")
        yield RealSample(
            image=image,
            captions=captions,
            questions=questions,
            source=name,
            image_id=os.path.basename(key),
        )


# ----------------------------------------------------------------------------- metadata.jsonl from official files


def _write_jsonl(rows: list[dict], folder: str | os.PathLike) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:  # row by row: VQAv2 has 200k+ questions
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(os.path.join(os.fspath(folder), "metadata.jsonl"), write)


def metadata_from_coco_captions(
    annotation_file: str | os.PathLike, folder: str | os.PathLike
) -> str:
    """Write ``folder/metadata.jsonl`` from a COCO ``captions_*.json``; the images go into ``folder``.

    One line per image: ``{"file_name", "captions"}``. Returns the file written.
    """
    with open(annotation_file, encoding="utf-8") as f:
        coco = json.load(f)
    captions: dict[int, list[str]] = {}
    for ann in coco["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    rows = [
        {"file_name": img["file_name"], "captions": captions[img["id"]]}
        for img in coco["images"]
        if img["id"] in captions
    ]
    return _write_jsonl(rows, folder)


def metadata_from_karpathy(
    karpathy_file: str | os.PathLike, folder: str | os.PathLike
) -> list[str]:
    """Write ``folder/<split>/metadata.jsonl`` from a Karpathy ``dataset_*.json`` (Flickr30k, COCO).

    Karpathy's ``train``/``restval`` become ``train``, ``val`` becomes
    ``validation``; move each image into the folder of its split. Returns the files written.
    """
    with open(karpathy_file, encoding="utf-8") as f:
        images = json.load(f)["images"]
    by_split: dict[str, list[dict]] = {}
    rename = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
    for img in images:
        split = rename.get(img.get("split", "train"), img.get("split", "train"))
        by_split.setdefault(split, []).append(
            {"file_name": img["filename"], "captions": [s["raw"].strip() for s in img["sentences"]]}
        )
    return [
        _write_jsonl(rows, os.path.join(os.fspath(folder), split))
        for split, rows in by_split.items()
    ]


def metadata_from_vqa(
    questions_file: str | os.PathLike,
    annotations_file: str | os.PathLike,
    folder: str | os.PathLike,
    image_prefix: str = "COCO_val2014_",
) -> str:
    """Write ``folder/metadata.jsonl`` from the official VQAv2 questions and annotations files.

    One line per question: ``{"file_name", "question", "answers", "question_id"}``,
    where ``file_name`` is ``f"{image_prefix}{image_id:012d}.jpg"`` (the COCO
    naming). Returns the file written.
    """
    with open(questions_file, encoding="utf-8") as f:
        questions = json.load(f)["questions"]
    with open(annotations_file, encoding="utf-8") as f:
        answers = {
            a["question_id"]: [x["answer"] for x in a["answers"]]
            for a in json.load(f)["annotations"]
        }
    rows = []
    for q in questions:
        if q["question_id"] not in answers:
            raise ValueError(
                f"question {q['question_id']} has no annotation in {os.fspath(annotations_file)!r}"
            )
        rows.append(
            {
                "file_name": f"{image_prefix}{q['image_id']:012d}.jpg",
                "question": q["question"],
                "answers": answers[q["question_id"]],
                "question_id": q["question_id"],
            }
        )
    return _write_jsonl(rows, folder)
