"""The synthetic visual world: Sort-of-CLEVR scenes, captions and questions (chapter 2).

Every later chapter needs image-text pairs that work offline, train in minutes
and *require* fusion: a question like "what shape is the object closest to the
red object?" cannot be answered from the words alone (the layout is random) nor
from the pixels alone (the colour is in the words). This module builds that
world, following Sort-of-CLEVR (Santoro et al., 2017):

- a 75 x 75 RGB image on a white background with 6 objects, one per colour
  (red, green, blue, orange, gray, yellow), each a square or a circle, with no
  two boxes touching;
- for each scene, captions that describe objects and spatial relations in
  several templates and word orders (for pretraining: MLM, ITM, contrastive),
  each true of the scene by the rules of :mod:`fusionlib.data.truth`;
- a description: several such facts joined by "and", enough to single out
  the scene among the others (a short caption fits many scenes);
- 20 questions in natural language, 10 non-relational (``shape``, ``left``,
  ``top``) and 10 relational (``closest``, ``furthest``, ``count``), each with
  an answer computed exactly from the geometry.

Everything is a pure function of ``(config.seed, split, index)``: a scene's
random stream is ``numpy.random.default_rng([seed, split_id, index])``, so the
same arguments give identical bytes on every machine and any scene can be
regenerated on its own. Splits are disjoint by construction: a hash of a
scene's objects names the one split it may appear in (:func:`split_of`), and
the generator redraws until the hash agrees, so not even a tiny world can put
one scene in two splits. Generation is fast (a PIL renderer and a few hundred
Python operations per scene, see ``python -m fusionlib.bench data``), so
nothing is cached.

Geometry conventions (used by every answer and caption):

- pixel coordinates, origin top-left, ``x`` to the right, ``y`` down;
- ``box = (x1, y1, x2, y2)`` with ``x2``/``y2`` exclusive, so a square of side
  ``s`` has ``x2 - x1 == s``; the centre is ``((x1 + x2) / 2, (y1 + y2) / 2)``;
- "on the left" means ``center_x < image_size / 2``, "on the top" means
  ``center_y < image_size / 2``; no centre lies exactly on a midline;
- "closest" / "furthest" use the Euclidean distance between centres; layouts
  where the closest or furthest object is ambiguous (two candidates within
  ``TIE_MARGIN`` pixels) are resampled, so every answer is unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- constants

COLORS = ("red", "green", "blue", "orange", "gray", "yellow")  # Sort-of-CLEVR order
SHAPES = ("square", "circle")  # the Sort-of-CLEVR shapes
KNOWN_SHAPES = ("square", "circle", "triangle")  # what the renderer can draw

# RGB of every colour the renderer knows: the six Sort-of-CLEVR colours first
# (the values of the reference implementation), then extras for worlds with
# more objects.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 160),
    "cyan": (0, 200, 200),
    "brown": (140, 70, 20),
    "pink": (255, 105, 180),
}
BACKGROUND = (255, 255, 255)

SPLITS = ("train", "val", "test")
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}

NON_RELATIONAL_FAMILIES = ("shape", "left", "top")
RELATIONAL_FAMILIES = ("closest", "furthest", "count")
QUESTION_FAMILIES = NON_RELATIONAL_FAMILIES + RELATIONAL_FAMILIES

GAP = 2  # background pixels kept between any two boxes
TIE_MARGIN = 1.0  # closest/furthest must win by at least this many pixels
MIN_OBJECT_SIZE = 4  # below this a circle and a square are the same blob
MAX_DENSITY = 0.4  # random placement needs free room; see WorldConfig.__post_init__
WORLD_VERSION = 1  # bump when generation changes, so cache keys change too

_MAX_LAYOUTS = 200  # whole-layout restarts before giving up
_TRIES_PER_OBJECT = 60  # positions tried for one object within a layout
_MAX_MOVES = 50  # tie-breaking moves within a layout
_SHAPE_DRAWS = 8  # shape assignments tried before a layout is given up for another split

# Question wording: 3 templates per family, so a model must read, not match a
# fixed string; few enough to stay learnable in minutes.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": (
        "what shape is the {c} object?",
        "what is the shape of the {c} object?",
        "which shape is the {c} object?",
    ),
    "left": (
        "is the {c} object on the left?",
        "is the {c} object on the left side of the image?",
        "is the {c} object in the left half of the image?",
    ),
    "top": (
        "is the {c} object on the top?",
        "is the {c} object at the top of the image?",
        "is the {c} object in the upper half of the image?",
    ),
    "closest": (
        "what shape is the object closest to the {c} object?",
        "what is the shape of the object nearest to the {c} object?",
        "which shape is the object that is closest to the {c} object?",
    ),
    "furthest": (
        "what shape is the object furthest from the {c} object?",
        "what is the shape of the object farthest from the {c} object?",
        "which shape is the object that is furthest from the {c} object?",
    ),
    "count": (
        "how many objects have the same shape as the {c} object?",
        "how many objects share the shape of the {c} object?",
        "counting the {c} object itself how many objects have its shape?",
    ),
}

CAPTION_KINDS = ("relation", "location", "nearest", "farthest", "count")

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a world; two equal configs generate identical data.

    The defaults are Sort-of-CLEVR: 75 px images, 6 objects (one per colour),
    squares and circles of 10 px, 9,800 train / 500 val / 200 test images,
    20 questions per image. Impossible settings raise ``ValueError`` naming the
    field (more objects than colours, objects that cannot fit, sizes <= 0, an
    unknown shape or colour).
    """

    image_size: int = 75  # square images, pixels
    num_objects: int = 6  # max objects per scene (<= len(colors)); one object per colour
    min_objects: int | None = (
        None  # None -> exactly num_objects; else uniform in [min_objects, num_objects]
    )
    object_size: int = 10  # side of a square / diameter of a circle, pixels
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    num_train: int = 9_800
    num_val: int = 500
    num_test: int = 200
    seed: int = 0
    num_questions: int = 20  # per scene; half non-relational, half relational
    num_captions: int = 5  # distinct captions per scene (>= 3)
    description_facts: int = (
        5  # facts joined into each scene's description (one per object where possible)
    )
    description_kinds: tuple[str, ...] = (
        "relation",
        "location",
        "nearest",
        "farthest",
    )  # kinds they take turns

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so the config stays hashable.
        for name in ("shapes", "colors", "description_kinds"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ValueError(f"WorldConfig.{name} must be a tuple of names, got {value!r}")
            object.__setattr__(self, name, tuple(value))

        def check_int(name: str, low: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"WorldConfig.{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"WorldConfig.{name} must be >= {low}, got {value}")
            return value

        if not self.shapes:
            raise ValueError("WorldConfig.shapes must name at least one shape, got ()")
        unknown = [s for s in self.shapes if s not in KNOWN_SHAPES]
        if unknown:
            raise ValueError(
                f"WorldConfig.shapes has unknown shape(s) {unknown}; known shapes are {KNOWN_SHAPES}"
            )
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"WorldConfig.shapes must not repeat a shape, got {self.shapes}")
        if not self.colors:
            raise ValueError("WorldConfig.colors must name at least one colour, got ()")
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(
                f"WorldConfig.colors has unknown colour(s) {unknown}; known colours are {tuple(PALETTE)}"
            )
        if len(set(self.colors)) != len(self.colors):
            raise ValueError(f"WorldConfig.colors must not repeat a colour, got {self.colors}")

        image_size = check_int("image_size", 1)
        object_size = check_int("object_size", 1)
        # Relational questions ("closest to X") need a second object.
        num_objects = check_int("num_objects", 2)
        if num_objects > len(self.colors):
            raise ValueError(
                f"WorldConfig.num_objects must be <= len(colors) = {len(self.colors)} "
                f"(one object per colour), got {num_objects}"
            )
        if self.min_objects is not None:
            min_objects = check_int("min_objects", 2)
            if min_objects > num_objects:
                raise ValueError(
                    f"WorldConfig.min_objects must be <= num_objects = {num_objects}, got {min_objects}"
                )
        if object_size < MIN_OBJECT_SIZE:
            raise ValueError(
                f"WorldConfig.object_size must be >= {MIN_OBJECT_SIZE} px (smaller shapes cannot be told apart), "
                f"got {object_size}"
            )
        if object_size > image_size:
            raise ValueError(
                f"WorldConfig.object_size must be <= image_size = {image_size}, got {object_size}"
            )
        # Up-front room check: each object claims a (size + gap)^2 patch of the
        # (image + gap)^2 canvas; random placement stalls well before the
        # packing limit, so ask for free room.
        density = num_objects * (object_size + GAP) ** 2 / (image_size + GAP) ** 2
        if density > MAX_DENSITY:
            smallest = math.ceil(math.sqrt(num_objects / MAX_DENSITY) * (object_size + GAP) - GAP)
            raise ValueError(
                f"WorldConfig.image_size = {image_size} is too small for {num_objects} objects of "
                f"object_size = {object_size}: they would cover {density:.0%} of the image (at most "
                f"{MAX_DENSITY:.0%} leaves room for random placement); use image_size >= {smallest}, "
                f"or fewer / smaller objects"
            )
        check_int("num_train", 1)
        check_int("num_val", 0)
        check_int("num_test", 0)
        check_int("seed", 0)
        num_questions = check_int("num_questions", 0)
        if num_questions % 2:
            raise ValueError(
                f"WorldConfig.num_questions must be even (half non-relational, half relational), got {num_questions}"
            )
        check_int("num_captions", 3)
        if self.num_captions > 12:
            raise ValueError(f"WorldConfig.num_captions must be <= 12, got {self.num_captions}")
        check_int("description_facts", 1)
        if self.description_facts > 12:
            raise ValueError(
                f"WorldConfig.description_facts must be <= 12, got {self.description_facts}"
            )
        if not self.description_kinds:
            raise ValueError(
                "WorldConfig.description_kinds must name at least one caption kind, got ()"
            )
        unknown = [k for k in self.description_kinds if k not in CAPTION_KINDS]
        if unknown or len(set(self.description_kinds)) != len(self.description_kinds):
            raise ValueError(
                f"WorldConfig.description_kinds must be distinct kinds among {CAPTION_KINDS}, "
                f"got {self.description_kinds}"
            )
        if self.description_facts > 1 and self.description_kinds == ("count",):
            raise ValueError(
                "WorldConfig.description_kinds = ('count',) gives one fact only; "
                f"add another kind or set description_facts = 1, got {self.description_facts}"
            )

    def key(self) -> str:
        """A short stable hash of every field (and the generator version), for cache names."""
        payload = json.dumps({"world_version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def split_size(self, split: str) -> int:
        """Number of scenes in ``split`` ("train" | "val" | "test")."""
        _check_split(split)
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def split_offset(self, split: str) -> int:
        """Global index of the split's first scene: train 0.., val after train, test after val."""
        _check_split(split)
        return {"train": 0, "val": self.num_train, "test": self.num_train + self.num_val}[split]


@dataclass(frozen=True, slots=True)
class SceneObject:
    color: str
    shape: str
    center: tuple[float, float]  # (x, y) pixels, origin top-left
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) pixels, x2/y2 exclusive, inside the image


@dataclass(frozen=True, slots=True)
class Question:
    text: str  # natural language, e.g. "what shape is the red object?"
    answer: str  # a word from answer_vocab(config)
    family: str  # one of QUESTION_FAMILIES ("vqa" for real corpora, see hub.py)
    relational: bool
    color: str  # the colour the question is about ("" for real corpora)


@dataclass
class Scene:
    """One sample of the world.

    ``image`` is ``(H, W, 3)`` uint8. ``index`` is the *global* index (train
    0..num_train-1, then val, then test), unique across splits; the position
    inside the split is ``index - config.split_offset(split)``. ``questions``
    holds the non-relational questions first, then the relational ones.
    """

    index: int  # global index (train 0.., val and test continue after, so unique)
    split: str  # "train" | "val" | "test"
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]
    captions: list[str]  # >= 3 distinct captions
    questions: list[Question]  # 20 per scene by default (non-relational first)
    description: str = ""  # several facts joined by "and", enough to single out the scene


# --------------------------------------------------------------------------- vocabularies


def answer_vocab(config: WorldConfig) -> list[str]:
    """Every possible answer: the shapes, "yes", "no", then the counts "1".."num_objects"."""
    return [*config.shapes, "yes", "no", *(str(i) for i in range(1, config.num_objects + 1))]


def class_names(config: WorldConfig) -> list[str]:
    """Detector classes, colour-major: ["red square", "red circle", "green square", ...]."""
    return [f"{c} {s}" for c in config.colors for s in config.shapes]


def class_index(config: WorldConfig, color: str, shape: str) -> int:
    """Index of ``"<color> <shape>"`` in :func:`class_names`."""
    if color not in config.colors:
        raise ValueError(f"color must be one of {config.colors}, got {color!r}")
    if shape not in config.shapes:
        raise ValueError(f"shape must be one of {config.shapes}, got {shape!r}")
    return config.colors.index(color) * len(config.shapes) + config.shapes.index(shape)


# --------------------------------------------------------------------------- randomness


class _Stream:
    """Uniform draws for one scene, buffered from a numpy Generator.

    One numpy call per 128 draws instead of one per draw (the per-call overhead
    dominates at this size). ``Generator.random`` is built on the PCG64 bit
    stream, so the draws are the same on every platform.
    """

    __slots__ = ("_rng", "_buf", "_pos")

    def __init__(self, seed: int, split_id: int, index: int) -> None:
        self._rng = np.random.default_rng([seed, split_id, index])
        self._buf: list[float] = []
        self._pos = 0

    def uniform(self) -> float:
        if self._pos == len(self._buf):
            self._buf = self._rng.random(128).tolist()
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return u

    def below(self, n: int) -> int:
        """An int uniform in ``[0, n)``."""
        return int(self.uniform() * n)


# --------------------------------------------------------------------------- layout


def _layout(
    config: WorldConfig, colors: list[str], split_id: int, stream: _Stream
) -> tuple[list[SceneObject], list[int], list[int]]:
    """Place one object per colour with no touching boxes and unambiguous closest/furthest.

    Objects are placed one by one at uniform free positions (rejection
    sampling). Where some object's closest or furthest neighbour is a near
    tie, one of the three objects involved is moved to a new free position,
    until no tie is left. Then shapes are drawn until the scene hashes to
    ``split_id`` (see :func:`split_of`). Returns the objects and, for each
    object, the index of its closest and of its furthest other object.
    """
    size, image_size = config.object_size, config.image_size
    span = image_size - size + 1  # top-left positions that keep the box inside

    def free_box(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
        for _ in range(_TRIES_PER_OBJECT):
            x1 = stream.below(span)
            y1 = stream.below(span)
            # A centre exactly on a midline makes "on the left" / "on the top" a coin flip.
            if 2 * x1 + size == image_size or 2 * y1 + size == image_size:
                continue
            x2, y2 = x1 + size, y1 + size
            for bx1, by1, bx2, by2 in boxes:
                if not (x1 >= bx2 + GAP or bx1 >= x2 + GAP or y1 >= by2 + GAP or by1 >= y2 + GAP):
                    break
            else:
                return x1, y1, x2, y2
        return None

    n = len(colors)
    for _ in range(_MAX_LAYOUTS):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            box = free_box(boxes)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) < n:
            continue  # no room left for an object: start again
        for _ in range(_MAX_MOVES):
            centers = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in boxes]
            closest, furthest, tie = _closest_and_furthest(centers)
            if tie is None:
                # Splits partition the space of scenes: a scene belongs to the
                # split its hash names, so no scene can be in two splits, in
                # any world (even a tiny one where random draws would repeat).
                shapes = config.shapes
                for _ in range(_SHAPE_DRAWS if len(shapes) > 1 else 1):
                    drawn = [shapes[stream.below(len(shapes))] for _ in range(n)]
                    if _partition(colors, drawn, boxes) == split_id:
                        objects = [
                            SceneObject(c, s, center, box)
                            for c, s, center, box in zip(colors, drawn, centers, boxes)
                        ]
                        return objects, closest, furthest
                break  # this layout belongs to another split: start again
            moved = tie[stream.below(3)]
            box = free_box(boxes[:moved] + boxes[moved + 1 :])
            if box is None:
                break
            boxes[moved] = box
    raise ValueError(
        f"WorldConfig.image_size = {image_size} gave no valid layout for {n} objects of object_size = {size} "
        f"after {_MAX_LAYOUTS} tries; use a larger image_size or fewer / smaller objects"
    )


def _closest_and_furthest(
    centers: list[tuple[float, float]],
) -> tuple[list[int], list[int], tuple[int, int, int] | None]:
    """For each centre, the index of its closest and of its furthest other centre.

    The third value is None, or ``(i, j, k)`` when object ``i``'s closest (or
    furthest) candidates ``j`` and ``k`` are less than ``TIE_MARGIN`` apart.
    """
    n = len(centers)
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        xi, yi = centers[i]
        for j in range(i + 1, n):
            xj, yj = centers[j]
            dist[i][j] = dist[j][i] = math.hypot(xi - xj, yi - yj)
    closest, furthest = [], []
    for i in range(n):
        others = sorted((dist[i][j], j) for j in range(n) if j != i)
        if len(others) > 1:
            if others[1][0] - others[0][0] < TIE_MARGIN:
                return closest, furthest, (i, others[0][1], others[1][1])
            if others[-1][0] - others[-2][0] < TIE_MARGIN:
                return closest, furthest, (i, others[-1][1], others[-2][1])
        closest.append(others[0][1])
        furthest.append(others[-1][1])
    return closest, furthest, None


def _partition(colors: list[str], shapes: list[str], boxes: list[tuple[int, int, int, int]]) -> int:
    # crc32 of a canonical string: stable across runs and machines (Python's hash() is salted).
    text = ";".join(f"{c},{s},{b[0]},{b[1]}" for c, s, b in zip(colors, shapes, boxes))
    return zlib.crc32(text.encode()) % len(SPLITS)


def split_of(objects: list[SceneObject]) -> str:
    """The split a scene with these objects belongs to (scenes are partitioned by a hash of their objects)."""
    return SPLITS[
        _partition([o.color for o in objects], [o.shape for o in objects], [o.box for o in objects])
    ]


# --------------------------------------------------------------------------- rendering


def render(objects: list[SceneObject], image_size: int) -> np.ndarray:
    """Draw ``objects`` on a white canvas; returns ``(image_size, image_size, 3)`` uint8.

    Shapes are drawn without anti-aliasing, so every pixel is either the
    background or exactly one palette colour, and each shape fills its box
    (edge to edge) and nothing outside it.
    """
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        if not (0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size):
            raise ValueError(
                f"box {obj.box} of the {obj.color} {obj.shape} is not inside a {image_size} px image"
            )
        rgb = PALETTE[obj.color]
        # PIL's shape boxes are inclusive, ours exclude x2/y2.
        if obj.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=rgb)
        elif obj.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=rgb)
        elif obj.shape == "triangle":
            draw.polygon(((x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)), fill=rgb)
        else:
            raise ValueError(f"shape must be one of {KNOWN_SHAPES}, got {obj.shape!r}")
    return np.array(img)


# --------------------------------------------------------------------------- answers


def answer(objects: list[SceneObject], family: str, color: str, image_size: int) -> str:
    """The answer to a ``family`` question about the ``color`` object, from the geometry alone.

    This is the reference rule (the generator precomputes the same values
    faster); it is what the book's exercises check a student's rule against.
    """
    by_color = {o.color: o for o in objects}
    if color not in by_color:
        raise ValueError(f"color {color!r} is not in the scene (present: {list(by_color)})")
    target = by_color[color]
    cx, cy = target.center
    if family == "shape":
        return target.shape
    if family == "left":
        return "yes" if cx < image_size / 2 else "no"
    if family == "top":
        return "yes" if cy < image_size / 2 else "no"
    if family in ("closest", "furthest"):
        others = [o for o in objects if o is not target]
        key = lambda o: math.hypot(o.center[0] - cx, o.center[1] - cy)  # noqa: E731
        pick = min(others, key=key) if family == "closest" else max(others, key=key)
        return pick.shape
    if family == "count":
        return str(sum(o.shape == target.shape for o in objects))
    raise ValueError(f"family must be one of {QUESTION_FAMILIES}, got {family!r}")


_QUESTION_TEXT: dict[tuple[str, int, str], str] = {}


def _question_text(family: str, template: int, color: str) -> str:
    key = (family, template, color)
    text = _QUESTION_TEXT.get(key)
    if text is None:
        text = _QUESTION_TEXT[key] = QUESTION_TEMPLATES[family][template].format(c=color)
    return text


def _questions(
    config: WorldConfig,
    objects: list[SceneObject],
    closest: list[int],
    furthest: list[int],
    stream: _Stream,
) -> list[Question]:
    """Sort-of-CLEVR sampling: per question a present colour and a family, uniformly."""
    half = config.num_questions // 2
    n = len(objects)
    left_of_mid = config.image_size / 2
    out = []
    for families, relational in ((NON_RELATIONAL_FAMILIES, False), (RELATIONAL_FAMILIES, True)):
        for _ in range(half):
            i = stream.below(n)
            family = families[stream.below(3)]
            template = stream.below(len(QUESTION_TEMPLATES[family]))
            obj = objects[i]
            if family == "shape":
                ans = obj.shape
            elif family == "left":
                ans = "yes" if obj.center[0] < left_of_mid else "no"
            elif family == "top":
                ans = "yes" if obj.center[1] < left_of_mid else "no"
            elif family == "closest":
                ans = objects[closest[i]].shape
            elif family == "furthest":
                ans = objects[furthest[i]].shape
            else:
                ans = str(sum(o.shape == obj.shape for o in objects))
            out.append(
                Question(
                    _question_text(family, template, obj.color), ans, family, relational, obj.color
                )
            )
    return out


# --------------------------------------------------------------------------- captions


def article(word: str) -> str:
    """The indefinite article before ``word``: "an orange", "a red"."""
    return "an" if word[0] in "aeiou" else "a"


def _a(obj: SceneObject) -> str:
    return f"{article(obj.color)} {obj.color} {obj.shape}"


def _the(obj: SceneObject) -> str:
    return f"the {obj.color} {obj.shape}"


def _np(obj: SceneObject, stream: _Stream) -> str:
    """A noun phrase for ``obj``: "a red circle" or "the red circle" (one object per colour, so both refer)."""
    return _the(obj) if stream.below(2) else _a(obj)


def _relation_caption(objects: list[SceneObject], stream: _Stream, i: int | None = None) -> str:
    """ "a red circle is left of the blue square" and friends, true by box separation.

    The relation is said along an axis where the two boxes do not overlap at
    all (one always exists, as boxes never touch), so it is visibly true, not
    just true of the centres. ``i`` picks the first object (random if None).
    """
    n = len(objects)
    if i is None:
        i = stream.below(n)
    j = (i + 1 + stream.below(n - 1)) % n
    a, b = objects[i], objects[j]
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    sep_x = ax2 <= bx1 or bx2 <= ax1
    sep_y = ay2 <= by1 or by2 <= ay1
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    horizontal = sep_x and (not sep_y or abs(dx) >= abs(dy))
    if horizontal:
        rel, inverse = ("left of", "right of") if dx > 0 else ("right of", "left of")
    else:
        rel, inverse = ("above", "below") if dy > 0 else ("below", "above")
    template = stream.below(4)
    if template == 0:
        return f"{_np(a, stream)} is {rel} {_np(b, stream)}"
    if template == 1:
        return f"{_np(b, stream)} is {inverse} {_np(a, stream)}"
    if template == 2:
        return f"there is {_a(a)} {rel} {_the(b)}"
    return f"{rel} {_the(b)} is {_a(a)}"


def _location_caption(
    objects: list[SceneObject], stream: _Stream, image_size: int, i: int | None = None
) -> str:
    """ "there is a gray square at the top right": the quadrant of the centre (of object ``i``, random if None)."""
    obj = objects[stream.below(len(objects)) if i is None else i]
    vertical = "top" if obj.center[1] < image_size / 2 else "bottom"
    horizontal = "left" if obj.center[0] < image_size / 2 else "right"
    template = stream.below(3)
    if template == 0:
        return f"there is {_a(obj)} at the {vertical} {horizontal}"
    if template == 1:
        return f"{_the(obj)} is in the {vertical} {horizontal} of the image"
    return f"at the {vertical} {horizontal} there is {_a(obj)}"


def _neighbour_caption(
    objects: list[SceneObject],
    neighbour: list[int],
    stream: _Stream,
    word: str,
    i: int | None = None,
) -> str:
    """ "the object closest to the yellow circle is a green square" (or furthest), about object ``i`` (random if None)."""
    if i is None:
        i = stream.below(len(objects))
    obj, other = objects[i], objects[neighbour[i]]
    near = word == "nearest"
    prep = "to" if near else "from"
    template = stream.below(3)
    if template == 0:
        return f"the object {'closest' if near else 'furthest'} {prep} {_the(obj)} is {_a(other)}"
    if template == 1:
        return f"{_the(other)} is the object {word} {prep} {_the(obj)}"
    return f"{word} {prep} {_the(obj)} is {_a(other)}"


def count_words(counts: dict[str, int], order: Sequence[str]) -> tuple[str, str]:
    """``(verb, list)`` of a count caption: ``("are", "two squares and four circles")``.

    Shapes are listed in ``order``, absent ones (count 0) left out; the verb
    agrees with the first item ("there is one square and five circles").
    """
    parts = []
    for shape in order:
        count = counts.get(shape, 0)
        if count:
            word = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
            parts.append(f"{word} {shape}{'s' if count > 1 else ''}")
    verb = "is" if parts and parts[0].startswith("one ") else "are"
    return verb, " and ".join(parts)


def _count_caption(objects: list[SceneObject], shapes: tuple[str, ...], stream: _Stream) -> str:
    """ "there are two squares and four circles": how many of each shape (absent shapes left out)."""
    verb, listed = count_words({s: sum(o.shape == s for o in objects) for s in shapes}, shapes)
    if stream.below(2):
        return f"there {verb} {listed}"
    return f"the image shows {listed}"


def _captions(
    config: WorldConfig,
    objects: list[SceneObject],
    closest: list[int],
    furthest: list[int],
    stream: _Stream,
) -> list[str]:
    # The first three kinds are a permutation of relation/location/nearest, so
    # every scene has at least three different captions that talk about space;
    # the rest are drawn from every kind.
    first = ["relation", "location", "nearest"]
    for k in (2, 1):  # Fisher-Yates
        j = stream.below(k + 1)
        first[k], first[j] = first[j], first[k]
    captions: list[str] = []
    seen: set[str] = set()
    for attempt in range(config.num_captions * 30):
        if len(captions) == config.num_captions:
            break
        kind = first[attempt] if attempt < 3 else CAPTION_KINDS[stream.below(len(CAPTION_KINDS))]
        if kind == "relation":
            text = _relation_caption(objects, stream)
        elif kind == "location":
            text = _location_caption(objects, stream, config.image_size)
        elif kind == "nearest":
            text = _neighbour_caption(objects, closest, stream, "nearest")
        elif kind == "farthest":
            text = _neighbour_caption(objects, furthest, stream, "farthest")
        else:
            text = _count_caption(objects, config.shapes, stream)
        if text not in seen:
            seen.add(text)
            captions.append(text)
    if (
        len(captions) < config.num_captions
    ):  # cannot happen with >= 2 objects; never return fewer silently
        raise RuntimeError(
            f"only {len(captions)} distinct captions for a scene, wanted {config.num_captions}"
        )
    return captions


def _description(
    config: WorldConfig,
    objects: list[SceneObject],
    closest: list[int],
    furthest: list[int],
    stream: _Stream,
) -> str:
    """Several facts about one scene joined by "and": a text true of this scene and (nearly always) no other.

    A short caption is true of many scenes (chapter 2 measures how many). A
    description takes ``config.description_facts`` facts; their kinds take
    turns in a random order of ``config.description_kinds``, and each fact is
    about another object while there are objects left, so together they pin
    down most of the layout. A count fact appears at most once.
    """
    kinds = list(config.description_kinds)
    for k in range(len(kinds) - 1, 0, -1):  # Fisher-Yates
        j = stream.below(k + 1)
        kinds[k], kinds[j] = kinds[j], kinds[k]
    anchors = list(range(len(objects)))
    for k in range(len(anchors) - 1, 0, -1):
        j = stream.below(k + 1)
        anchors[k], anchors[j] = anchors[j], anchors[k]
    facts: list[str] = []
    counted = False
    for turn in range(config.description_facts * 30):
        if len(facts) == config.description_facts:
            break
        kind = kinds[turn % len(kinds)]
        if kind == "count" and counted:
            continue
        # One object after another; if facts repeat (few objects), any object will do.
        i = anchors[len(facts) % len(anchors)] if turn < config.description_facts * 2 else None
        if kind == "relation":
            text = _relation_caption(objects, stream, i)
        elif kind == "location":
            text = _location_caption(objects, stream, config.image_size, i)
        elif kind == "nearest":
            text = _neighbour_caption(objects, closest, stream, "nearest", i)
        elif kind == "farthest":
            text = _neighbour_caption(objects, furthest, stream, "farthest", i)
        else:
            text = _count_caption(objects, config.shapes, stream)
            counted = True
        if text not in facts:
            facts.append(text)
    return " and ".join(facts)


# --------------------------------------------------------------------------- scenes


def _check_split(split: str) -> None:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def generate_scene(config: WorldConfig, index: int, split: str) -> Scene:
    """The scene at position ``index`` of ``split``, a pure function of ``(config.seed, split, index)``.

    ``index`` counts from 0 inside the split (``0 <= index < config.split_size(split)``);
    the returned ``Scene.index`` is the global index ``config.split_offset(split) + index``.
    """
    _check_split(split)
    try:
        index = operator.index(index)
    except TypeError:
        raise TypeError(f"index must be an int, got {type(index).__name__}") from None
    size = config.split_size(split)
    if not 0 <= index < size:
        raise ValueError(
            f"index must be in [0, {size}) for split {split!r} (the position inside the split), got {index}"
        )
    stream = _Stream(config.seed, _SPLIT_ID[split], index)

    colors = list(config.colors)
    n = (
        config.num_objects
        if config.min_objects is None
        else config.min_objects + stream.below(config.num_objects - config.min_objects + 1)
    )
    if n < len(colors):  # a uniform subset, kept in palette order
        for k in range(len(colors) - 1, 0, -1):
            j = stream.below(k + 1)
            colors[k], colors[j] = colors[j], colors[k]
        keep = set(colors[:n])
        colors = [c for c in config.colors if c in keep]

    objects, closest, furthest = _layout(config, colors, _SPLIT_ID[split], stream)
    image = render(objects, config.image_size)
    captions = _captions(config, objects, closest, furthest, stream)
    questions = _questions(config, objects, closest, furthest, stream)
    # Drawn last, so the images, captions and questions of a world are what they were before descriptions.
    description = _description(config, objects, closest, furthest, stream)
    return Scene(
        config.split_offset(split) + index, split, image, objects, captions, questions, description
    )


def iter_split(config: WorldConfig, split: str) -> Iterator[Scene]:
    """Scenes of ``split`` one at a time, in index order."""
    for i in range(config.split_size(split)):
        yield generate_scene(config, i, split)


def generate_split(config: WorldConfig, split: str) -> list[Scene]:
    """Every scene of ``split`` (9,800 default train scenes take about a second)."""
    return list(iter_split(config, split))


# --------------------------------------------------------------------------- helpers


def scene_key(scene: Scene) -> tuple[SceneObject, ...]:
    """What makes two scenes the same scene: their objects (colour, shape, position)."""
    return tuple(scene.objects)


def scene_to_dict(scene: Scene, include_image: bool = False) -> dict[str, Any]:
    """A JSON-able dict of the scene; the image as nested lists only if ``include_image``."""
    out: dict[str, Any] = {
        "index": scene.index,
        "split": scene.split,
        "image_shape": list(scene.image.shape),
        "objects": [
            {"color": o.color, "shape": o.shape, "center": list(o.center), "box": list(o.box)}
            for o in scene.objects
        ],
        "captions": list(scene.captions),
        "questions": [asdict(q) for q in scene.questions],
        "description": scene.description,
    }
    if include_image:
        out["image"] = scene.image.tolist()
    return out


def describe(scene: Scene) -> str:
    """A readable multi-line summary: objects, captions, questions with answers."""
    lines = [
        f"scene {scene.index} ({scene.split}), {len(scene.objects)} objects, image {scene.image.shape}"
    ]
    for o in scene.objects:
        lines.append(
            f"  {o.color:>6} {o.shape:<8} center ({o.center[0]:.1f}, {o.center[1]:.1f}) box {o.box}"
        )
    lines.append("captions:")
    lines += [f"  {c}" for c in scene.captions]
    lines.append("description:")
    lines.append(f"  {scene.description}")
    lines.append("questions:")
    for q in scene.questions:
        tag = "rel" if q.relational else "non-rel"
        lines.append(f"  [{tag:>7} {q.family:>8}] {q.text} -> {q.answer}")
    return "\n".join(lines)
