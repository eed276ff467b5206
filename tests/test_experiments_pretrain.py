"""fusionlib.experiments.pretrain: chapters 5 and 6's pretraining data, probes and runs (smoke world)."""

import dataclasses

import pytest
import torch

from fusionlib import checkpoints
from fusionlib.data import truth
from fusionlib.experiments import BOOK_EXPERIMENTS, experiment, obtain, pretrain
from fusionlib.models import uniter, vilbert


@pytest.fixture(scope="module", params=pretrain.MODELS)
def model_data(request, book):
    return request.param, pretrain.pretrain_data(request.param, book, "smoke", "cpu")


def test_each_kind_of_text_has_batches_of_its_own(model_data, book):
    name, data = model_data
    n = len(book.scenes["train"])
    assert len(data.train["descriptions"]) == n and len(data.train["captions"]) == 5 * n
    longest = {k: int(v.text_lengths.max()) for k, v in data.train.items()}
    assert longest["descriptions"] > 2 * longest["captions"]  # why they are not mixed in a batch
    real = data.train["captions"].per_image["region_feats"][
        data.train["captions"].per_image["region_mask"]
    ]
    assert torch.allclose(real.mean(0), torch.zeros(real.shape[1]), atol=1e-4)  # standardised
    assert (data.location_scale > 1.0) == (name == "vilbert")


def test_the_itm_probe_pairs_each_text_with_its_image_and_a_false_one(model_data, book):
    _, data = model_data
    scenes = book.scenes["val"][: pretrain.PRETRAIN_RECIPES["smoke"].probe_images]
    by_row = {book.features["val"].row(s.index): s for s in scenes}
    probe, batches = data.probes["val"].itm["captions"], data.probes["val"].texts["captions"]
    n = len(batches)
    assert probe["labels"].tolist() == [1] * n + [0] * n
    # The negatives' images are other probe images, and the judge calls every text false of its negative.
    images = probe["region_feats"][n:]
    for i in range(0, n, 37):
        match = [
            r
            for r, s in by_row.items()
            if torch.equal(batches.per_image["region_feats"][r], images[i])
        ]
        assert match, "a negative's image is not one of the probe images"
        text = book.tokenizer.decode(probe["input_ids"][i], skip_special_tokens=True)
        assert not truth.is_true(text, by_row[match[0]]) and truth.is_true(
            text, by_row[int(batches.row[i])]
        )


def test_word_probes_mask_one_word_that_makes_its_caption_true(model_data, book):
    _, data = model_data
    tok = book.tokenizer
    for word, probe in data.probes["test"].words.items():
        assert (probe.batch["input_ids"] == tok.mask_token_id).sum(1).eq(1).all()
        column = (probe.word_ids[None, :] == probe.target[:, None]).float().argmax(1)
        assert probe.true_ids[torch.arange(len(column)), column].all()  # the original word is true
        assert probe.true_ids.sum(1).ge(1).all()
    # A caption names one object of a colour, so its shape word is never in doubt; a colour may be.
    assert data.probes["test"].words["shape"].true_ids.sum(1).eq(1).all()
    # A place word's opposite ("left" for "right", "below" for "above") always makes it false.
    place = data.probes["test"].words["place"]
    assert len(place.target) > 0
    words = list(pretrain.PLACE_WORDS)
    opposite = torch.tensor([words.index(w) ^ 1 for w in words])  # pairs: (left, right), ...
    column = (place.word_ids[None, :] == place.target[:, None]).float().argmax(1)
    assert not place.true_ids[torch.arange(len(column)), opposite[column]].any()


def test_probes_and_a_short_run(model_data, book):
    name, data = model_data
    model, history, seconds = pretrain.train_pretraining(name, book, data, "smoke", progress=False)
    metrics = pretrain.grounding_metrics(model, data)
    assert metrics == pretrain.grounding_metrics(model, data)  # the same pairs and masks every time
    test = pretrain.grounding_metrics(model, data, "test", prefix="")
    assert set(test) == {k.removeprefix("val_") for k in metrics} and test != {
        k.removeprefix("val_"): v for k, v in metrics.items()
    }
    assert set(metrics) >= {
        "val_itm_captions",
        "val_itm_descriptions",
        "val_edit_all",
        "val_colour_word",
        "val_colour_word_true",
        "val_shape_word",
        "val_place_word",
        "val_place_word_true",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["val_colour_word_true"] >= 0.0 and seconds > 0
    assert history["val"]["step"][-1] == pretrain.PRETRAIN_RECIPES["smoke"].steps
    assert metrics["val_itm_captions"] == history["val"]["val_itm_captions"][-1]
    tasks = set(history["train"]["task"])
    phases = pretrain.task_schedule(name, "smoke")
    assert len(phases) == 2  # the recipe's masked words alone, then the full mix
    assert tasks <= {t for _, mix in phases for t in mix} and any(
        "descriptions" in t for t in tasks
    )
    assert all(t.startswith("mlm@") for t in history["train"]["task"][: phases[1][0] - 1])


def test_specs_name_the_model_the_mix_and_the_recipe(book):
    spec = pretrain.pretrain_spec("uniter", book, "small")
    assert checkpoints.fingerprint(spec) == checkpoints.fingerprint(
        pretrain.pretrain_spec("uniter", book, "small")
    )
    others = [
        pretrain.pretrain_spec("vilbert", book, "small"),
        pretrain.pretrain_spec("uniter", book, "full"),
        pretrain.pretrain_spec("uniter", book, "small", seed=1),
        pretrain.pretrain_spec(
            "uniter", book, "small", mix=pretrain.task_mix("uniter", **{"mrfr@captions": 0})
        ),
        pretrain.pretrain_spec("uniter", book, "small", mlm_first_steps=100),
    ]
    assert len({checkpoints.fingerprint(s) for s in [spec, *others]}) == 6


def test_mlm_first_trains_masked_words_alone_then_the_mix(model_data, book):
    name, data = model_data
    mix = pretrain.task_mix(name)
    assert pretrain.task_schedule(name, "smoke", mlm_first_steps=0) == mix
    schedule = pretrain.task_schedule(name, "smoke", mlm_first_steps=15)
    assert schedule == [(1, {"mlm@captions": 5.0, "mlm@descriptions": 1.0}), (16, mix)]
    _, history, _ = pretrain.train_pretraining(
        name, book, data, "smoke", mlm_first_steps=15, progress=False
    )
    tasks = history["train"]["task"]
    assert all(t.startswith("mlm@") for t in tasks[:15])
    assert set(tasks[15:]) <= set(mix) and any(not t.startswith("mlm@") for t in tasks[15:])
    with pytest.raises(ValueError, match="mlm_first_steps"):
        pretrain.task_schedule(name, "smoke", mlm_first_steps=-1)


def test_grounded_words_are_words_of_the_vocabulary(book, monkeypatch):
    words = pretrain.grounded_words(book)
    ids = book.tokenizer.convert_tokens_to_ids(list(words))
    assert book.tokenizer.unk_token_id not in ids and len(set(ids)) == len(words)
    for name in pretrain.MODELS:
        config = pretrain.pretrain_config(name, book, "smoke")
        assert config.grounded_word_ids == tuple(ids) and config.grounded_word_probability == 0.5
    uniform = dataclasses.replace(pretrain.PRETRAIN_RECIPES["smoke"], grounded_probability=None)
    monkeypatch.setitem(pretrain.PRETRAIN_RECIPES, "smoke", uniform)
    config = pretrain.pretrain_config("uniter", book, "smoke")
    assert config.grounded_word_ids == () and config.grounded_word_probability is None


def test_bad_names_are_refused(book):
    with pytest.raises(ValueError, match="model must be one of"):
        pretrain.pretrain_config("lxmert", book, "small")
    with pytest.raises(ValueError, match="no task 'itm@images'"):
        pretrain.task_mix("uniter", **{"itm@images": 1})
    with pytest.raises(ValueError, match="at least one task"):
        pretrain.task_mix("vilbert", **{"all@captions": 0, "all@descriptions": 0})


def test_vqa_from_the_pretrained_encoder_and_from_scratch(model_data, book):
    name, data = model_data
    questions = pretrain.question_data(name, book, data, "smoke", "cpu")
    assert len(questions.train["low"]) == round(0.1 * len(book.scenes["train"])) * 20
    assert len(questions.test) == 20 * len(book.scenes["test"])
    pretrained, _, _ = pretrain.train_pretraining(name, book, data, "smoke", progress=False)
    start = pretrain.vqa_model(name, book, "smoke", pretrained)
    encoder = start.encoder.state_dict()  # the encoder is copied, the heads are new
    copied = pretrained.encoder.state_dict()
    assert encoder.keys() == copied.keys() and len(encoder) > 10
    assert all(torch.equal(encoder[k], copied[k]) for k in encoder)
    model, history, _ = pretrain.finetune_vqa(
        name, book, questions, "smoke", "low", pretrained, seed=1, progress=False
    )
    metrics = pretrain.evaluate_vqa_model(model, questions)
    assert {"accuracy", "relational_accuracy", "non_relational_accuracy"} <= set(metrics)
    scratch = pretrain.vqa_spec(name, book, "smoke", "low", None, 1)
    warm = pretrain.vqa_spec(
        name, book, "smoke", "low", pretrain.pretrain_spec(name, book, "smoke"), 1
    )
    assert scratch["start"] == "scratch" and warm["start"] != "scratch"
    with pytest.raises(ValueError, match="labels must be one of"):
        pretrain.vqa_spec(name, book, "smoke", "half", None, 0)


def test_finetuning_experiments_start_from_the_pretrained_checkpoint(book, empty_roots):
    names = [e.name for e in BOOK_EXPERIMENTS if "_vqa_" in e.name]
    assert len(names) == len(set(names)) == 2 * 2 * 2 * 3  # models x starts x labels x seeds
    warm = experiment("ch06/uniter_vqa_low_pretrained_seed1")
    questions = warm.data(book, "smoke", "cpu")
    with pytest.raises(FileNotFoundError, match="--only ch06/uniter_pretrained_seed0"):
        warm.train(book, questions, "smoke", progress=False)
    pretraining = experiment("ch06/uniter_pretrained_seed0")
    obtain(pretraining.name, book, pretraining.data(book, "smoke", "cpu"), "smoke", progress=False)
    model, _, _ = warm.train(book, questions, "smoke", progress=False)
    pretrained, _, _ = checkpoints.load_checkpoint(
        pretraining.name, checkpoints.cache_checkpoint_root()
    )
    # The fine-tuned encoder is the pretrained one, moved by fine-tuning.
    tuned, start = model.encoder.state_dict(), pretrained.encoder.state_dict()
    assert tuned.keys() == start.keys()
    assert any(not torch.equal(tuned[k], start[k]) for k in tuned)
    spec = warm.spec(book, "smoke")
    assert spec["start"] == checkpoints.fingerprint(pretraining.spec(book, "smoke"))
    cold = experiment("ch06/uniter_vqa_low_scratch_seed1")
    assert cold.spec(book, "smoke")["start"] == "scratch"
    assert cold.spec(book, "smoke")["train"]["seed"] == 1
    assert {"accuracy", "relational_accuracy"} <= set(warm.evaluate(model, questions, "smoke"))


def test_the_bag_of_words_baseline_differs_from_the_pretrained_model_only_in_word_order(book):
    for name, prefix in (("vilbert", "ch05"), ("uniter", "ch06")):
        full = experiment(f"{prefix}/{name}_pretrained_seed0").spec(book, "smoke")
        bag = experiment(f"{prefix}/{name}_bag_of_words_seed0").spec(book, "smoke")
        assert full["model_config"]["word_order"] is True
        assert bag["model_config"]["word_order"] is False
        bag["model_config"]["word_order"] = True
        assert checkpoints.fingerprint(bag) == checkpoints.fingerprint(full)


def test_retrieval_of_both_kinds_with_chance_and_ceiling(model_data, book):
    name, data = model_data
    torch.manual_seed(0)
    model = pretrain.vqa_model(name, book, "smoke")  # a VQA model has no ITM head to rank by
    with pytest.raises(TypeError, match="ITM head"):
        pretrain.retrieval_metrics(model, book, data)
    with pytest.raises(ValueError, match="split must be"):
        pretrain.retrieval_metrics(model, book, data, "train")
    config = pretrain.pretrain_config(name, book, "smoke")
    untrained = (
        vilbert.ViLBERTForPretraining(config)
        if name == "vilbert"
        else uniter.UniterForPretraining(config)
    )
    found = pretrain.retrieval_metrics(untrained, book, data, batch_size=700)
    assert set(found) == {"identification", "captions"}
    images = len(book.scenes["test"])
    ident = found["identification"]
    assert ident["chance"]["t2i_R@1"] == pytest.approx(1 / images)
    assert ident["ceiling"]["t2i_R@1"] == pytest.approx(1.0)  # a description singles its image out
    assert found["captions"]["ceiling"]["truth_t2i_R@1"] == pytest.approx(1.0)
    assert found["captions"]["ceiling"]["t2i_R@1"] < 1.0  # a caption fits other images too
    for kind in found.values():
        assert all(0.0 <= v <= 1.0 for v in kind["model"].values())


def _untrained(name, book):
    config = pretrain.pretrain_config(name, book, "smoke")
    torch.manual_seed(0)
    return (
        vilbert.ViLBERTForPretraining(config)
        if name == "vilbert"
        else uniter.UniterForPretraining(config)
    )


def test_word_region_attention_is_the_models_own_maps(model_data, book):
    name, data = model_data
    model = _untrained(name, book).eval()
    batch = data.probes["test"].texts["captions"].__getitems__([0, 1, 2])
    maps = model.word_region_attention(batch)
    T, R = batch["input_ids"].shape[1], batch["region_mask"].shape[1]
    with torch.no_grad():
        if name == "vilbert":
            full = model.vilbert(batch, need_weights=True).attentions.text_to_visual
            assert len(maps) == len(full) and all(
                torch.equal(m, f[..., 1:]) for m, f in zip(maps, full)
            )
        else:
            full = model.uniter(batch, need_weights=True).attentions
            assert len(maps) == len(full)
            assert all(torch.equal(m, f[:, :, :T, T:]) for m, f in zip(maps, full))
    assert all(m.shape[0] == 3 and m.shape[2:] == (T, R) for m in maps)


def _colour_of_regions(book, batch):
    colours = list(book.world.colors)
    names = list(book.features["test"].class_names)
    return torch.tensor(
        [colours.index(n.split()[0]) if n.split()[0] in colours else -1 for n in names]
    )[batch["region_soft_labels"].argmax(-1)]


def test_colour_attention_measures_where_colour_words_look(model_data, book, monkeypatch):
    name, data = model_data
    model = _untrained(name, book)
    with pytest.raises(ValueError, match="split must be"):
        pretrain.colour_attention(model, book, data, "train")
    with pytest.raises(TypeError, match="pretraining model"):
        pretrain.colour_attention(pretrain.vqa_model(name, book, "smoke"), book, data)
    found = pretrain.colour_attention(model, book, data, batch_size=64)
    layers = len(model.word_region_attention(data.probes["test"].texts["captions"][0]))
    assert len(found) == layers and all(row["n"] > 0 for row in found)
    assert all(0.0 <= row["share"] <= 1.0 and 0.0 < row["uniform"] < 1.0 for row in found)

    colour_ids = torch.tensor(book.tokenizer.convert_tokens_to_ids(list(book.world.colors)))

    def looking(batch, on_colour):
        """Every word spreads its attention evenly over the real regions (of its colour if on_colour)."""
        ids = batch["input_ids"]
        region_colour = _colour_of_regions(book, batch)  # (B, R)
        word_colour = (ids[..., None] == colour_ids).float().argmax(-1)  # (B, T)
        target = batch["region_mask"][:, None, :].expand(-1, ids.shape[1], -1).float()
        if on_colour:
            same = (region_colour[:, None, :] == word_colour[..., None]).float() * target
            target = torch.where(same.sum(-1, keepdim=True) > 0, same, target)
        w = (
            0.5 * target / target.sum(-1, keepdim=True).clamp(min=1)
        )  # half the attention on the image
        return [w[:, None].expand(-1, 2, -1, -1)]

    monkeypatch.setattr(type(model), "word_region_attention", lambda self, b: looking(b, True))
    grounded = pretrain.colour_attention(model, book, data, batch_size=64)
    assert grounded[0]["share"] == pytest.approx(1.0)
    monkeypatch.setattr(type(model), "word_region_attention", lambda self, b: looking(b, False))
    even = pretrain.colour_attention(model, book, data, batch_size=64)
    assert even[0]["share"] == pytest.approx(even[0]["uniform"])
    assert even[0]["n"] == grounded[0]["n"] == found[0]["n"]


def test_referent_occlusion_hides_the_named_regions_or_as_many_others(
    model_data, book, monkeypatch
):
    name, data = model_data
    model = _untrained(name, book)
    with pytest.raises(ValueError, match="split must be"):
        pretrain.referent_occlusion(model, book, data, "train")
    found = pretrain.referent_occlusion(model, book, data, batch_size=64)
    assert found["n"] > 0 and found["regions_hidden"] >= 1.0
    for version in ("whole", "referents_hidden", "others_hidden"):
        assert 0.0 <= found[version]["match"] <= 1.0
        assert torch.isfinite(torch.tensor(found[version]["log_odds"]))

    colour_ids = torch.tensor(book.tokenizer.convert_tokens_to_ids(list(book.world.colors)))
    seen = {}

    def counting(self, batch):
        """Log-odds = visible regions of a colour the caption names; records how many were visible."""
        named = (batch["input_ids"][..., None] == colour_ids).any(1)  # (B, colours)
        colour = _colour_of_regions(book, batch)
        referents = (colour >= 0) & named.gather(1, colour.clamp(min=0))
        visible = batch["region_mask"].sum(1).float()
        seen.setdefault("visible", []).append(visible)
        score = (referents & batch["region_mask"]).sum(1).float()
        if name == "vilbert":  # [IMG] is the mean of the visible regions only
            mean = (batch["region_feats"] * batch["region_mask"][..., None]).sum(1) / visible[
                :, None
            ]
            assert torch.allclose(batch["image_feats"], mean, atol=1e-5)
        return torch.stack([torch.zeros_like(score), score], dim=1)

    monkeypatch.setattr(type(model), "itm_logits", counting)
    counted = pretrain.referent_occlusion(model, book, data, batch_size=64)
    assert counted["referents_hidden"]["log_odds"] == 0.0  # every named region hidden
    assert counted["others_hidden"]["log_odds"] == pytest.approx(counted["whole"]["log_odds"])
    assert counted["whole"]["log_odds"] == pytest.approx(counted["regions_hidden"])
    whole, referents, others = (torch.cat(seen["visible"][i::3]) for i in range(3))
    assert torch.equal(whole - referents, whole - others)  # as many others as named ones
