"""Tests for the real-corpus loader (fusionlib.data.hub, chapter 2).

Every test runs with the Hub in offline mode and the network cut (any socket
connection or DNS lookup is recorded and refused): the fixtures are tiny
imagefolders written here from the synthetic world.
"""

from __future__ import annotations

import json
import socket
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fusionlib.data import hub
from fusionlib.data import shapes as S

WORLD = S.WorldConfig(num_train=6, num_val=0, num_test=3, seed=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """HF offline mode (env and the already-imported module constants) and no sockets."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == [], f"a test tried to reach the network: {attempts}"


def write_images(folder, scenes):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for s in scenes:
        name = f"scene_{s.index:04d}.png"
        Image.fromarray(s.image).save(folder / name)
        names.append(name)
    return names


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def scenes():
    return S.generate_split(WORLD, "train") + S.generate_split(WORLD, "test")


def test_caption_folder_maps_to_samples(tmp_path, scenes):
    folder = tmp_path / "coco"
    names = write_images(folder, scenes[:4])
    write_jsonl(
        folder / "metadata.jsonl",
        [{"file_name": n, "captions": s.captions} for n, s in zip(names, scenes)],
    )
    samples = hub.load_corpus("coco_captions", folder, cache_dir=tmp_path / "cache")
    assert len(samples) == 4
    by_id = {x.image_id: x for x in samples}
    assert set(by_id) == set(names)
    for name, scene in zip(names, scenes):
        sample = by_id[name]
        assert isinstance(sample, hub.RealSample) and sample.source == "coco_captions"
        assert sample.captions == scene.captions
        assert sample.questions == [] and sample.objects == []
        array = sample.image_array()
        assert array.dtype == np.uint8 and array.shape == (75, 75, 3)
        assert np.array_equal(array, scene.image), "PNG is lossless: the pixels come back unchanged"
    assert len(hub.load_corpus("coco_captions", folder, limit=2, cache_dir=tmp_path / "cache")) == 2


def test_split_folders_and_one_caption_per_line_are_merged(tmp_path, scenes):
    root = tmp_path / "flickr"
    train_names = write_images(root / "train", scenes[:2])
    test_names = write_images(root / "test", scenes[6:9])
    write_jsonl(
        root / "train" / "metadata.jsonl",
        [
            {"file_name": n, "caption": c}
            for n, s in zip(train_names, scenes[:2])
            for c in s.captions
        ],
    )
    write_jsonl(
        root / "test" / "metadata.jsonl",
        [
            {"file_name": n, "caption": c}
            for n, s in zip(test_names, scenes[6:9])
            for c in s.captions[:2]
        ],
    )
    test = hub.load_corpus("flickr30k", root, split="test", cache_dir=tmp_path / "cache")
    assert [x.image_id for x in test] == test_names
    assert [x.captions for x in test] == [s.captions[:2] for s in scenes[6:9]]
    train = hub.load_corpus("flickr30k", root, split="train", cache_dir=tmp_path / "cache")
    assert [x.captions for x in train] == [s.captions for s in scenes[:2]]
    with pytest.raises(ValueError, match="split 'validation'"):
        hub.load_corpus("flickr30k", root, split="validation", cache_dir=tmp_path / "cache")


def test_vqa_rows_are_grouped_by_image_with_the_majority_answer(tmp_path, scenes):
    folder = tmp_path / "vqa"
    names = write_images(folder, scenes[:3])
    rows, expected = [], {}
    for name, scene in zip(names, scenes):
        for k, q in enumerate(scene.questions[:4]):
            wrong = "purple" if k % 2 else "7"
            answers = [q.answer] * 4 + [wrong] * 3 + ["maybe"] * 3  # a plurality, not a majority
            rows.append({"file_name": name, "question": q.text, "answers": answers})
            expected.setdefault(name, []).append((q.text, q.answer))
    # interleave images: grouping must not rely on the rows being sorted
    rows = rows[::2] + rows[1::2]
    write_jsonl(folder / "metadata.jsonl", rows)
    samples = hub.load_corpus("vqav2", folder, cache_dir=tmp_path / "cache")
    assert len(samples) == 3
    for sample in samples:
        assert sample.captions == [] and sample.objects == []
        assert Counter((q.text, q.answer) for q in sample.questions) == Counter(
            expected[sample.image_id]
        )
        assert all(
            q.family == "vqa" and q.relational is False and q.color == "" for q in sample.questions
        )


def test_majority_answer():
    assert hub.majority_answer(["yes", "no", "no"]) == "no"
    assert hub.majority_answer(["two", "2", "2", "two"]) == "two", (
        "ties go to the answer given first"
    )
    assert (
        hub.majority_answer(
            [{"answer": "red", "answer_confidence": "yes"}, {"answer": "blue"}, {"answer": "red"}]
        )
        == "red"
    )
    assert hub.majority_answer("cat") == "cat"
    with pytest.raises(ValueError, match="answers"):
        hub.majority_answer([" ", ""])


def test_offline_hub_id_fails_with_what_to_download(tmp_path):
    with pytest.raises(hub.CorpusNotFoundError) as info:
        hub.load_corpus(
            "vqav2", "fusionlib-test/no-such-dataset", split="validation", cache_dir=tmp_path / "c"
        )
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "fusionlib-test/no-such-dataset" in message and "offline" in message
    assert "https://visualqa.org/download.html" in message and "val2014.zip" in message
    assert "metadata.jsonl" in message and '"answers"' in message, "it says where to put the files"


@pytest.mark.parametrize(
    "name, needle", [("coco_captions", "cocodataset.org"), ("flickr30k", "dataset_flickr30k.json")]
)
def test_missing_local_folder_says_what_to_download(tmp_path, name, needle):
    with pytest.raises(hub.CorpusNotFoundError, match="No folder") as info:
        hub.load_corpus(name, tmp_path / "not" / "here")
    assert needle in str(info.value) and "metadata.jsonl" in str(info.value)


def test_folder_without_metadata_and_bad_arguments(tmp_path, scenes):
    write_images(tmp_path / "bare", scenes[:1])
    with pytest.raises(hub.CorpusNotFoundError, match="metadata.jsonl"):
        hub.load_corpus("coco_captions", tmp_path / "bare")
    with pytest.raises(ValueError, match="name"):
        hub.load_corpus("imagenet", tmp_path / "bare")
    with pytest.raises(ValueError, match="limit"):
        hub.load_corpus("coco_captions", tmp_path / "bare", limit=-1)


def test_wrong_columns_are_named(tmp_path, scenes):
    folder = tmp_path / "odd"
    names = write_images(folder, scenes[:1])
    write_jsonl(folder / "metadata.jsonl", [{"file_name": names[0], "text": "a red circle"}])
    with pytest.raises(ValueError, match="caption column"):
        hub.load_corpus("coco_captions", folder, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="question column"):
        hub.load_corpus("vqav2", folder, cache_dir=tmp_path / "cache")


def test_converters_from_official_annotation_files(tmp_path, scenes):
    coco = {
        "images": [{"id": 9, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}],
        "annotations": [
            {"image_id": 9, "caption": " a red circle "},
            {"image_id": 3, "caption": "a blue square"},
            {"image_id": 9, "caption": "the red circle"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "coco"
    hub.metadata_from_coco_captions(tmp_path / "captions.json", out)
    for name, scene in zip(("a.png", "b.png"), scenes):
        Image.fromarray(scene.image).save(out / name)
    samples = hub.load_corpus("coco_captions", out, cache_dir=tmp_path / "cache")
    assert {x.image_id: x.captions for x in samples} == {
        "a.png": ["a red circle", "the red circle"],
        "b.png": ["a blue square"],
    }

    karpathy = {
        "images": [
            {"filename": "x.jpg", "split": "train", "sentences": [{"raw": "one"}]},
            {"filename": "y.jpg", "split": "restval", "sentences": [{"raw": "two"}]},
            {"filename": "z.jpg", "split": "val", "sentences": [{"raw": "three"}, {"raw": "3"}]},
        ]
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    written = hub.metadata_from_karpathy(tmp_path / "karpathy.json", tmp_path / "flickr")
    assert sorted(p.split("/")[-2] for p in written) == ["train", "validation"]
    lines = (tmp_path / "flickr" / "validation" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"file_name": "z.jpg", "captions": ["three", "3"]}]

    questions = {"questions": [{"image_id": 42, "question": "what colour?", "question_id": 420}]}
    annotations = {
        "annotations": [
            {
                "question_id": 420,
                "answers": [{"answer": "red"}, {"answer": "red"}, {"answer": "blue"}],
            }
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    hub.metadata_from_vqa(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "vqa")
    row = json.loads((tmp_path / "vqa" / "metadata.jsonl").read_text())
    assert row == {
        "file_name": "COCO_val2014_000000000042.jpg",
        "question": "what colour?",
        "answers": ["red", "red", "blue"],
        "question_id": 420,
    }
