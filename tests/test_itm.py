"""Tests for ITM pairs (fusionlib.itm, chapter 4): random, false and hard negatives, in both models.

Every negative is checked with the one-scene reference judge ``truth.is_true``
on the real texts and scenes behind the batch, not with the tensors the
sampler itself read.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from fusionlib import itm, losses
from fusionlib.data import truth
from fusionlib.data.datasets import EDIT_KEYS, TRUTH_KEYS, CaptionDataset, TensorBatches, collate
from fusionlib.data.shapes import WorldConfig
from fusionlib.models import uniter, vilbert
from fusionlib.vision import DetectorConfig

# Few colours make true "negatives" common, so the difference between random and false shows in a small batch.
WORLD = WorldConfig(
    num_train=40, num_val=0, num_test=0, num_objects=3, colors=("red", "green", "blue"), seed=1
)
DET = DetectorConfig(steps=1, batch_size=4)


@pytest.fixture(scope="module")
def dataset(scenes, features, tokenizer):
    return CaptionDataset(scenes, features, tokenizer, edits=6)


def texts_and_scenes(dataset, scenes, tokenizer, indices):
    """The real text and scene of each item, read back through the tokenizer and the image index."""
    by_index = {s.index: s for s in scenes}
    texts = [tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True) for i in indices]
    return texts, [by_index[int(dataset[i]["image_index"])] for i in indices]


def batch_of(dataset, indices):
    return collate([dataset[i] for i in indices], pad_token_id=dataset.pad_token_id)


def test_caption_dataset_carries_the_judge_and_false_edits(dataset, scenes, tokenizer):
    assert set(TRUTH_KEYS) | set(EDIT_KEYS) <= set(dataset[0])
    kinds = Counter()
    for i in range(0, len(dataset), 7):
        item = dataset[i]
        scene = next(s for s in scenes if s.index == int(item["image_index"]))
        text = tokenizer.decode(item["input_ids"], skip_special_tokens=True)
        assert truth.is_true(text, scene)
        assert torch.equal(item["text_facts"], truth.encode_facts([text])[0])
        for ids, kind in zip(item["edit_input_ids"], item["edit_kinds"]):
            if kind < 0:
                assert bool((ids == dataset.pad_token_id).all())
                continue
            edited = tokenizer.decode(ids, skip_special_tokens=True)
            assert edited != text and not truth.is_true(edited, scene), (text, edited)
            kinds[truth.EDIT_KINDS[int(kind)]] += 1
    assert len(kinds) >= 5, kinds  # the kinds take turns when a text has more than E edits


def test_descriptions_and_both(scenes, features, tokenizer):
    only = CaptionDataset(scenes, features, tokenizer, text="descriptions")
    both = CaptionDataset(scenes, features, tokenizer, text="both")
    assert len(only) == len(scenes) and len(both) == len(scenes) * (WORLD.num_captions + 1)
    assert (
        int(only[0]["caption_index"]) == -1
        and only[0]["text_facts"].shape[0] == WORLD.description_facts
    )
    assert tokenizer.decode(only[3]["input_ids"], skip_special_tokens=True) == scenes[3].description
    with pytest.raises(ValueError, match="text must be one of"):
        CaptionDataset(scenes, features, tokenizer, text="questions")
    with pytest.raises(ValueError, match="judge"):
        CaptionDataset(scenes, features, tokenizer, judge=False, edits=2)
    plain = CaptionDataset(scenes, features, tokenizer, judge=False)
    assert not set(TRUTH_KEYS) & set(plain[0])


def test_tensor_batches_carry_the_same_keys(dataset):
    tb = TensorBatches(dataset)
    indices = [0, 9, 33, 120]
    got, want = tb.__getitems__(indices), batch_of(dataset, indices)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("swap", itm.SWAPS)
def test_false_negatives_are_never_true_and_random_ones_sometimes_are(
    dataset, scenes, tokenizer, swap
):
    true_negatives = {"random": 0, "false": 0}
    negatives = Counter()
    for seed in range(40):
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[
            :16
        ].tolist()
        batch = batch_of(dataset, indices)
        texts, images = texts_and_scenes(dataset, scenes, tokenizer, indices)
        for mode in itm.ITM_NEGATIVES:
            pairs = itm.draw_pairs(batch, torch.Generator().manual_seed(seed), 0.5, mode, swap=swap)
            for i in torch.nonzero(pairs.labels == 0).squeeze(1).tolist():
                j = int(pairs.partner[i])
                text, image = (texts[j], images[i]) if swap == "text" else (texts[i], images[j])
                true_negatives[mode] += truth.is_true(text, image)
                negatives[mode] += 1
    assert true_negatives["false"] == 0 and negatives["false"] > 200
    assert true_negatives["random"] > 0  # what "false" is for: random negatives can be true


def test_random_mode_draws_what_random_negatives_draws(dataset):
    batch = batch_of(dataset, list(range(10)))
    pairs = itm.draw_pairs(batch, torch.Generator().manual_seed(3), 0.5, "random")
    plain = losses.random_negatives(
        10, torch.Generator().manual_seed(3), 0.5, group_ids=batch["image_index"]
    )
    assert torch.equal(pairs.partner, plain.partner) and torch.equal(pairs.labels, plain.labels)
    assert bool((pairs.edit == -1).all())


def test_hard_negatives_keep_the_image_and_edit_the_text(dataset, scenes, tokenizer):
    kinds = Counter()
    hard = negatives = 0
    for seed in range(30):
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[
            :16
        ].tolist()
        batch = batch_of(dataset, indices)
        texts, images = texts_and_scenes(dataset, scenes, tokenizer, indices)
        pairs = itm.draw_pairs(
            batch, torch.Generator().manual_seed(seed), 0.5, "false", hard_share=0.5
        )
        ids, mask = itm.edit_texts(
            batch["input_ids"], batch["attention_mask"], batch, pairs.edit, dataset.pad_token_id
        )
        assert ids.shape == mask.shape and bool(mask[:, 0].all())
        for i in range(16):
            if pairs.edit[i] < 0:
                assert torch.equal(
                    ids[i][mask[i]], batch["input_ids"][i][batch["attention_mask"][i]]
                )
                continue
            assert int(pairs.labels[i]) == 0 and int(pairs.partner[i]) == i
            edited = tokenizer.decode(ids[i][mask[i]], skip_special_tokens=True)
            assert edited != texts[i] and not truth.is_true(edited, images[i])
            assert int(pairs.edit_kind[i]) == int(batch["edit_kinds"][i, pairs.edit[i]])
            kinds[truth.EDIT_KINDS[int(pairs.edit_kind[i])]] += 1
            hard += 1
        negatives += int((pairs.labels == 0).sum())
    assert 0.35 < hard / negatives < 0.65, (hard, negatives)
    assert len(kinds) >= 5, kinds


def test_bad_settings_and_missing_keys_say_what_to_do(dataset, scenes, features, tokenizer):
    batch = batch_of(dataset, list(range(6)))
    with pytest.raises(ValueError, match="^negatives must be one of"):
        itm.draw_pairs(batch, torch.Generator(), negatives="hard")
    with pytest.raises(ValueError, match="^hard_share must be"):
        itm.draw_pairs(batch, torch.Generator(), hard_share=1.5)
    plain = batch_of(CaptionDataset(scenes, features, tokenizer, judge=False), list(range(6)))
    with pytest.raises(
        ValueError, match="text_facts.*use itm_negatives='random'|itm_negatives='random'"
    ):
        itm.draw_pairs(plain, torch.Generator(), negatives="false")
    no_edits = batch_of(CaptionDataset(scenes, features, tokenizer), list(range(6)))
    with pytest.raises(ValueError, match="edits=E"):
        itm.draw_pairs(no_edits, torch.Generator(), hard_share=0.5)
    with pytest.raises(ValueError, match="^itm_negatives must be one of"):
        uniter.UniterConfig(vocab_size=50, num_region_classes=7, itm_negatives="sometimes")
    with pytest.raises(ValueError, match="hard_negative_share"):
        vilbert.ViLBERTConfig(vocab_size=50, num_region_classes=7, hard_negative_share=-0.1)


def test_vilbert_hard_negatives_get_no_mlm_targets(dataset, features, tokenizer, scenes):
    config = vilbert.ViLBERTConfig.small(
        vocab_size=len(tokenizer),
        num_region_classes=features.num_classes,
        region_dim=features.feature_dim,
        hard_negative_share=1.0,
    )
    batch = batch_of(dataset, list(range(0, 48, 3)))
    inputs = vilbert.prepare_pretraining_inputs(batch, config, torch.Generator().manual_seed(1))
    negative = inputs.itm_labels == 0
    assert bool(negative.any())
    assert bool(
        (inputs.caption_index[negative] == torch.arange(16)[negative]).all()
    )  # own image, edited text
    assert bool((inputs.mlm_labels[negative] == losses.IGNORE_INDEX).all())
    assert not bool(inputs.region_masked[negative].any())
    for i in torch.nonzero(negative).squeeze(1).tolist():
        # MLM masks the edited text too (so masking cannot give the label away): only check it is not the caption
        assert not torch.equal(
            inputs.input_ids[i][inputs.attention_mask[i]],
            batch["input_ids"][i][batch["attention_mask"][i]],
        )
    model = vilbert.ViLBERTForPretraining(config)
    out = vilbert.pretraining_step(model, batch, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad


def test_uniter_itm_keeps_the_image_for_hard_negatives_and_swaps_it_for_false_ones(
    dataset, features, tokenizer, scenes
):
    config = uniter.UniterConfig.small(
        len(tokenizer), features.num_classes, hard_negative_share=0.5
    )
    indices = list(range(0, 64, 4))
    batch = batch_of(dataset, indices)
    texts, images = texts_and_scenes(dataset, scenes, tokenizer, indices)
    by_index = {s.index: s for s in scenes}
    seen_hard = seen_swapped = 0
    for seed in range(10):
        out = uniter.prepare_pretraining_batch(
            batch, "itm", config, torch.Generator().manual_seed(seed)
        )
        for i in range(len(indices)):
            image = by_index[int(out["image_index"][i])]
            text = tokenizer.decode(
                out["input_ids"][i][out["attention_mask"][i]], skip_special_tokens=True
            )
            assert truth.is_true(text, image) == bool(out["itm_labels"][i])
            if out["itm_labels"][i] == 0:
                if image.index == images[i].index:
                    seen_hard += 1
                else:
                    seen_swapped += 1
                    assert text == texts[i]
        assert torch.equal(
            out["image_objects"],
            truth.encode_scenes([by_index[int(k)] for k in out["image_index"]]),
        )
    assert seen_hard > 0 and seen_swapped > 0
    model = uniter.UniterForPretraining(config)
    result = uniter.pretraining_step(model, batch, "itm", torch.Generator().manual_seed(0))
    assert torch.isfinite(result["loss"])


def test_edits_are_drawn_kind_by_kind():
    # One text with five colour edits and one relation edit: a kind first, then an edit of it,
    # so the relation edit comes up about half the time (one time in six if edits were drawn uniformly).
    B = 400
    batch = {
        "image_index": torch.arange(B),
        "edit_kinds": torch.tensor([[0, 0, 0, 0, 0, 2, -1]]).repeat(B, 1),
        "edit_input_ids": torch.zeros(B, 7, 3, dtype=torch.long),
    }
    pairs = itm.draw_pairs(
        batch, torch.Generator().manual_seed(0), probability=1.0, negatives="random", hard_share=1.0
    )
    assert bool((pairs.edit >= 0).all()) and bool((pairs.edit != 6).all())  # never the empty slot
    share = (pairs.edit_kind == 2).float().mean().item()
    assert 0.42 < share < 0.58, share


def test_edit_pairs_line_up_each_edit_with_its_image(dataset, tokenizer):
    batch = batch_of(dataset, list(range(30)))
    pairs = itm.edit_pairs(batch, dataset.pad_token_id)
    valid = batch["edit_kinds"] >= 0
    assert len(pairs.owner) == int(valid.sum()) == pairs.edited["input_ids"].shape[0]
    assert pairs.matched["input_ids"].shape[0] == 30
    for m in range(0, len(pairs.owner), 11):
        o = int(pairs.owner[m])
        assert torch.equal(pairs.edited["region_feats"][m], batch["region_feats"][o])
        assert int(pairs.edited["image_index"][m]) == int(batch["image_index"][o])
        text = tokenizer.decode(
            pairs.edited["input_ids"][m][pairs.edited["attention_mask"][m]],
            skip_special_tokens=True,
        )
        slot = [
            tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["edit_input_ids"][o]
        ]
        assert (
            text in slot
            and truth.EDIT_KINDS[int(pairs.kind[m])]
            == truth.EDIT_KINDS[int(batch["edit_kinds"][o, slot.index(text)])]
        )
    with pytest.raises(ValueError, match="edits=E"):
        itm.edit_pairs(
            {k: v for k, v in batch.items() if not k.startswith("edit")}, dataset.pad_token_id
        )


def test_edit_accuracy_is_a_two_way_choice_and_a_bag_of_words_cannot_see_roles(
    dataset, scenes, tokenizer
):
    batch = batch_of(dataset, list(range(len(dataset))))
    pairs = itm.edit_pairs(batch, dataset.pad_token_id)
    n, m = pairs.matched["input_ids"].shape[0], len(pairs.owner)
    perfect = itm.edit_accuracy(torch.ones(n), torch.zeros(m), pairs)
    assert perfect["all"] == 1.0 and all(
        perfect[k] == 1.0 for k in truth.EDIT_KINDS if k in perfect
    )
    assert (
        itm.edit_accuracy(torch.zeros(n), torch.zeros(m), pairs)["all"] == 0.5
    )  # ties: half a win
    assert itm.edit_accuracy(torch.zeros(n), torch.ones(m), pairs)["all"] == 0.0

    def bag_of_words(chunk):  # a score that depends on the multiset of tokens only
        ids = chunk["input_ids"].masked_fill(~chunk["attention_mask"], 10_000).sort(dim=1).values
        return torch.tensor([float(hash(tuple(row.tolist())) % 1000) for row in ids])

    scores = itm.edit_accuracy(
        itm.score_pairs(bag_of_words, pairs.matched, 64),
        itm.score_pairs(bag_of_words, pairs.edited, 64),
        pairs,
    )
    a_an = {tokenizer.convert_tokens_to_ids(w) for w in ("a", "an")}
    same_bag = [
        sorted(
            t
            for t in pairs.matched["input_ids"][int(o)][
                pairs.matched["attention_mask"][int(o)]
            ].tolist()
            if t not in a_an
        )
        == sorted(
            t
            for t in pairs.edited["input_ids"][j][pairs.edited["attention_mask"][j]].tolist()
            if t not in a_an
        )
        for j, o in enumerate(pairs.owner.tolist())
        if truth.EDIT_KINDS[int(pairs.kind[j])] == "roles"
    ]
    assert scores["n_roles"] == len(same_bag) > 0 and all(
        same_bag
    )  # roles: same words, other order
    with pytest.raises(ValueError, match="edited_scores"):
        itm.edit_accuracy(torch.ones(n), torch.zeros(m + 1), pairs)


def test_matching_step_trains_any_model_with_a_match_head(dataset, tokenizer, features):
    from fusionlib.models.baselines import CrossAttentionFusion, VQAConfig

    config = VQAConfig(
        vocab_size=len(tokenizer),
        num_answers=2,
        region_dim=features.feature_dim,
        hidden_size=16,
        num_heads=2,
        num_layers=1,
        text_layers=0,
        max_text_len=40,
    )
    model = CrossAttentionFusion(config)
    batch = batch_of(dataset, list(range(24)))
    out = itm.matching_step(
        model,
        batch,
        hard_share=0.5,
        pad_token_id=dataset.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(out) == {"loss", "accuracy", "hard_accuracy"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.classifier.parameters())
    plain = itm.matching_step(
        model,
        batch,
        negatives="random",
        pad_token_id=dataset.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isnan(plain["hard_accuracy"])
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        itm.matching_step(
            CrossAttentionFusion(dataclasses.replace(config, num_answers=3)),
            batch,
            pad_token_id=dataset.pad_token_id,
        )


def test_hard_kinds_limit_the_edits_drawn(dataset):
    batch = batch_of(dataset, list(range(60)))
    allowed = ("relation", "roles", "quadrant", "count")
    seen = Counter()
    for seed in range(20):
        pairs = itm.draw_pairs(
            batch,
            torch.Generator().manual_seed(seed),
            0.5,
            "false",
            hard_share=1.0,
            hard_kinds=allowed,
        )
        seen.update(truth.EDIT_KINDS[int(k)] for k in pairs.edit_kind[pairs.edit >= 0])
        # a sample whose text has no edit of these kinds gets a false partner instead
        no_allowed = ~torch.isin(
            batch["edit_kinds"], torch.tensor([truth.EDIT_KINDS.index(k) for k in allowed])
        )
        assert bool((pairs.edit[no_allowed.all(dim=1)] == -1).all())
    assert set(seen) <= set(allowed) and len(seen) >= 3, seen
    with pytest.raises(ValueError, match="^hard_kinds must be"):
        itm.draw_pairs(batch, torch.Generator(), hard_share=0.5, hard_kinds=("colour",))
    with pytest.raises(ValueError, match="hard_negative_kinds"):
        uniter.UniterConfig(vocab_size=50, num_region_classes=7, hard_negative_kinds=())
    config = vilbert.ViLBERTConfig(
        vocab_size=50, num_region_classes=7, hard_negative_kinds=["roles", "count"]
    )
    assert config.hard_negative_kinds == ("roles", "count")


def test_descriptions_get_false_and_edited_negatives_too(scenes, features, tokenizer):
    described = CaptionDataset(scenes, features, tokenizer, text="descriptions", edits=4)
    indices = list(range(len(described)))
    batch = batch_of(described, indices)
    by_index = {s.index: s for s in scenes}
    for seed in range(5):
        pairs = itm.draw_pairs(
            batch, torch.Generator().manual_seed(seed), 0.5, "false", hard_share=0.5
        )
        ids, mask = itm.edit_texts(
            batch["input_ids"][pairs.partner],
            batch["attention_mask"][pairs.partner],
            batch,
            pairs.edit,
            described.pad_token_id,
        )
        for i in range(len(indices)):
            text = tokenizer.decode(ids[i][mask[i]], skip_special_tokens=True)
            image = by_index[int(batch["image_index"][i])]
            assert truth.is_true(text, image) == bool(pairs.labels[i]), (text, int(pairs.labels[i]))
            if pairs.edit[i] >= 0:  # one fact of the description changed, the others kept
                kept = [
                    f for f in truth.parse_text(text) if f in truth.parse_text(image.description)
                ]
                assert len(kept) == WORLD.description_facts - 1
