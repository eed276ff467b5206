"""fusionlib.experiments.light: chapter 7's size sweep, its presets, budget, names and training (smoke world)."""

import os
import subprocess
import sys

import pytest
import torch

from fusionlib import checkpoints
from fusionlib.experiments import (
    BOOK_EXPERIMENTS,
    chapter_recipe,
    experiment,
    fusion,
    light,
    obtain,
)
from fusionlib.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, ANSWERS, REGION_DIM = 198, 10, 64  # the default world's


def test_presets_build_and_grow():
    counts = []
    for size in light.LIGHT_SIZES:
        config = light.light_config(size, VOCAB, ANSWERS, REGION_DIM)
        assert (config.hidden_size, config.num_layers, config.num_heads) == (
            size.hidden,
            size.layers,
            size.hidden // 32,
        )
        counts.append(build_model("cross_attention", config).num_parameters())
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    # The 128 x 2 preset is chapter 3's full-recipe cross-attention model, unchanged.
    _, chapter3 = fusion.fusion_setups("full", VOCAB, ANSWERS, REGION_DIM)["cross_attention"]
    assert light.light_config(light.LightSize(128, 2), VOCAB, ANSWERS, REGION_DIM) == chapter3
    with pytest.raises(ValueError, match="multiple of 32"):
        light.LightSize(48, 2)


def test_full_sweep_checkpoints_stay_under_12_mb():
    stored = sum(  # float16: 2 bytes a parameter, for every seed
        2
        * len(light.LIGHT_SEEDS)
        * build_model(
            "cross_attention", light.light_config(size, VOCAB, ANSWERS, REGION_DIM)
        ).num_parameters()
        for size in light.LIGHT_SIZES
    )
    assert stored < 12e6, f"the sweep's checkpoints would hold {stored / 1e6:.1f} MB"


def test_every_size_gets_the_same_budget_with_chapter_3s_optimiser():
    for recipe in checkpoints.RECIPES:
        config = light.light_train_config(recipe, seed=2)
        chapter3 = fusion.fusion_train_config(recipe, seed=2)
        assert (config.steps, config.warmup_steps, config.eval_every) == light.LIGHT_BUDGET[recipe]
        assert config.seed == 2 and config.schedule == "cosine" and not config.amp
        for field in ("lr", "weight_decay", "betas", "eps", "grad_clip", "min_lr_ratio"):
            assert getattr(config, field) == getattr(chapter3, field), field
    steps = [light.LIGHT_BUDGET[r][0] for r in checkpoints.RECIPES]
    assert steps == sorted(steps)
    with pytest.raises(ValueError, match="recipe must be one of"):
        light.light_train_config("huge")


def test_the_location_scale_is_the_same_for_every_size():
    # vqa_data measures it on chapter 3's model; the sweep shares that data across sizes.
    scales = {
        fusion.location_scale(light.light_config(size, VOCAB, ANSWERS, REGION_DIM))[2]
        for size in light.LIGHT_SIZES
    }
    assert len(scales) == 1


def test_fingerprints_differ_across_sizes_seeds_and_recipes(book):
    prints = {
        checkpoints.fingerprint(light.light_spec(size, seed, book, recipe))
        for size in light.LIGHT_SIZES
        for seed in light.LIGHT_SEEDS
        for recipe in checkpoints.RECIPES
    }
    assert len(prints) == len(light.LIGHT_SIZES) * len(light.LIGHT_SEEDS) * len(checkpoints.RECIPES)
    size = light.LIGHT_SIZES[0]
    assert checkpoints.fingerprint(light.light_spec(size, 1, book, "full")) == (
        checkpoints.fingerprint(light.light_spec(size, 1, book, "full"))
    )
    # Chapter 3's model at 128 x 2 is a different checkpoint: another budget.
    assert checkpoints.fingerprint(
        light.light_spec(light.LightSize(128, 2), 0, book, "full")
    ) != checkpoints.fingerprint(fusion.fusion_spec("cross_attention", book, "full"))


def test_the_sweep_is_registered_after_chapter_3_and_before_pretraining():
    names = [e.name for e in BOOK_EXPERIMENTS]
    sweep = [name for _, _, name in light.light_runs()]
    assert len(sweep) == len(set(sweep)) == len(light.LIGHT_SIZES) * len(light.LIGHT_SEEDS)
    pretraining = [n for n in names if n.startswith(("ch05/", "ch06/"))]
    assert pretraining[:2] == ["ch05/vilbert_pretrained_seed0", "ch06/uniter_pretrained_seed0"]
    assert all("_vqa_" in n for n in pretraining[2:-2])  # fine-tuning needs the pretrained models
    assert pretraining[-2:] == ["ch05/vilbert_bag_of_words_seed0", "ch06/uniter_bag_of_words_seed0"]
    first = names[: len(names) - len(pretraining)]
    assert names[len(first) :] == pretraining  # the longest runs come last
    assert first[-len(sweep) :] == sweep  # chapter 3's checkpoints stay ahead
    assert all(n.startswith("ch03/") for n in first[: -len(sweep)])
    assert light.light_name(light.LightSize(64, 2), 1) == "ch07/light_h64_l2_seed1"
    exp = experiment("ch07/light_h64_l2_seed1")
    assert exp.chapter == "07_efficiency" and exp.data is experiment("ch03/cross_attention").data


def test_obtain_trains_the_smoke_recipe_then_loads_it(book, empty_roots, capsys):
    data = fusion.vqa_data(book, "smoke", "cpu")
    assert chapter_recipe("ch07", book) == "smoke"
    seeds = {}
    for seed in (0, 1):
        name = light.light_name(light.LIGHT_SIZES[0], seed)
        got = obtain(name, book, data, progress=False, device="cpu")
        assert not got.loaded and got.record.recipe == "smoke" and got.record.steps == 30
        assert set(got.record.metrics) >= {
            "accuracy",
            "relational_accuracy",
            "non_relational_accuracy",
        }
        assert len(got.history["val"]["step"]) == 2  # validated at steps 15 and 30
        seeds[seed] = got
    first, second = (next(iter(seeds[s].model.state_dict().values())) for s in (0, 1))
    assert not torch.equal(first, second)  # seeds give different models
    again = obtain(light.light_name(light.LIGHT_SIZES[0], 0), book, data, progress=False)
    assert again.loaded and again.record == seeds[0].record
    assert fusion.evaluate_fusion_model(again.model, data, "smoke")["accuracy"] == pytest.approx(
        seeds[0].record.metrics["accuracy"], abs=1e-6
    )
    assert "loaded ch07/light_h32_l1_seed0" in capsys.readouterr().out


def test_train_book_trains_the_sweep(tmp_path):
    def run():
        return subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "scripts", "train_book.py"),
                "--recipe",
                "smoke",
                "--only",
                "ch07",
                "--out",
                str(tmp_path / "out"),
                "--work",
                str(tmp_path / "work"),
                "--threads",
                "1",
                "--no-progress",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    done = run()
    assert done.returncode == 0, done.stdout + done.stderr
    records = checkpoints.read_manifest(tmp_path / "out")
    assert sorted(records) == sorted(name for _, _, name in light.light_runs())
    assert {(r.steps, r.batch_size, r.chapter) for r in records.values()} == {
        (30, 32, "07_efficiency")
    }
    assert not any(name.startswith("ch03/") for name in records)
    again = run()
    assert again.returncode == 0 and again.stdout.count(": up to date") == len(records)
