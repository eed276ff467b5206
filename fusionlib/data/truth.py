"""When is a caption true of a scene? The world's judge of every text (chapter 2).

A real dataset only knows which captions were *written* for an image. Our
world knows its geometry exactly, so it can judge any text against any image:
a generated caption, another image's caption, a caption a model wrote, a
caption with one word changed. The judge is what makes image-text matching
(ITM) negatives certainly false, hard negatives possible, and retrieval
scorable by what is true rather than by which image a caption came from.

The rules, followed by the generator (``fusionlib.data.shapes``) and by every
function here:

- **Objects.** A text names objects by colour and shape ("the red circle").
  A text that names an object the scene does not have is false. The article
  (a, an, the) does not matter: a world has one object per colour.
- **Relations.** "A is left of B" holds when A's box lies wholly on that side
  of B's box: ``A.x2 <= B.x1`` (boxes exclude ``x2``/``y2``, so boxes that
  touch still lie side by side); "right of" ``B.x2 <= A.x1``; "above"
  ``A.y2 <= B.y1`` (y grows downwards); "below" ``B.y2 <= A.y1``. A scene may
  make several relations true of one pair (up *and* left), and a pair whose
  boxes overlap on both axes makes none true. An object is never beside itself.
- **Nearest and farthest** are decided by the Euclidean distance between box
  centres. "The object nearest to A is B" holds when every other object is
  strictly farther from A than B is; a tie makes the claim false (it says
  *the* nearest).
- **Locations** are decided by the quadrant of the centre: "left" when
  ``x1 + x2 < W`` (the centre left of the vertical midline), "right" when
  ``x1 + x2 > W``; "top" when ``y1 + y2 < H``, "bottom" when ``y1 + y2 > H``.
  A centre exactly on a midline is in neither half.
- **Counts** must match for every shape: "there are two squares and four
  circles" is false if there is a triangle, and "there are six circles" says
  there is no square.
- **Descriptions** join several facts with "and"; a description is true when
  every fact is.

:func:`parse_caption` reads a text into a :class:`Fact` (what it claims, with
the words normalised: articles, word order, "closest"/"nearest",
"furthest"/"farthest", "grey", "upper"/"lower", "to the left of", digits).
:func:`is_true` applies the rules to one scene, the readable reference.
:func:`truth_matrix` judges many texts against many scenes at once, with the
facts and scenes encoded as integer tensors (:func:`encode_facts`,
:func:`encode_scenes`) and the rules written as tensor operations
(:func:`evaluate`); the tests check that it agrees with :func:`is_true` on
every pair. The same encodings travel in caption batches (``text_facts``,
``image_objects``), so a model's ITM step can judge its own negatives.

:func:`false_caption` draws a text false of a scene; :func:`minimal_edits`
changes one thing at a time (a colour, a shape, the relation, the roles, the
quadrant, a count) and keeps the edits that became false: the hard negatives
of chapter 4.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from .shapes import (
    CAPTION_KINDS,
    COLORS,
    KNOWN_SHAPES,
    NUMBER_WORDS,
    PALETTE,
    SHAPES,
    Scene,
    SceneObject,
    article,
    count_words,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Fact",
    "Edit",
    "EDIT_KINDS",
    "parse_caption",
    "parse_text",
    "is_true",
    "encode_facts",
    "encode_scenes",
    "evaluate",
    "truth_matrix",
    "false_caption",
    "minimal_edits",
]

RELATIONS = ("left of", "right of", "above", "below")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
EDIT_KINDS = ("color", "shape", "relation", "roles", "quadrant", "count")

# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Fact:
    """What one caption claims.

    ``kind`` is one of :data:`fusionlib.data.shapes.CAPTION_KINDS`. ``objects``
    are ``(colour, shape)`` pairs: ``(A, B)`` for a relation "A is
    <relation> B"; ``(A,)`` for a location; ``(anchor, other)`` for
    nearest/farthest, "other is the object nearest to anchor"; none for a
    count. ``relation`` is one of ``RELATIONS`` for a relation, one of
    ``QUADRANTS`` for a location, and "nearest"/"farthest" for those kinds.
    ``counts`` are ``(shape, n)`` for every shape a count names (any other
    shape is claimed absent).
    """

    kind: str
    objects: tuple[tuple[str, str], ...] = ()
    relation: str = ""
    counts: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CAPTION_KINDS:
            raise ValueError(f"Fact.kind must be one of {CAPTION_KINDS}, got {self.kind!r}")
        wanted = {"relation": 2, "location": 1, "nearest": 2, "farthest": 2, "count": 0}[self.kind]
        if len(self.objects) != wanted:
            raise ValueError(f"a {self.kind} fact names {wanted} object(s), got {self.objects!r}")
        for colour, shape in self.objects:
            if colour not in PALETTE:
                raise ValueError(
                    f"Fact.objects: unknown colour {colour!r}; known colours are {tuple(PALETTE)}"
                )
            if shape not in KNOWN_SHAPES:
                raise ValueError(
                    f"Fact.objects: unknown shape {shape!r}; known shapes are {KNOWN_SHAPES}"
                )
        allowed = {
            "relation": RELATIONS,
            "location": QUADRANTS,
            "nearest": ("nearest",),
            "farthest": ("farthest",),
            "count": ("",),
        }[self.kind]
        if self.relation not in allowed:
            raise ValueError(
                f"Fact.relation of a {self.kind} fact must be one of {allowed}, got {self.relation!r}"
            )
        if self.kind == "count":
            if not self.counts:
                raise ValueError("a count fact must count at least one shape, got counts=()")
            shapes = [s for s, _ in self.counts]
            if len(set(shapes)) != len(shapes) or any(s not in KNOWN_SHAPES for s in shapes):
                raise ValueError(
                    f"Fact.counts must name distinct shapes among {KNOWN_SHAPES}, got {self.counts!r}"
                )
            if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for _, n in self.counts):
                raise ValueError(f"Fact.counts must be non-negative ints, got {self.counts!r}")
        elif self.counts:
            raise ValueError(
                f"only a count fact has counts, got {self.counts!r} for a {self.kind} fact"
            )

    def text(self) -> str:
        """The fact in the generator's first template ("the red circle is left of the blue square")."""
        names = [f"the {c} {s}" for c, s in self.objects]
        if self.kind == "relation":
            return f"{names[0]} is {self.relation} {names[1]}"
        if self.kind == "location":
            return f"{names[0]} is in the {self.relation} of the image"
        if self.kind in ("nearest", "farthest"):
            prep = "to" if self.kind == "nearest" else "from"
            return f"{names[1]} is the object {self.kind} {prep} {names[0]}"
        verb, listed = count_words(dict(self.counts), [s for s, _ in self.counts])
        return f"there {verb} {listed}"


class Edit(NamedTuple):
    """One minimal edit of a text: its ``kind`` (one of :data:`EDIT_KINDS`) and the edited ``text``."""

    kind: str
    text: str


# --------------------------------------------------------------------------- reading text

_COLOUR_WORDS = {**{c: c for c in PALETTE}, "grey": "gray"}
_SHAPE_WORDS = {s: s for s in KNOWN_SHAPES}
_PLURAL_SHAPES = {f"{s}s": s for s in KNOWN_SHAPES}
_NUMBERS = {**{w: i for i, w in enumerate(NUMBER_WORDS)}, "zero": 0, "none": 0}
_SUPERLATIVES = {
    "nearest": "nearest",
    "closest": "nearest",
    "farthest": "farthest",
    "furthest": "farthest",
}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_DETERMINERS = ("a", "an", "the")
_PUNCTUATION = re.compile(r"[.,;:!?\"'()\-]+")


def _words(text: str) -> list[str]:
    """Lowercase words; punctuation and hyphens become spaces ("top-left." -> ["top", "left"])."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


@dataclass
class _Mention:
    """Where an object is named: the word positions of its determiner (or None), colour and shape."""

    det: int | None
    colour: int
    shape: int


@dataclass
class _Parsed:
    """A fact with the positions of its words, so an edit can change exactly one of them."""

    fact: Fact
    start: int
    end: int  # one past the last word
    mentions: list[_Mention] = field(default_factory=list)  # in the order of fact.objects
    relation_words: list[int] = field(
        default_factory=list
    )  # left/right/above/below, or nearest & co + to/from
    quadrant_words: tuple[int, int] | None = None  # (vertical, horizontal)
    count_verb: int | None = None  # "is"/"are" of "there is/are ..."
    count_span: tuple[int, int] | None = None  # the words of the count list


class _Reader:
    """A backtracking reader over the words of one text, remembering how far it got for the error."""

    def __init__(self, text: str):
        self.text = text
        self.words = _words(text)
        self.furthest = -1
        self.expected: list[str] = []

    def fail(self, pos: int, expected: str) -> None:
        if pos > self.furthest:
            self.furthest, self.expected = pos, [expected]
        elif pos == self.furthest and expected not in self.expected:
            self.expected.append(expected)

    def word(self, pos: int, options: Sequence[str] | dict, expected: str) -> int | None:
        if pos < len(self.words) and self.words[pos] in options:
            return pos + 1
        self.fail(pos, expected)
        return None

    def phrase(self, pos: int, *words: str) -> int | None:
        for w in words:
            nxt = self.word(pos, (w,), repr(w))
            if nxt is None:
                return None
            pos = nxt
        return pos

    def optional(self, pos: int, *words: str) -> int:
        end = self.phrase(pos, *words)
        return pos if end is None else end

    def error(self) -> ValueError:
        pos = max(self.furthest, 0)
        if pos >= len(self.words):
            where = "the text ended"
        else:
            where = f"word {pos + 1} is {self.words[pos]!r}"
        expected = " or ".join(self.expected) if self.expected else "a caption"
        return ValueError(f"cannot read {self.text!r}: expected {expected} but {where}")

    # --- pieces

    def mention(self, pos: int) -> tuple[_Mention, int] | None:
        det = None
        if pos < len(self.words) and self.words[pos] in _DETERMINERS:
            det, pos = pos, pos + 1
        c = self.word(pos, _COLOUR_WORDS, "a colour (" + ", ".join(PALETTE) + ")")
        if c is None:
            return None
        s = self.word(c, _SHAPE_WORDS, "a shape (" + ", ".join(KNOWN_SHAPES) + ")")
        if s is None:
            return None
        return _Mention(det, pos, c), s

    def relation(self, pos: int) -> tuple[str, int, int] | None:
        """left of / to the left of / on the left of / above / over / below / under / beneath."""
        w = self.words[pos] if pos < len(self.words) else ""
        if w in ("above", "over"):
            return "above", pos, pos + 1
        if w in ("below", "under", "beneath"):
            return "below", pos, pos + 1
        start = pos
        if w in ("to", "on") and pos + 1 < len(self.words) and self.words[pos + 1] == "the":
            start = pos + 2  # "to the left of", "on the left of"
        side = self.word(start, _HORIZONTAL, "a relation ('left of', 'right of', 'above', 'below')")
        if side is None:
            return None
        end = self.word(side, ("of",), "'of'")
        if end is None:
            return None
        return f"{self.words[start]} of", start, end

    def quadrant(self, pos: int) -> tuple[str, tuple[int, int], int] | None:
        v = self.word(pos, _VERTICAL, "'top' or 'bottom'")
        if v is None:
            return None
        h = self.word(v, _HORIZONTAL, "'left' or 'right'")
        if h is None:
            return None
        return f"{_VERTICAL[self.words[pos]]} {self.words[v]}", (pos, v), h

    def superlative(self, pos: int) -> tuple[str, list[int], int] | None:
        s = self.word(pos, _SUPERLATIVES, "'nearest', 'closest', 'farthest' or 'furthest'")
        if s is None:
            return None
        used = [pos]
        p = self.word(s, ("to", "from"), "'to' or 'from'")
        if p is not None:
            used.append(s)
            s = p
        return _SUPERLATIVES[self.words[pos]], used, s

    def number(self, pos: int) -> tuple[int, int] | None:
        w = self.words[pos] if pos < len(self.words) else ""
        if w in _NUMBERS:
            return _NUMBERS[w], pos + 1
        if w.isdigit():
            return int(w), pos + 1
        self.fail(pos, "a number")
        return None

    def count_list(self, pos: int) -> tuple[tuple[tuple[str, int], ...], int] | None:
        counts: list[tuple[str, int]] = []
        while True:
            n = self.number(pos)
            if n is None:
                return None
            value, p = n
            w = self.words[p] if p < len(self.words) else ""
            if w in _SHAPE_WORDS or w in _PLURAL_SHAPES:
                shape = _SHAPE_WORDS.get(w) or _PLURAL_SHAPES[w]
            else:
                self.fail(p, "a shape (" + ", ".join(KNOWN_SHAPES) + ")")
                return None
            if any(s == shape for s, _ in counts):
                self.fail(p, f"another shape than {shape!r} (already counted)")
                return None
            counts.append((shape, value))
            pos = p + 1
            # "and <number> <shape>" continues the list; no other fact starts with a number.
            if (
                pos + 1 < len(self.words)
                and self.words[pos] == "and"
                and (self.words[pos + 1] in _NUMBERS or self.words[pos + 1].isdigit())
            ):
                pos += 1
                continue
            return tuple(counts), pos

    # --- one fact: every template of the generator, and the same with other articles and synonyms

    def fact(self, pos: int) -> list[_Parsed]:
        """Every way to read one fact starting at ``pos`` (the caller keeps the ones it can continue)."""
        out: list[_Parsed] = []
        w = self.words

        def of_the_image(p: int) -> int:
            return self.optional(p, "of", "the", "image")

        # "there is|are <count list>" / "the image shows <count list>"
        for lead in (("there",), ("the", "image", "shows"), ("the", "image", "has")):
            p = self.phrase(pos, *lead)
            if p is None:
                continue
            verb = None
            if lead == ("there",):
                verb = p
                p = self.word(p, ("is", "are"), "'is' or 'are'")
                if p is None:
                    continue
            listed = self.count_list(p)
            if listed is not None:
                counts, end = listed
                out.append(
                    _Parsed(
                        Fact("count", counts=counts), pos, end, count_verb=verb, count_span=(p, end)
                    )
                )

        # "there is A <relation> B" / "there is A at|in the <quadrant> [of the image]"
        p = self.phrase(pos, "there", "is")
        if p is not None:
            m = self.mention(p)
            if m is not None:
                a, p2 = m
                r = self.relation(p2)
                if r is not None:
                    rel, rel_pos, p3 = r
                    m2 = self.mention(p3)
                    if m2 is not None:
                        b, end = m2
                        out.append(self._relation(rel, a, b, rel_pos, pos, end))
                p3 = self.word(p2, ("at", "in"), "'at' or 'in'")
                p3 = None if p3 is None else self.word(p3, ("the",), "'the'")
                if p3 is not None:
                    q = self.quadrant(p3)
                    if q is not None:
                        quad, qpos, end = q
                        out.append(self._location(quad, a, qpos, pos, of_the_image(end)))

        # "at|in the <quadrant> [of the image] there is A"
        p = self.word(pos, ("at", "in"), "'at' or 'in'")
        p = None if p is None else self.word(p, ("the",), "'the'")
        if p is not None:
            q = self.quadrant(p)
            if q is not None:
                quad, qpos, p2 = q
                p3 = self.phrase(of_the_image(p2), "there", "is")
                if p3 is not None:
                    m = self.mention(p3)
                    if m is not None:
                        a, end = m
                        out.append(self._location(quad, a, qpos, pos, end))

        # "<relation> B is A"
        r = self.relation(pos)
        if r is not None:
            rel, rel_pos, p = r
            pair = self.mention_is_mention(p)
            if pair is not None:
                b, a, end = pair
                out.append(self._relation(rel, a, b, rel_pos, pos, end))

        # "[the object] <nearest> to B is A"
        s = self.superlative(self.optional(pos, "the", "object"))
        if s is not None:
            kind, sup_pos, p = s
            pair = self.mention_is_mention(p)
            if pair is not None:
                anchor, other, end = pair
                out.append(self._neighbour(kind, anchor, other, sup_pos, pos, end))

        # "A is <relation> B" / "A is in|at the <quadrant> [of the image]" / "A is the object <nearest> to B"
        m = self.mention(pos)
        if m is not None:
            a, p = m
            p = self.word(p, ("is",), "'is'")
            if p is not None:
                r = self.relation(p)
                if r is not None:
                    rel, rel_pos, p2 = r
                    m2 = self.mention(p2)
                    if m2 is not None:
                        b, end = m2
                        out.append(self._relation(rel, a, b, rel_pos, pos, end))
                p2 = self.word(p, ("in", "at", "on"), "'in', 'at' or 'on'")
                p2 = None if p2 is None else self.word(p2, ("the",), "'the'")
                if p2 is not None:
                    q = self.quadrant(p2)
                    if q is not None:
                        quad, qpos, end = q
                        out.append(self._location(quad, a, qpos, pos, of_the_image(end)))
                s = self.superlative(self.optional(p, "the", "object"))
                if s is not None:
                    kind, sup_pos, p2 = s
                    m2 = self.mention(p2)
                    if m2 is not None:
                        anchor, end = m2
                        out.append(self._neighbour(kind, anchor, a, sup_pos, pos, end))
        # Every reading above starts at ``pos``; a word that starts none of them is the error's position.
        if not out and pos >= self.furthest:
            self.fail(pos, "the start of a caption")
        return out

    def _obj(self, m: _Mention) -> tuple[str, str]:
        return _COLOUR_WORDS[self.words[m.colour]], self.words[m.shape]

    def mention_is_mention(self, pos: int) -> tuple[_Mention, _Mention, int] | None:
        """ "<object> is <object>" from ``pos``: both mentions and the position after them."""
        m = self.mention(pos)
        if m is None:
            return None
        first, p = m
        p = self.word(p, ("is",), "'is'")
        m2 = None if p is None else self.mention(p)
        if m2 is None:
            return None
        return first, m2[0], m2[1]

    def _neighbour(
        self, kind: str, anchor: _Mention, other: _Mention, sup_pos: list[int], start: int, end: int
    ) -> _Parsed:
        return _Parsed(
            Fact(kind, (self._obj(anchor), self._obj(other)), kind),
            start,
            end,
            [anchor, other],
            sup_pos,
        )

    def _relation(
        self, rel: str, a: _Mention, b: _Mention, rel_pos: int, start: int, end: int
    ) -> _Parsed:
        # rel_pos: the direction word itself ("left", "above", ...), the one word a flip changes.
        return _Parsed(
            Fact("relation", (self._obj(a), self._obj(b)), rel), start, end, [a, b], [rel_pos]
        )

    def _location(
        self, quad: str, a: _Mention, qpos: tuple[int, int], start: int, end: int
    ) -> _Parsed:
        return _Parsed(
            Fact("location", (self._obj(a),), quad), start, end, [a], quadrant_words=qpos
        )

    def facts(self) -> list[_Parsed]:
        """The text as one or more facts joined by "and", read from the first word to the last."""
        if not self.words:
            raise ValueError(f"cannot read {self.text!r}: the text has no words")

        def from_(pos: int) -> list[_Parsed] | None:
            for reading in self.fact(pos):
                if reading.end == len(self.words):
                    return [reading]
                if self.words[reading.end] == "and":
                    rest = from_(reading.end + 1)
                    if rest is not None:
                        return [reading, *rest]
                else:
                    self.fail(reading.end, "'and' or the end of the text")
            return None

        readings = from_(0)
        if readings is None:
            raise self.error()
        return readings


def _parse(text: str) -> tuple[list[str], list[_Parsed]]:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _parse_cached(text)


@functools.lru_cache(maxsize=1 << 16)
def _parse_cached(text: str) -> tuple[list[str], list[_Parsed]]:
    # Datasets read each text twice (its facts, then its edits); callers never modify what comes back.
    reader = _Reader(text)
    return reader.words, reader.facts()


def parse_text(text: str) -> tuple[Fact, ...]:
    """Every fact of a caption or a description, in order.

    Raises ``ValueError`` quoting the text and naming the word where reading
    stopped and what was expected there.
    """
    return tuple(p.fact for p in _parse(text)[1])


def parse_caption(text: str) -> Fact:
    """The one fact a caption claims; a description of several facts raises (use :func:`parse_text`)."""
    facts = parse_text(text)
    if len(facts) != 1:
        raise ValueError(
            f"parse_caption reads one fact, but {text!r} holds {len(facts)}; use parse_text"
        )
    return facts[0]


# --------------------------------------------------------------------------- the rules, one scene at a time


def _scene_size(scene: Scene) -> tuple[int, int]:
    image = getattr(scene, "image", None)
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(
            f"scene.image must be an (H, W, 3) array, got "
            f"{getattr(image, 'shape', type(image).__name__)}"
        )
    return int(image.shape[1]), int(image.shape[0])


def _find(objects: Sequence[SceneObject], colour: str, shape: str) -> SceneObject | None:
    return next((o for o in objects if o.color == colour and o.shape == shape), None)


def _centre2(o: SceneObject) -> tuple[int, int]:
    """Twice the box centre, in whole pixels: comparisons stay exact."""
    x1, y1, x2, y2 = o.box
    return x1 + x2, y1 + y2


def _fact_holds(fact: Fact, objects: Sequence[SceneObject], width: int, height: int) -> bool:
    named = [_find(objects, c, s) for c, s in fact.objects]
    if any(o is None for o in named):
        return False  # names an object the scene does not have
    if fact.kind == "relation":
        a, b = named
        if a is b:
            return False
        ax1, ay1, ax2, ay2 = a.box
        bx1, by1, bx2, by2 = b.box
        return {
            "left of": ax2 <= bx1,
            "right of": bx2 <= ax1,
            "above": ay2 <= by1,
            "below": by2 <= ay1,
        }[fact.relation]
    if fact.kind == "location":
        (o,) = named
        cx2, cy2 = _centre2(o)
        vertical, horizontal = fact.relation.split()
        v_ok = cy2 < height if vertical == "top" else cy2 > height
        h_ok = cx2 < width if horizontal == "left" else cx2 > width
        return v_ok and h_ok
    if fact.kind in ("nearest", "farthest"):
        anchor, other = named
        if anchor is other:
            return False
        ax, ay = _centre2(anchor)

        def d2(o: SceneObject) -> int:
            x, y = _centre2(o)
            return (x - ax) ** 2 + (y - ay) ** 2

        target = d2(other)
        rest = [d2(o) for o in objects if o is not anchor and o is not other]
        return (
            all(d > target for d in rest)
            if fact.kind == "nearest"
            else all(d < target for d in rest)
        )
    claimed = dict(fact.counts)
    present = {o.shape for o in objects}
    return all(
        sum(o.shape == s for o in objects) == claimed.get(s, 0) for s in present | set(claimed)
    )


def is_true(caption: str | Fact | Sequence[Fact], scene: Scene) -> bool:
    """Is ``caption`` (a text, one :class:`Fact`, or the facts of a description) true of ``scene``?

    The reference implementation of the module's rules, one scene at a time;
    :func:`truth_matrix` is the fast version.
    """
    if isinstance(caption, str):
        facts: Sequence[Fact] = parse_text(caption)
    elif isinstance(caption, Fact):
        facts = (caption,)
    else:
        facts = tuple(caption)
        if not facts or not all(isinstance(f, Fact) for f in facts):
            raise TypeError(
                f"caption must be a str, a Fact or a non-empty sequence of Facts, got {caption!r}"
            )
    width, height = _scene_size(scene)
    return all(_fact_holds(f, scene.objects, width, height) for f in facts)


# --------------------------------------------------------------------------- the rules as tensors

_COLOUR_ID = {c: i for i, c in enumerate(PALETTE)}
_SHAPE_ID = {s: i for i, s in enumerate(KNOWN_SHAPES)}
_KIND_ID = {k: i for i, k in enumerate(CAPTION_KINDS)}
_RELATION_ID = {
    **{r: i for i, r in enumerate(RELATIONS)},
    **{q: i for i, q in enumerate(QUADRANTS)},
    "nearest": 0,
    "farthest": 0,
}
NO_FACT = -1  # kind of a padding row: true of everything
FACT_FIELDS = (
    "kind",
    "colour_a",
    "shape_a",
    "colour_b",
    "shape_b",
    "relation",
    *(f"count_{s}" for s in KNOWN_SHAPES),
)
OBJECT_FIELDS = ("present", "shape", "x1", "y1", "x2", "y2", "width", "height")


def encode_facts(
    texts: Sequence[str | Sequence[Fact]], num_facts: int | None = None
) -> "torch.Tensor":
    """Texts (or their facts) -> ``(N, K, len(FACT_FIELDS))`` long, one row per fact, ``K = num_facts``.

    A row holds the fact's kind, the colour and shape ids of its objects
    (indices into ``PALETTE`` and ``KNOWN_SHAPES``; -1 where unused), its
    relation or quadrant id and, for a count, the claimed number of every
    known shape. Texts with fewer than ``K`` facts are padded with rows of
    kind ``NO_FACT``, which are true of every scene. ``num_facts`` defaults to
    the most facts of any text.
    """
    import torch

    parsed = [parse_text(t) if isinstance(t, str) else tuple(t) for t in texts]
    longest = max((len(f) for f in parsed), default=1)
    K = longest if num_facts is None else num_facts
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"num_facts must be a positive int, got {num_facts!r}")
    if longest > K:
        raise ValueError(f"num_facts={K} is fewer than the {longest} facts of the longest text")
    out = torch.full(
        (len(parsed), K, len(FACT_FIELDS)), -1, dtype=torch.long
    )  # -1: no object, no relation
    out[:, :, 0] = NO_FACT
    out[:, :, 6:] = 0
    for n, facts in enumerate(parsed):
        for k, f in enumerate(facts):
            row = out[n, k]
            row[0] = _KIND_ID[f.kind]
            for j, (c, s) in enumerate(f.objects):
                row[1 + 2 * j] = _COLOUR_ID[c]
                row[2 + 2 * j] = _SHAPE_ID[s]
            row[5] = _RELATION_ID[f.relation] if f.relation else -1
            for s, n_s in f.counts:
                row[6 + _SHAPE_ID[s]] = n_s
    return out


def encode_scenes(scenes: Sequence[Scene]) -> "torch.Tensor":
    """Scenes -> ``(S, len(PALETTE), len(OBJECT_FIELDS))`` long: per colour slot, the object of that colour.

    A world has at most one object per colour, so slot ``c`` holds whether
    an object of colour ``PALETTE[c]`` is present, its shape id and box, and
    every slot the image's width and height. Whole pixels throughout, so
    the tensor rules compare exactly as :func:`is_true` does.
    """
    import torch

    out = np.zeros((len(scenes), len(PALETTE), len(OBJECT_FIELDS)), dtype=np.int64)
    for n, scene in enumerate(scenes):
        width, height = _scene_size(scene)
        out[n, :, 6] = width
        out[n, :, 7] = height
        for o in scene.objects:
            c = _COLOUR_ID[o.color]
            if out[n, c, 0]:
                raise ValueError(
                    f"scene {scene.index} has two {o.color} objects; the judge needs one per colour"
                )
            out[n, c, :6] = (1, _SHAPE_ID[o.shape], *o.box)
    return torch.from_numpy(out)


def _check_codes(facts: "torch.Tensor", objects: "torch.Tensor") -> None:
    import torch

    if (
        not isinstance(facts, torch.Tensor)
        or facts.dim() != 3
        or facts.shape[-1] != len(FACT_FIELDS)
        or facts.dtype != torch.long
    ):
        raise ValueError(
            f"facts must be a long (N, K, {len(FACT_FIELDS)}) tensor from encode_facts, got "
            f"{getattr(facts, 'dtype', type(facts).__name__)} {tuple(getattr(facts, 'shape', ()))}"
        )
    if (
        not isinstance(objects, torch.Tensor)
        or objects.dim() != 3
        or objects.dtype != torch.long
        or tuple(objects.shape[1:]) != (len(PALETTE), len(OBJECT_FIELDS))
    ):
        raise ValueError(
            f"objects must be a long (S, {len(PALETTE)}, {len(OBJECT_FIELDS)}) tensor from "
            f"encode_scenes, got {getattr(objects, 'dtype', type(objects).__name__)} "
            f"{tuple(getattr(objects, 'shape', ()))}"
        )


def evaluate(facts: "torch.Tensor", objects: "torch.Tensor") -> "torch.Tensor":
    """The rules on encoded texts and scenes: ``(N, K, F)`` facts x ``(S, P, O)`` objects -> ``(N, S)`` bool.

    Entry ``[n, s]`` is True when every fact of text ``n`` holds in scene
    ``s``. All pairs at once, on the tensors' device: a caption batch uses it
    to judge every (caption, image) pair of the batch before it picks ITM
    negatives. Each kind of fact is judged by its own rule, on the rows of
    that kind only; memory grows as ``N x K x S x P`` for nearest/farthest,
    so :func:`truth_matrix` calls it in chunks of texts.
    """
    import torch

    _check_codes(facts, objects)
    facts = facts.to(objects.device)
    N, K, _ = facts.shape
    S, P, _ = objects.shape
    f = facts.reshape(N * K, -1)  # (M, F), M = N * K
    kind = f[:, 0]
    obj = objects.to(torch.int32)  # pixels and ids: int32 is exact
    present, shape = obj[..., 0] == 1, obj[..., 1]  # (S, P)
    x1, y1, x2, y2 = obj[..., 2], obj[..., 3], obj[..., 4], obj[..., 5]
    width, height = obj[:, 0, 6], obj[:, 0, 7]  # (S,)
    cx2, cy2 = x1 + x2, y1 + y2  # twice the centres, whole pixels
    truth = torch.ones(N * K, S, dtype=torch.bool, device=objects.device)

    def exists(
        colour: "torch.Tensor", shape_id: "torch.Tensor"
    ) -> "torch.Tensor":  # (m,), (m,) -> (m, S)
        c = colour.clamp(min=0)
        return (colour >= 0)[:, None] & present[:, c].T & (shape[:, c].T == shape_id[:, None])

    def at(
        values: "torch.Tensor", colour: "torch.Tensor"
    ) -> "torch.Tensor":  # (S, P), (m,) -> (m, S)
        return values[:, colour.clamp(min=0)].T

    rows = torch.nonzero(kind == _KIND_ID["relation"]).squeeze(1)
    if len(rows):
        _, ca, sa, cb, sb, rel = f[rows, :6].unbind(-1)
        ok = exists(ca, sa) & exists(cb, sb) & (ca != cb)[:, None]
        beside = torch.stack(
            [
                at(x2, ca) <= at(x1, cb),
                at(x2, cb) <= at(x1, ca),  # left of, right of
                at(y2, ca) <= at(y1, cb),
                at(y2, cb) <= at(y1, ca),
            ]
        )  # above, below
        truth[rows] = ok & beside.gather(0, rel[None, :, None].expand(1, -1, S)).squeeze(0)

    rows = torch.nonzero(kind == _KIND_ID["location"]).squeeze(1)
    if len(rows):
        _, ca, sa, _, _, quad = f[rows, :6].unbind(-1)
        cx, cy = at(cx2, ca), at(cy2, ca)
        top, bottom, left, right = cy < height, cy > height, cx < width, cx > width
        quadrant = torch.stack([top & left, top & right, bottom & left, bottom & right])
        truth[rows] = exists(ca, sa) & quadrant.gather(
            0, quad[None, :, None].expand(1, -1, S)
        ).squeeze(0)

    for name in ("nearest", "farthest"):
        rows = torch.nonzero(kind == _KIND_ID[name]).squeeze(1)
        if not len(rows):
            continue
        _, ca, sa, cb, sb, _ = f[rows, :6].unbind(-1)
        ok = exists(ca, sa) & exists(cb, sb) & (ca != cb)[:, None]
        dx = cx2[None] - at(cx2, ca)[..., None]  # (m, S, P)
        dy = cy2[None] - at(cy2, ca)[..., None]
        d2 = dx * dx + dy * dy  # squared, exact in int32
        target = d2.gather(-1, cb.clamp(min=0)[:, None, None].expand(-1, S, 1))  # (m, S, 1)
        slots = torch.arange(P, device=objects.device)
        others = present[None] & (slots != ca[:, None])[:, None] & (slots != cb[:, None])[:, None]
        beaten = (d2 > target) if name == "nearest" else (d2 < target)
        truth[rows] = ok & (beaten | ~others).all(-1)

    rows = torch.nonzero(kind == _KIND_ID["count"]).squeeze(1)
    if len(rows):
        shape_of = torch.where(present, shape, torch.full_like(shape, -1))
        scene_counts = torch.stack(
            [(shape_of == s).sum(-1) for s in range(len(KNOWN_SHAPES))], dim=-1
        )  # (S, shapes)
        truth[rows] = (scene_counts[None] == f[rows, 6:, None].transpose(1, 2)).all(-1)
    return truth.view(N, K, S).all(dim=1)


def truth_matrix(
    captions: Sequence[str], scenes: Sequence[Scene], chunk: int = 64
) -> "torch.Tensor":
    """``(len(captions), len(scenes))`` bool: is caption ``i`` true of scene ``j``?

    Captions may be short captions or descriptions; each distinct text is
    read once. Vectorised over scenes and over ``chunk`` texts at a time
    (about 1 s for 1,000 captions x 10,000 scenes on one core; ``python -m
    fusionlib.bench data``). Agrees with :func:`is_true` on every pair (tested).
    """
    import torch

    if isinstance(captions, str):
        raise TypeError(
            "captions must be a sequence of texts, got a single string (wrap it in a list)"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    position: dict[str, int] = {}
    which = [position.setdefault(t, len(position)) for t in captions]
    if not captions or not scenes:
        return torch.zeros(len(captions), len(scenes), dtype=torch.bool)
    distinct = list(position)
    facts = encode_facts(distinct)
    objects = encode_scenes(scenes)
    rows = [evaluate(facts[i : i + chunk], objects) for i in range(0, len(distinct), chunk)]
    return torch.cat(rows)[torch.tensor(which)]


# --------------------------------------------------------------------------- negatives


def false_caption(
    scene: Scene,
    pool: Sequence[str],
    generator: np.random.Generator | "torch.Generator",
    max_tries: int = 1_000,
) -> str:
    """A text drawn uniformly from ``pool`` that is false of ``scene`` (an ITM negative that is certainly wrong).

    ``generator`` is a ``numpy.random.Generator`` or a CPU ``torch.Generator``.
    Draws until a false one comes up; raises ``ValueError`` when ``pool`` holds
    no text false of the scene (checked exactly, not by giving up early).
    """
    import torch

    if isinstance(pool, str) or len(pool) == 0:
        raise ValueError(f"pool must be a non-empty sequence of texts, got {pool!r:.80}")

    def draw() -> int:
        if isinstance(generator, np.random.Generator):
            return int(generator.integers(len(pool)))
        if isinstance(generator, torch.Generator):
            return int(torch.randint(len(pool), (1,), generator=generator))
        raise TypeError(
            f"generator must be a numpy.random.Generator or torch.Generator, got {type(generator).__name__}"
        )

    for _ in range(max_tries):
        text = pool[draw()]
        if not is_true(text, scene):
            return text
    # Many draws were all true: look at the whole pool before calling it impossible, then draw among the false.
    false = [k for k, t in enumerate(pool) if not is_true(t, scene)]
    if not false:
        raise ValueError(
            f"pool holds no text that is false of scene {scene.index} ({len(pool)} texts)"
        )
    if isinstance(generator, np.random.Generator):
        return pool[false[int(generator.integers(len(false)))]]
    return pool[false[int(torch.randint(len(false), (1,), generator=generator))]]


def minimal_edits(
    caption: str, scene: Scene, colors: Sequence[str] = COLORS, shapes: Sequence[str] = SHAPES
) -> list[Edit]:
    """Every text that differs from ``caption`` in one thing and is false of ``scene``.

    One thing at a time, in one fact (for a description, the other facts
    stay as they are):

    - ``color``: one object's colour becomes another of ``colors`` (never the
      colour of the other object the fact names);
    - ``shape``: one object's shape becomes another of ``shapes``;
    - ``relation``: left <-> right, above <-> below, nearest <-> farthest;
    - ``roles``: the two objects of a relation or of nearest/farthest swap
      places (same words, another order: what a bag of words cannot see);
    - ``quadrant``: the location moves to each other quadrant;
    - ``count``: one object moves from one shape to another (the total stays).

    Words are replaced where they stand and articles follow ("a red" ->
    "an orange"), so an edit reads like a caption of the same template.
    Edits that stay true of the scene are dropped, and so are repeats.
    ``colors``/``shapes`` are the world's (default: Sort-of-CLEVR's).
    """
    words, parsed = _parse(caption)
    original = " ".join(words)
    width, height = _scene_size(scene)
    facts = [p.fact for p in parsed]
    holds = [_fact_holds(f, scene.objects, width, height) for f in facts]
    out: list[Edit] = []
    seen = {original}

    def keep(kind: str, new_words: list[str], k: int, new_fact: Fact) -> None:
        text = " ".join(new_words)
        if text in seen:
            return
        others_hold = all(h for j, h in enumerate(holds) if j != k)
        if others_hold and _fact_holds(new_fact, scene.objects, width, height):
            return  # still true: not a negative
        seen.add(text)
        out.append(Edit(kind, text))

    def with_article(ws: list[str], m: _Mention) -> list[str]:
        if m.det is not None and ws[m.det] in ("a", "an"):
            ws[m.det] = article(ws[m.colour])
        return ws

    for k, p in enumerate(parsed):
        f = p.fact
        # colour and shape of each named object
        for j, m in enumerate(p.mentions):
            colour, shape = f.objects[j]
            others = {c for i, (c, _) in enumerate(f.objects) if i != j}
            for c in colors:
                if c == colour or c in others:
                    continue  # a fact about one object twice would give itself away
                ws = list(words)
                ws[m.colour] = c
                objs = list(f.objects)
                objs[j] = (c, shape)
                keep(
                    "color", with_article(ws, m), k, Fact(f.kind, tuple(objs), f.relation, f.counts)
                )
            for s in shapes:
                if s == shape:
                    continue
                ws = list(words)
                ws[m.shape] = s
                objs = list(f.objects)
                objs[j] = (colour, s)
                keep("shape", ws, k, Fact(f.kind, tuple(objs), f.relation, f.counts))
        if f.kind == "relation":
            flipped = {
                "left of": "right of",
                "right of": "left of",
                "above": "below",
                "below": "above",
            }[f.relation]
            ws = list(words)
            w = ws[p.relation_words[0]]
            ws[p.relation_words[0]] = {
                "left": "right",
                "right": "left",
                "above": "below",
                "below": "above",
                "over": "under",
                "under": "over",
                "beneath": "above",
            }[w]
            keep("relation", ws, k, Fact("relation", f.objects, flipped))
        if f.kind in ("nearest", "farthest"):
            ws = list(words)
            sup = p.relation_words[0]
            ws[sup] = {
                "nearest": "farthest",
                "closest": "furthest",
                "farthest": "nearest",
                "furthest": "closest",
            }[ws[sup]]
            if len(p.relation_words) > 1:
                prep = p.relation_words[1]
                ws[prep] = {"to": "from", "from": "to"}[ws[prep]]
            other_kind = "farthest" if f.kind == "nearest" else "nearest"
            keep("relation", ws, k, Fact(other_kind, f.objects, other_kind))
        if f.kind in ("relation", "nearest", "farthest"):
            a, b = p.mentions
            ws = list(words)
            ws[a.colour], ws[b.colour] = words[b.colour], words[a.colour]
            ws[a.shape], ws[b.shape] = words[b.shape], words[a.shape]
            with_article(with_article(ws, a), b)
            keep("roles", ws, k, Fact(f.kind, (f.objects[1], f.objects[0]), f.relation))
        if f.kind == "location":
            v, h = p.quadrant_words
            for quad in QUADRANTS:
                if quad == f.relation:
                    continue
                vertical, horizontal = quad.split()
                ws = list(words)
                upper_lower = words[v] in ("upper", "lower")  # keep the text's own wording
                ws[v] = {"top": "upper", "bottom": "lower"}[vertical] if upper_lower else vertical
                ws[h] = horizontal
                keep("quadrant", ws, k, Fact("location", f.objects, quad))
        if f.kind == "count":
            counts = dict(f.counts)
            order = list(shapes) + [
                s for s in counts if s not in shapes
            ]  # the generator lists in world order
            for src in shapes:
                for dst in shapes:
                    if src == dst or counts.get(src, 0) < 1:
                        continue
                    new = dict(counts)
                    new[src] -= 1
                    new[dst] = new.get(dst, 0) + 1
                    start, end = p.count_span
                    verb, listed = count_words(new, order)
                    ws = words[:start] + listed.split() + words[end:]
                    if p.count_verb is not None:
                        ws[p.count_verb] = verb
                    new_fact = Fact("count", counts=tuple((s, n) for s, n in new.items() if n))
                    keep("count", ws, k, new_fact)
    return out
