"""Tests for the world's truth judge (fusionlib.data.truth, chapter 2).

Hand-built scenes pin each rule, boundaries included; the generator's own
texts must all be true; the vectorised judge must agree with the one-scene
reference on every pair; negatives must be false.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch

from fusionlib.data import shapes as S
from fusionlib.data import truth as T
from fusionlib.data.shapes import SceneObject, WorldConfig

W = 75


def obj(color: str, shape: str, x1: int, y1: int, size: int = 10) -> SceneObject:
    box = (x1, y1, x1 + size, y1 + size)
    return SceneObject(color, shape, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), box)


def scene(*objects: SceneObject, size: int = W) -> S.Scene:
    return S.Scene(0, "test", np.full((size, size, 3), 255, np.uint8), list(objects), [], [])


def judge(text: str, sc: S.Scene) -> bool:
    """Both judges, which must agree on every hand-built case."""
    fast = bool(T.truth_matrix([text], [sc])[0, 0])
    slow = T.is_true(text, sc)
    assert fast == slow, (text, fast, slow)
    return slow


# ----------------------------------------------------------------------------- the rules, by hand


def test_relations_need_the_whole_box_on_that_side():
    # red x 0..10, blue x 10..20: the boxes touch (x2 is exclusive), so red lies wholly left of blue.
    touching = scene(obj("red", "square", 0, 0), obj("blue", "circle", 10, 30))
    assert judge("the red square is left of the blue circle", touching)
    assert judge("the blue circle is right of the red square", touching)
    assert not judge("the red square is right of the blue circle", touching)
    assert judge(
        "the red square is above the blue circle", touching
    )  # y 0..10 vs 30..40: also above
    assert judge("the blue circle is below the red square", touching)
    # one pixel of overlap in x: no longer left of, still above
    overlap = scene(obj("red", "square", 0, 0), obj("blue", "circle", 9, 30))
    assert not judge("the red square is left of the blue circle", overlap)
    assert not judge("the blue circle is right of the red square", overlap)
    assert judge("the red square is above the blue circle", overlap)
    # overlapping on both axes: no relation holds either way
    both = scene(obj("red", "square", 0, 0), obj("blue", "circle", 5, 5))
    for rel in T.RELATIONS:
        assert not judge(f"the red square is {rel} the blue circle", both)
        assert not judge(f"the blue circle is {rel} the red square", both)
    # an object is never beside itself
    assert not judge("the red square is left of the red square", touching)


def test_locations_use_the_quadrant_of_the_centre():
    sc = scene(
        obj("red", "square", 0, 0), obj("blue", "circle", 60, 60), obj("gray", "square", 30, 5)
    )
    assert judge("there is a red square at the top left", sc)
    assert judge("the blue circle is in the bottom right of the image", sc)
    assert not judge("there is a red square at the top right", sc)
    # gray: x 30..40, centre 35 < 37.5 -> left half although the box crosses the midline
    assert judge("at the top left there is a gray square", sc)
    # a centre exactly on the vertical midline (x 20..55 has centre 37.5 = W/2): neither half
    mid = scene(obj("green", "circle", 20, 0, size=35))
    assert not judge("the green circle is in the top left of the image", mid)
    assert not judge("the green circle is in the top right of the image", mid)
    # odd width: W = 76, centre 38 is the midline
    even = scene(obj("green", "circle", 33, 0), size=76)
    assert not judge("there is a green circle at the top left", even)
    assert not judge("there is a green circle at the top right", even)


def test_nearest_and_farthest_use_centre_distance_and_a_tie_is_false():
    sc = scene(
        obj("red", "square", 0, 0),
        obj("blue", "circle", 20, 0),
        obj("gray", "square", 0, 40),
        obj("green", "circle", 60, 60),
    )
    assert judge("the object nearest to the red square is a blue circle", sc)
    assert judge("the blue circle is the object closest to the red square", sc)
    assert judge("farthest from the red square is a green circle", sc)
    assert not judge("the object nearest to the red square is a gray square", sc)
    assert not judge("the object nearest to the red square is a red square", sc)  # never itself
    # blue and gray at the same distance (20 px) from red: "the nearest" is false for both
    tie = scene(
        obj("red", "square", 0, 0),
        obj("blue", "circle", 20, 0),
        obj("gray", "square", 0, 20),
        obj("green", "circle", 60, 60),
    )
    assert not judge("the object nearest to the red square is a blue circle", tie)
    assert not judge("the object nearest to the red square is a gray square", tie)
    assert judge("the object farthest from the red square is a green circle", tie)


def test_counts_must_match_for_every_shape():
    sc = scene(
        obj("red", "square", 0, 0), obj("blue", "circle", 20, 0), obj("gray", "circle", 40, 0)
    )
    assert judge("there is one square and two circles", sc)
    assert judge("the image shows 1 square and 2 circles", sc)
    assert judge("there are two circles and one square", sc)  # any order
    assert not judge("there are two circles", sc)  # says: no square
    assert not judge("there is one square and three circles", sc)
    assert not judge("there is one square and two circles and one triangle", sc)
    assert judge("there is one square and two circles and no triangles", sc)


def test_a_text_naming_a_missing_object_is_false():
    sc = scene(obj("red", "square", 0, 0), obj("blue", "circle", 40, 40))
    assert not judge("the red circle is above the blue circle", sc)  # red is a square
    assert not judge("the yellow square is above the blue circle", sc)  # no yellow object
    assert not judge("there is a purple square at the top left", sc)
    assert judge("the red square is above the blue circle", sc)


def test_descriptions_hold_when_every_fact_does():
    sc = scene(obj("red", "square", 0, 0), obj("blue", "circle", 40, 40))
    assert judge(
        "the red square is above the blue circle and there is a blue circle at the bottom right", sc
    )
    assert not judge(
        "the red square is above the blue circle and there is a blue circle at the top right", sc
    )
    assert judge(
        "there is one square and one circle and the red square is left of the blue circle", sc
    )


def test_reading_is_forgiving_of_articles_synonyms_and_punctuation():
    reference = T.parse_caption("the red circle is left of the blue square")
    for text in (
        "A red circle is to the left of a blue square.",
        "the red circle is on the left of the blue square",
        "There is a red circle left of the blue square",
        "left of the blue square is a red circle",
        "  THE  RED CIRCLE IS LEFT OF THE BLUE SQUARE!  ",
    ):
        assert T.parse_caption(text) == reference, text
    assert T.parse_caption("the grey square is in the upper-left of the image") == T.Fact(
        "location", (("gray", "square"),), "top left"
    )
    near = T.Fact("nearest", (("red", "circle"), ("blue", "square")), "nearest")
    for text in (
        "the object closest to the red circle is a blue square",
        "nearest to the red circle is a blue square",
        "the blue square is the object nearest to the red circle",
        "the blue square is closest to the red circle",
    ):
        assert T.parse_caption(text) == near, text
    assert T.parse_caption("there are 2 squares and 4 circles") == T.Fact(
        "count", counts=(("square", 2), ("circle", 4))
    )
    assert T.parse_caption(near.text()) == near
    for fact in (
        reference,
        T.Fact("count", counts=(("circle", 1),)),
        T.parse_caption("there is a red circle at the top left"),
    ):
        assert T.parse_caption(fact.text()) == fact


@pytest.mark.parametrize(
    "text, where",
    [
        ("the red circle is lft of the blue square", "word 5 is 'lft'"),
        ("the red hexagon is left of the blue square", "word 3 is 'hexagon'"),
        ("the magenta circle is left of the blue square", "word 2 is 'magenta'"),
        ("the red circle is left of", "the text ended"),
        ("the red circle is left of the blue square and", "the text ended"),
        ("the red circle is left of the blue square but so what", "word 10 is 'but'"),
        ("", "has no words"),
    ],
)
def test_parse_errors_quote_the_text_and_say_where(text, where):
    with pytest.raises(ValueError) as err:
        T.parse_text(text)
    message = str(err.value)
    assert repr(text) in message and where in message, message


def test_parse_caption_wants_one_fact():
    with pytest.raises(ValueError, match="parse_text"):
        T.parse_caption(
            "there is a red circle at the top left and there is a blue square at the top right"
        )


def test_facts_refuse_nonsense():
    with pytest.raises(ValueError, match="kind"):
        T.Fact("colour")
    with pytest.raises(ValueError, match="2 object"):
        T.Fact("relation", (("red", "circle"),), "left of")
    with pytest.raises(ValueError, match="relation"):
        T.Fact("relation", (("red", "circle"), ("blue", "square")), "inside")
    with pytest.raises(ValueError, match="colour"):
        T.Fact("location", (("teal", "circle"),), "top left")


# ----------------------------------------------------------------------------- the generator's texts


def scenes_of(config: WorldConfig) -> list[S.Scene]:
    return [s for split in S.SPLITS for s in S.generate_split(config, split)]


def own_truth(texts_per_scene: list[list[str]], scenes: list[S.Scene]) -> torch.Tensor:
    """Is every text true of the scene it was written for? Judged in chunks of scenes with truth_matrix."""
    ok = []
    for start in range(0, len(scenes), 250):
        chunk = scenes[start : start + 250]
        texts = [t for k in range(len(chunk)) for t in texts_per_scene[start + k]]
        owner = torch.tensor([k for k in range(len(chunk)) for _ in texts_per_scene[start + k]])
        ok.append(T.truth_matrix(texts, chunk)[torch.arange(len(texts)), owner])
    return torch.cat(ok)


@pytest.fixture(scope="module")
def default_world() -> list[S.Scene]:
    return scenes_of(WorldConfig())


def test_every_caption_and_description_of_the_default_world_is_true(default_world):
    assert len(default_world) == 10_500
    assert bool(own_truth([s.captions for s in default_world], default_world).all())
    assert bool(own_truth([[s.description] for s in default_world], default_world).all())


@pytest.mark.parametrize(
    "config",
    [
        WorldConfig(
            image_size=96,
            object_size=12,
            shapes=("square", "circle", "triangle"),
            num_train=80,
            num_val=20,
            num_test=20,
            seed=3,
            description_kinds=("count", "relation", "location"),
        ),
        WorldConfig(
            min_objects=2, num_train=150, num_val=20, num_test=20, seed=5, description_facts=7
        ),
        WorldConfig(
            image_size=64,
            object_size=8,
            num_objects=10,
            colors=tuple(S.PALETTE),
            num_train=60,
            num_val=10,
            num_test=10,
            num_captions=8,
        ),
    ],
)
def test_every_text_is_true_in_other_worlds_too(config):
    scenes = scenes_of(config)
    for s in scenes:
        for text in [*s.captions, s.description]:
            assert T.is_true(text, s), (text, S.describe(s))
    assert bool(own_truth([s.captions for s in scenes], scenes).all())
    assert bool(own_truth([[s.description] for s in scenes], scenes).all())


def test_descriptions_single_out_their_test_image(default_world):
    test = [s for s in default_world if s.split == "test"]
    matrix = T.truth_matrix([s.description for s in test], test)
    alone = (matrix.sum(dim=1) == 1).float().mean().item()
    assert alone >= 0.95, alone
    captions = [c for s in test for c in s.captions]
    fits = T.truth_matrix(captions, test).sum(dim=1)
    assert int(fits.min()) >= 2  # no short caption singles out its image


def test_descriptions_follow_the_config():
    config = WorldConfig(
        num_train=30, num_val=0, num_test=0, description_facts=3, description_kinds=("location",)
    )
    for s in S.generate_split(config, "train"):
        facts = T.parse_text(s.description)
        assert len(facts) == 3 and {f.kind for f in facts} == {"location"}
        assert len({f.objects for f in facts}) == 3  # one object after another
    with pytest.raises(ValueError, match=r"WorldConfig\.description_kinds"):
        WorldConfig(description_kinds=("colour",))
    with pytest.raises(ValueError, match=r"WorldConfig\.description_facts"):
        WorldConfig(description_facts=0)


# ----------------------------------------------------------------------------- vectorised = reference


def test_truth_matrix_equals_is_true_on_every_pair():
    config = WorldConfig(num_train=250, num_val=25, num_test=25, seed=11)
    scenes = scenes_of(config)
    assert len(scenes) == 300
    texts = [c for s in scenes for c in s.captions] + [s.description for s in scenes[:60]]
    # false texts of every kind too: edits of the first scenes' captions
    texts += [e.text for s in scenes[:20] for c in s.captions for e in T.minimal_edits(c, s)]
    matrix = T.truth_matrix(texts, scenes)
    facts = {t: T.parse_text(t) for t in texts}
    reference = torch.tensor([[T.is_true(facts[t], s) for s in scenes] for t in texts])
    assert matrix.dtype == torch.bool and matrix.shape == (len(texts), 300)
    assert torch.equal(matrix, reference)
    assert 0.02 < reference.float().mean() < 0.5  # both answers occur often


def test_truth_matrix_is_fast_enough():
    scenes = S.generate_split(WorldConfig(num_train=10_000), "train")
    captions = [c for s in scenes[:200] for c in s.captions]
    with torch.inference_mode():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            start = time.perf_counter()
            matrix = T.truth_matrix(captions, scenes)
            seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
    assert matrix.shape == (1_000, 10_000)
    assert seconds < 4.0, seconds  # 2 s is the budget on a quiet core; CI machines are shared


def test_encoded_inputs_are_checked():
    sc = scene(obj("red", "square", 0, 0))
    facts, objects = (
        T.encode_facts(["there is a red square at the top left"]),
        T.encode_scenes([sc]),
    )
    assert facts.shape == (1, 1, len(T.FACT_FIELDS)) and objects.shape == (
        1,
        len(S.PALETTE),
        len(T.OBJECT_FIELDS),
    )
    assert bool(T.evaluate(facts, objects)[0, 0])
    with pytest.raises(ValueError, match="facts must be a long"):
        T.evaluate(facts.float(), objects)
    with pytest.raises(ValueError, match="objects must be a long"):
        T.evaluate(facts, objects[:, :3])
    with pytest.raises(ValueError, match="num_facts"):
        T.encode_facts(
            [
                "there is a red square at the top left and the red square is in the top left of the image"
            ],
            num_facts=1,
        )
    padded = T.encode_facts(["there is a red square at the top left"], num_facts=3)
    assert bool(T.evaluate(padded, objects)[0, 0])  # padding rows are true of everything
    with pytest.raises(TypeError, match="single string"):
        T.truth_matrix("there is a red square at the top left", [sc])


# ----------------------------------------------------------------------------- negatives


def test_minimal_edits_produce_every_kind_and_all_are_false():
    config = WorldConfig(num_train=120, num_val=0, num_test=0, seed=2)
    scenes = S.generate_split(config, "train")
    kinds = Counter()
    for s in scenes:
        for text in [*s.captions, s.description]:
            original = T.parse_text(text)
            edits = T.minimal_edits(text, s)
            assert len({e.text for e in edits}) == len(edits) and text not in {
                e.text for e in edits
            }
            for e in edits:
                assert e.kind in T.EDIT_KINDS
                assert not T.is_true(e.text, s), (text, e)
                edited = T.parse_text(e.text)
                assert len(edited) == len(original)
                assert sum(a != b for a, b in zip(original, edited)) == 1, (
                    text,
                    e,
                )  # one fact changed
                assert (
                    len(e.text.split()) == len(text.split()) or e.kind == "count"
                )  # words replaced in place
                kinds[e.kind] += 1
    assert set(kinds) == set(T.EDIT_KINDS), kinds


def test_each_edit_kind_changes_what_it_says():
    sc = scene(
        obj("red", "square", 0, 0),
        obj("orange", "circle", 40, 0),
        obj("blue", "circle", 0, 50),
        obj("gray", "square", 20, 60),
    )
    edits = T.minimal_edits("a red square is left of the orange circle", sc)
    by_kind = {k: [e.text for e in edits if e.kind == k] for k in T.EDIT_KINDS}
    assert "a red square is right of the orange circle" in by_kind["relation"]
    assert (
        "an orange circle is left of the red square" in by_kind["roles"]
    )  # article follows the colour
    assert "a red circle is left of the orange circle" in by_kind["shape"]
    assert (
        "a gray square is left of the orange circle" not in by_kind["color"]
    )  # still true: dropped
    assert "a blue square is left of the orange circle" in by_kind["color"]
    assert (
        "a red square is left of the red circle" not in by_kind["color"]
    )  # never one colour twice
    quads = T.minimal_edits("there is a red square at the top left", sc)
    assert sorted(e.text for e in quads if e.kind == "quadrant") == [
        "there is a red square at the bottom left",
        "there is a red square at the bottom right",
        "there is a red square at the top right",
    ]
    counts = [
        e.text
        for e in T.minimal_edits("there are two squares and two circles", sc)
        if e.kind == "count"
    ]
    assert sorted(counts) == [
        "there are three squares and one circle",
        "there is one square and three circles",
    ]
    near = T.minimal_edits("the object closest to the red square is an orange circle", sc)
    assert "the object furthest from the red square is an orange circle" in [e.text for e in near]
    # in a description, one fact changes and the others stay
    description = (
        "the red square is left of the orange circle and there is a gray square at the bottom right"
    )
    for e in T.minimal_edits(description, sc):
        kept = [f for f in T.parse_text(e.text) if f in T.parse_text(description)]
        assert len(kept) == 1


def test_false_caption_is_never_true():
    scenes = S.generate_split(WorldConfig(num_train=80, num_val=0, num_test=0, seed=4), "train")
    pool = [c for s in scenes for c in s.captions]
    rng = np.random.default_rng(0)
    torch_gen = torch.Generator().manual_seed(0)
    for s in scenes:
        for generator in (rng, torch_gen):
            text = T.false_caption(s, pool, generator)
            assert text in pool and not T.is_true(text, s)
    # a pool of only true texts cannot give a negative: say so, do not loop forever
    with pytest.raises(ValueError, match="no text that is false"):
        T.false_caption(scenes[0], scenes[0].captions, rng, max_tries=5)
    with pytest.raises(TypeError, match="generator"):
        T.false_caption(scenes[0], pool, 0)
