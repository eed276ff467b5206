"""fusionlib.experiments: the book world bundle, chapter 3's presets, and train-or-load by name (smoke world)."""

import pytest
import torch

from fusionlib import checkpoints
from fusionlib.experiments import (
    chapter_recipe,
    experiment,
    obtain,
    tokenizer_digest,
)
from fusionlib.experiments import fusion


def test_book_world_names_its_data(book):
    spec = book.data_spec()
    assert spec == {
        "world": book.world.key(),
        "detector": book.detector.key(),
        "tokenizer": tokenizer_digest(book.tokenizer),
    }
    assert len(book.scenes["train"]) == 200 and book.region_dim == book.features["test"].feature_dim


def test_specs_differ_by_recipe_setup_and_data(book):
    a = checkpoints.fingerprint(fusion.fusion_spec("cross_attention", book, "small"))
    assert a == checkpoints.fingerprint(fusion.fusion_spec("cross_attention", book, "small"))
    assert a != checkpoints.fingerprint(fusion.fusion_spec("cross_attention", book, "full"))
    assert a != checkpoints.fingerprint(
        fusion.fusion_spec("cross_attention_geometry", book, "small")
    )
    with pytest.raises(ValueError, match="setup must be one of"):
        fusion.fusion_spec("cnn_mlp", book, "small")


def test_geometry_setup_differs_only_in_its_region_layer(book):
    setups = fusion.fusion_setups("full", 50, 10, 64)
    plain, geometry = setups["cross_attention"][1], setups["cross_attention_geometry"][1]
    changed = {k for k, v in geometry.to_dict().items() if plain.to_dict()[k] != v}
    assert changed == {"region_layers", "geometry_bias"}


def test_vqa_data_standardises_every_split_with_the_train_statistics(book):
    data = fusion.vqa_data(book, "smoke", "cpu")
    real = data.tensors["train"].per_image["region_feats"][
        data.tensors["train"].per_image["region_mask"]
    ]
    assert torch.allclose(real.mean(0), torch.zeros(real.shape[1]), atol=1e-4)
    assert len(data.datasets["val"]) == fusion.VAL_IMAGES["smoke"] * len(
        book.scenes["val"][0].questions
    )
    assert (
        data.location_scale
        == fusion.location_scale(
            fusion.fusion_setups("smoke", len(book.tokenizer), len(book.answers), book.region_dim)[
                "cross_attention"
            ][1]
        )[2]
    )


def test_obtain_trains_once_then_loads(book, empty_roots, capsys):
    data = fusion.vqa_data(book, "smoke", "cpu")
    assert chapter_recipe("ch03", book) == "smoke"
    first = obtain("ch03/question_only", book, data, progress=False, device="cpu")
    assert not first.loaded and first.record.recipe == "smoke" and first.record.steps == 30
    second = obtain("ch03/question_only", book, data, progress=False, device="cpu")
    assert second.loaded and second.record == first.record
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert fusion.evaluate_fusion_model(second.model, data, "smoke")["accuracy"] == pytest.approx(
        first.record.metrics["accuracy"], abs=1e-6
    )  # the manifest keeps 6 decimals
    assert "loaded ch03/question_only" in capsys.readouterr().out
    with pytest.raises(KeyError, match="no book experiment named"):
        experiment("ch03/cnn")
    with pytest.raises(ValueError, match="names no book experiment"):
        chapter_recipe("ch99", book)
