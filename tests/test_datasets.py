"""Tests for fusionlib.data.datasets: torch datasets, collate, loaders and the HF dataset."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from fusionlib.data.datasets import (
    CAPTION_KEYS,
    QUESTION_KEYS,
    REGION_KEYS,
    TRUTH_KEYS,
    CaptionDataset,
    QuestionDataset,
    TensorBatches,
    collate,
    make_loader,
    retrieval_set,
    standardise_batch,
    to_hf_dataset,
)
from fusionlib.data import truth
from fusionlib.data.shapes import QUESTION_FAMILIES, WorldConfig, answer_vocab, generate_split
from fusionlib.vision import DetectorConfig

WORLD = WorldConfig(num_train=12, num_val=4, num_test=4)
DET = DetectorConfig(steps=1, batch_size=4)


@pytest.fixture(scope="module")
def questions(scenes, features, tokenizer):
    return QuestionDataset(scenes, features, tokenizer, answer_vocab(WORLD))


@pytest.fixture(scope="module")
def captions(scenes, features, tokenizer):
    return CaptionDataset(scenes, features, tokenizer)


def test_question_items_and_batch(scenes, features, tokenizer, questions):
    assert len(questions) == sum(len(s.questions) for s in scenes)
    item = questions[0]
    assert set(item) == set(QUESTION_KEYS)
    items = [questions[i] for i in (0, 5, 21, 40)]
    batch = collate(items, pad_token_id=tokenizer.pad_token_id)
    assert set(batch) == set(QUESTION_KEYS) | {"attention_mask"}
    B, R, D, C = 4, features.num_regions, features.feature_dim, features.num_classes
    T = max(len(it["input_ids"]) for it in items)
    expected = {
        "input_ids": ((B, T), torch.long),
        "attention_mask": ((B, T), torch.bool),
        "region_feats": ((B, R, D), torch.float32),
        "region_boxes": ((B, R, 4), torch.float32),
        "region_loc5": ((B, R, 5), torch.float32),
        "region_loc7": ((B, R, 7), torch.float32),
        "region_mask": ((B, R), torch.bool),
        "region_soft_labels": ((B, R, C), torch.float32),
        "image_feats": ((B, D), torch.float32),
        "image_index": ((B,), torch.long),
        "answer": ((B,), torch.long),
        "family": ((B,), torch.long),
        "relational": ((B,), torch.bool),
        "question_index": ((B,), torch.long),
    }
    for key, (shape, dtype) in expected.items():
        assert (tuple(batch[key].shape), batch[key].dtype) == (shape, dtype), key
    # Text: padding with [PAD] exactly where attention_mask is False, and the text decodes back.
    for n, (i, it) in enumerate(zip((0, 5, 21, 40), items)):
        length = len(it["input_ids"])
        assert batch["attention_mask"][n].tolist() == [True] * length + [False] * (T - length)
        assert (batch["input_ids"][n, length:] == tokenizer.pad_token_id).all()
        scene = scenes[i // 20]
        q = scene.questions[i % 20]
        assert batch["input_ids"][n, :length].tolist() == tokenizer(q.text)["input_ids"]
        assert (
            int(batch["image_index"][n]) == scene.index
            and int(batch["question_index"][n]) == i % 20
        )
        assert answer_vocab(WORLD)[int(batch["answer"][n])] == q.answer
        assert QUESTION_FAMILIES[int(batch["family"][n])] == q.family
        assert bool(batch["relational"][n]) == q.relational
        # Regions: the rows of the features for this image.
        r = features.row(scene.index)
        assert torch.equal(batch["region_feats"][n], features.feats[r])
        assert torch.equal(batch["region_mask"][n], features.mask[r])
        assert torch.equal(batch["region_loc7"][n], features.loc7[r])
        assert torch.equal(batch["image_feats"][n], features.image_feats[r])


def test_caption_items(scenes, captions, tokenizer):
    assert len(captions) == sum(len(s.captions) for s in scenes)
    assert set(captions[0]) == set(CAPTION_KEYS) | set(TRUTH_KEYS)
    batch = collate([captions[i] for i in range(5)], pad_token_id=tokenizer.pad_token_id)
    assert batch["caption_index"].tolist() == list(range(len(scenes[0].captions)))[:5] + list(
        range(5 - len(scenes[0].captions))
    )
    k = len(scenes[0].captions)
    assert captions[k]["input_ids"].tolist() == tokenizer(scenes[1].captions[0])["input_ids"]
    assert int(captions[-1]["image_index"]) == scenes[-1].index
    with pytest.raises(IndexError):
        captions[len(captions)]


def test_collate_rejects_mismatched_items(questions):
    a, b = questions[0], questions[1]
    with pytest.raises(ValueError, match="answer"):
        collate([a, {k: v for k, v in b.items() if k != "answer"}])
    with pytest.raises(ValueError, match="region_feats"):
        collate([a, {**b, "region_feats": b["region_feats"][:-1]}])
    with pytest.raises(ValueError, match="region_mask"):
        collate([a, {**b, "region_mask": b["region_mask"].long()}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_datasets_reject_bad_input(scenes, features, tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        QuestionDataset(scenes, features, tokenizer, answer_vocab(WORLD), max_length=4)
    with pytest.raises(ValueError, match="not in answers"):
        QuestionDataset(scenes, features, tokenizer, ["yes", "no"])
    other = generate_split(WORLD, "val")
    with pytest.raises(ValueError, match="no row for scene index"):
        CaptionDataset(other, features, tokenizer)


def test_loaders_are_deterministic_in_the_seed(questions):
    def order(seed, shuffle=True):
        loader = make_loader(questions, batch_size=16, shuffle=shuffle, seed=seed)
        return [(b["image_index"] * 100 + b["question_index"]).tolist() for b in loader]

    a, b, c = order(0), order(0), order(1)
    assert a == b and a != c
    flat = sorted(x for batch in a for x in batch)
    assert flat == sorted(
        x for batch in order(0, shuffle=False) for x in batch
    )  # a permutation of all items
    assert len(flat) == len(questions)
    first = next(iter(make_loader(questions, batch_size=16, shuffle=False)))
    assert first["question_index"].tolist() == list(range(16))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(questions, batch_size=0)


def test_hf_dataset_has_an_image_feature_and_the_right_rows(scenes):
    import datasets

    few = scenes[:3]
    caps = to_hf_dataset(few, "captions")
    assert isinstance(caps.features["image"], datasets.Image)
    assert caps.num_rows == sum(len(s.captions) for s in few)
    assert set(caps.column_names) == {"image", "image_index", "caption_index", "caption"}
    row = caps[len(few[0].captions)]
    assert row["caption"] == few[1].captions[0] and row["image_index"] == few[1].index
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), few[1].image)  # PNG is lossless
    qs = to_hf_dataset(few, "questions")
    assert qs.num_rows == sum(len(s.questions) for s in few)
    assert isinstance(qs.features["image"], datasets.Image)
    q = qs[3]
    src = few[0].questions[3]
    assert (q["question"], q["answer"], q["family"], q["relational"]) == (
        src.text,
        src.answer,
        src.family,
        src.relational,
    )
    with pytest.raises(ValueError, match="kind"):
        to_hf_dataset(few, "images")


def test_retrieval_set_pairs_each_caption_with_its_image(scenes, features, tokenizer):
    chosen = [scenes[5], scenes[2], scenes[9]]  # not in index order: rows follow `chosen`
    images, texts, caption_image, strings, judged = retrieval_set(chosen, features, tokenizer)
    assert strings == [c for s in chosen for c in s.captions]
    assert torch.equal(judged, truth.truth_matrix(strings, chosen))
    assert bool(judged[torch.arange(len(strings)), caption_image].all())
    per_scene = [len(s.captions) for s in chosen]
    assert caption_image.tolist() == [p for p, n in enumerate(per_scene) for _ in range(n)]
    assert texts["input_ids"].shape[0] == sum(per_scene) and set(texts) == {
        "input_ids",
        "attention_mask",
    }
    decoded = [
        tokenizer.decode(ids[mask], skip_special_tokens=True)
        for ids, mask in zip(texts["input_ids"], texts["attention_mask"])
    ]
    assert decoded == [c for s in chosen for c in s.captions]
    # Each image row is the batch a scene's first caption gives, region key by region key.
    first_items = collate([CaptionDataset([scene], features, tokenizer)[0] for scene in chosen])
    assert set(images) == set(REGION_KEYS) - {"image_index"}
    for key in images:
        assert torch.equal(images[key], first_items[key]), key
    for p, scene in enumerate(chosen):
        row = features.row(scene.index)
        assert torch.equal(images["region_feats"][p], features.feats[row])
        assert torch.equal(images["region_loc5"][p], features.loc5[row])


def test_retrieval_set_of_descriptions_pairs_one_text_with_each_image(scenes, features, tokenizer):
    chosen = scenes[:6]
    ret = retrieval_set(chosen, features, tokenizer, text="descriptions")
    assert ret.texts == [s.description for s in chosen] and ret.caption_image.tolist() == list(
        range(6)
    )
    decoded = [
        tokenizer.decode(ids[mask], skip_special_tokens=True)
        for ids, mask in zip(ret.captions["input_ids"], ret.captions["attention_mask"])
    ]
    assert decoded == ret.texts
    assert torch.equal(ret.truth, truth.truth_matrix(ret.texts, chosen)) and bool(
        ret.truth.diagonal().all()
    )
    with pytest.raises(ValueError, match="text must be"):
        retrieval_set(chosen, features, tokenizer, text="questions")


def test_retrieval_set_standardises_like_standardise_batch(scenes, features, tokenizer):
    stats = TensorBatches(CaptionDataset(scenes, features, tokenizer)).standardise()
    plain = retrieval_set(scenes[:4], features, tokenizer)
    scaled = retrieval_set(scenes[:4], features, tokenizer, stats)
    expected = standardise_batch(plain.images, stats)
    for key in expected:
        assert torch.equal(scaled.images[key], expected[key]), key
    assert not torch.equal(scaled.images["region_feats"], plain.images["region_feats"])


def test_retrieval_set_rejects_no_scenes_and_repeated_scenes(scenes, features, tokenizer):
    with pytest.raises(ValueError, match="at least one scene"):
        retrieval_set([], features, tokenizer)
    with pytest.raises(ValueError, match=rf"repeat.*\[{scenes[1].index}\]"):
        retrieval_set([scenes[1], scenes[2], scenes[1]], features, tokenizer)
    with pytest.raises(ValueError, match="needs a caption"):
        retrieval_set([dataclasses.replace(scenes[1], captions=[])], features, tokenizer)
