"""Checkpoints: fingerprints, the manifest, float16 storage, train-or-load (fusionlib.checkpoints)."""

import os

import pytest
import torch

from fusionlib import checkpoints
from fusionlib.models import VQAConfig, build_model

CONFIG = VQAConfig(
    vocab_size=20,
    num_answers=3,
    hidden_size=8,
    num_layers=1,
    num_heads=2,
    classifier_hidden=8,
    rn_hidden=8,
    rn_g_layers=2,
)
SPEC = {
    "model": "question_only",
    "model_config": CONFIG.to_dict(),
    "train": {"steps": 5, "lr": 1e-3},
    "batch_size": 4,
    "data": {"world": "abc"},
}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("question_only", CONFIG)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CHECKPOINTS", str(tmp_path / "committed"))
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(checkpoints.TRAIN_ENV, raising=False)
    return tmp_path


def test_fingerprint_ignores_key_order_and_sees_every_value():
    same = {
        "data": {"world": "abc"},
        "batch_size": 4,
        "train": {"lr": 1e-3, "steps": 5},
        "model_config": CONFIG.to_dict(),
        "model": "question_only",
    }
    assert checkpoints.fingerprint(SPEC) == checkpoints.fingerprint(same)
    assert len(checkpoints.fingerprint(SPEC)) == 16
    for change in (
        {"batch_size": 8},
        {"train": {"steps": 6, "lr": 1e-3}},
        {"data": {"world": "abd"}},
    ):
        assert checkpoints.fingerprint({**SPEC, **change}) != checkpoints.fingerprint(SPEC)
    with pytest.raises(TypeError, match="JSON values"):
        checkpoints.fingerprint({"x": object()})


def test_save_records_float16_weights_and_metrics_of_the_stored_copy(roots):
    model = tiny_model()
    seen = []

    def evaluate(m):
        seen.append(next(m.parameters()).dtype)
        return {"accuracy": 0.5}

    record = checkpoints.save_checkpoint(
        model,
        name="ch00/tiny",
        chapter="00_test",
        recipe="small",
        spec=SPEC,
        steps=5,
        batch_size=4,
        device="cpu",
        wall_seconds=1.23,
        history={"val": {"step": [5]}},
        evaluate=evaluate,
    )
    assert seen == [torch.float32]  # evaluated after the reload, in float32
    assert (
        record.metrics == {"accuracy": 0.5}
        and record.dtype == "float16"
        and record.recipe == "small"
    )
    assert checkpoints.read_manifest()["ch00/tiny"] == record
    loaded, again, history = checkpoints.load_checkpoint("ch00/tiny")
    assert again == record and history == {"val": {"step": [5]}}
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32
        assert torch.equal(a.half().float(), b), name  # exactly the float16 rounding, nothing else


def test_a_changed_file_fails_its_sha256(roots):
    checkpoints.save_checkpoint(
        tiny_model(),
        name="ch00/tiny",
        chapter="00_test",
        recipe="small",
        spec=SPEC,
        steps=5,
        batch_size=4,
        device="cpu",
        wall_seconds=1.0,
    )
    weights = os.path.join(checkpoints.checkpoint_root(), "ch00/tiny/model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        checkpoints.load_checkpoint("ch00/tiny")


def test_a_smaller_recipe_never_replaces_a_larger_one(roots):
    kwargs = dict(
        name="ch00/tiny",
        chapter="00_test",
        spec=SPEC,
        steps=5,
        batch_size=4,
        device="cpu",
        wall_seconds=1.0,
    )
    checkpoints.save_checkpoint(tiny_model(), recipe="full", **kwargs)
    with pytest.raises(
        ValueError, match="'full' recipe's checkpoint; a 'small' run may not replace it"
    ):
        checkpoints.save_checkpoint(tiny_model(1), recipe="small", **kwargs)
    assert checkpoints.read_manifest()["ch00/tiny"].recipe == "full"


def test_train_or_load_modes(roots, capsys):
    calls = []

    def train():
        calls.append(1)
        return tiny_model(len(calls)), {"val": {}}, 2.0

    specs = {"small": SPEC, "full": {**SPEC, "batch_size": 512}}
    with pytest.raises(FileNotFoundError, match="FUSIONLIB_TRAIN=auto"):
        checkpoints.train_or_load(
            "ch00/tiny",
            chapter="00_test",
            specs=specs,
            train_recipe="small",
            train=train,
            mode="never",
        )
    got = checkpoints.train_or_load(
        "ch00/tiny", chapter="00_test", specs=specs, train_recipe="small", train=train
    )
    assert not got.loaded and calls == [1] and got.root == checkpoints.cache_checkpoint_root()
    assert "trained ch00/tiny here with the small recipe" in capsys.readouterr().out
    again = checkpoints.train_or_load(
        "ch00/tiny", chapter="00_test", specs=specs, train_recipe="small", train=train
    )
    assert again.loaded and calls == [1]
    # A committed full-recipe checkpoint wins over the cached small one.
    checkpoints.save_checkpoint(
        tiny_model(7),
        name="ch00/tiny",
        chapter="00_test",
        recipe="full",
        spec=specs["full"],
        steps=5,
        batch_size=512,
        device="cpu",
        wall_seconds=60.0,
        evaluate=lambda m: {"accuracy": 0.9},
    )
    capsys.readouterr()
    full = checkpoints.train_or_load(
        "ch00/tiny",
        chapter="00_test",
        specs=specs,
        train_recipe="small",
        train=train,
        headline="accuracy",
    )
    assert full.loaded and full.record.recipe == "full" and calls == [1]
    assert "loaded ch00/tiny: trained with the full recipe on cpu" in capsys.readouterr().out
    assert "test accuracy 90.0%" in checkpoints.describe(full.record, "accuracy")
    checkpoints.train_or_load(
        "ch00/tiny",
        chapter="00_test",
        specs=specs,
        train_recipe="small",
        train=train,
        mode="always",
    )
    assert calls == [1, 1]


def test_train_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv(checkpoints.TRAIN_ENV, "Never")
    assert checkpoints.train_mode() == "never"
    monkeypatch.setenv(checkpoints.TRAIN_ENV, "sometimes")
    with pytest.raises(ValueError, match="FUSIONLIB_TRAIN must be one of"):
        checkpoints.train_mode()


def test_the_commit_is_taken_when_training_starts(roots):
    import re

    assert re.fullmatch(r"[0-9a-f]{12}(\+changes)?|unknown", checkpoints.git_commit())
    record = checkpoints.save_checkpoint(
        tiny_model(),
        name="ch00/tiny",
        chapter="00_test",
        recipe="small",
        spec=SPEC,
        steps=5,
        batch_size=4,
        device="cpu",
        wall_seconds=1.0,
        commit="0123456789ab",
    )
    assert record.commit == "0123456789ab"
