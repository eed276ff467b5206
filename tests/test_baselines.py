"""fusionlib.models.baselines: shapes, masks, save/load and a tiny learning test (chapter 3).

Batches are built synthetically here (random tensors with the keys of
``fusionlib.data.datasets.collate``), so these tests do not depend on the
data pipeline.
"""

import dataclasses
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fusionlib import runtime
from fusionlib.metrics import evaluate_vqa
from fusionlib.models import (
    CrossAttentionFusion,
    RelationNetwork,
    VQAConfig,
    available_models,
    build_model,
    load_pretrained,
)
from fusionlib.train import TrainConfig, train

MODELS = ["question_only", "image_only", "late_fusion", "relation_network", "cross_attention"]
USES_TEXT = {"question_only", "late_fusion", "relation_network", "cross_attention"}
USES_REGIONS = {"image_only", "late_fusion", "relation_network", "cross_attention"}
VOCAB, ANSWERS, D = 30, 7, 12


def small_config(**changes):
    base = VQAConfig(
        vocab_size=VOCAB,
        num_answers=ANSWERS,
        region_dim=D,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        ffn_size=32,
        classifier_hidden=24,
        rn_hidden=24,
        rn_g_layers=2,
        max_text_len=10,
        dropout=0.1,
    )
    return dataclasses.replace(base, **changes)


def random_batch(B=4, T=8, R=6, text_lengths=(8, 5, 3, 1), region_counts=(6, 4, 2, 0), seed=0):
    """A batch dict like ``collate`` makes: right-padded text, real regions first, pads zeroed."""
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.arange(T)[None] < torch.tensor(text_lengths)[:, None]
    input_ids = torch.randint(1, VOCAB, (B, T), generator=g).masked_fill(~attention_mask, 0)
    region_mask = torch.arange(R)[None] < torch.tensor(region_counts)[:, None]
    x1y1 = torch.rand(B, R, 2, generator=g) * 0.7
    x2y2 = x1y1 + 0.1 + 0.2 * torch.rand(B, R, 2, generator=g)
    area = (x2y2 - x1y1).prod(-1, keepdim=True)
    loc5 = torch.cat([x1y1, x2y2, area], -1) * region_mask[..., None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_feats": torch.randn(B, R, D, generator=g) * region_mask[..., None],
        "region_boxes": loc5[..., :4] * 75,
        "region_loc5": loc5,
        "region_loc7": torch.rand(B, R, 7, generator=g),
        "region_mask": region_mask,
        "answer": torch.randint(0, ANSWERS, (B,), generator=g),
        "family": torch.randint(0, 6, (B,), generator=g),
        "relational": torch.rand(B, generator=g) > 0.5,
    }


def perturb_padding(batch, seed=1):
    """The same batch with garbage at every padded token and region."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    pad_t, pad_r = ~batch["attention_mask"], ~batch["region_mask"]
    out["input_ids"] = torch.where(
        pad_t, torch.randint(1, VOCAB, pad_t.shape, generator=g), batch["input_ids"]
    )
    for key in ("region_feats", "region_loc5", "region_loc7"):
        noise = 50 * torch.randn(batch[key].shape, generator=g)
        out[key] = torch.where(pad_r[..., None], noise, batch[key])
    junk_boxes = torch.rand(batch["region_boxes"].shape, generator=g).sort(dim=-1).values * 75
    out["region_boxes"] = torch.where(pad_r[..., None], junk_boxes, batch["region_boxes"])
    return out


def build(name, **changes):
    torch.manual_seed(0)
    return build_model(name, small_config(**changes)).eval()


def test_registry_lists_every_baseline():
    assert set(MODELS) <= set(available_models())
    with pytest.raises(ValueError, match="unknown model"):
        build_model("early_fusion", small_config())


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_finite_outputs(name):
    model = build(name)
    batch = random_batch()
    logits = model(batch)
    assert logits.shape == (4, ANSWERS) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()  # sample 3 has no region at all


@pytest.mark.parametrize("name", MODELS)
def test_padding_never_changes_real_outputs(name):
    model = build(name)
    batch = random_batch()
    torch.testing.assert_close(model(perturb_padding(batch)), model(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(USES_REGIONS))
def test_regions_and_question_matter(name):
    """The converse of the padding test: changing *real* inputs does change the answer logits."""
    model = build(name)
    batch = random_batch()
    changed = dict(
        batch, region_feats=batch["region_feats"] + 1.0 * batch["region_mask"][..., None]
    )
    assert not torch.allclose(model(changed)[:3], model(batch)[:3], atol=1e-4)
    if name in USES_TEXT:
        other = dict(
            batch,
            input_ids=torch.where(
                batch["attention_mask"], (batch["input_ids"] % (VOCAB - 1)) + 1, 0
            ),
        )
        assert not torch.allclose(model(other), model(batch), atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_fully_padded_regions_train_without_nan(name):
    model = build(name).train()
    batch = random_batch(region_counts=(0, 0, 0, 0))
    loss = F.cross_entropy(model(batch), batch["answer"])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name, tmp_path):
    model = build(name, question_encoder="transformer" if name == "relation_network" else "gru")
    batch = random_batch()
    model.save_pretrained(tmp_path / name)
    meta = json.loads((tmp_path / name / "config.json").read_text())
    assert meta["model_class"] == type(model).__name__ and meta["config"]["hidden_size"] == 16
    loaded = load_pretrained(tmp_path / name, map_location="cpu")
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded(batch), model(batch), atol=0, rtol=0)
    with pytest.raises(TypeError, match="holds a"):
        (RelationNetwork if name != "relation_network" else CrossAttentionFusion).from_pretrained(
            tmp_path / name
        )


@pytest.mark.parametrize(
    "changes",
    [
        dict(norm_first=True),
        dict(text_pooling="mean", location_layers=2),
        dict(region_layers=1, text_layers=0),
        dict(location_dim=7),
        dict(region_layers=2, geometry_bias=True),
        dict(region_layers=1, geometry_bias=True, location_dim=7),
    ],
)
def test_cross_attention_variants_respect_padding(changes):
    model = build("cross_attention", **changes)
    batch = random_batch()
    torch.testing.assert_close(model(perturb_padding(batch)), model(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        dict(question_encoder="transformer", text_pooling="mean"),
        dict(image_pooling="mean"),
        dict(image_pooling="max"),
    ],
)
def test_late_fusion_variants_respect_padding(changes):
    model = build("late_fusion", **changes)
    batch = random_batch()
    torch.testing.assert_close(model(perturb_padding(batch)), model(batch), atol=1e-5, rtol=1e-5)


def test_cross_attention_returns_per_layer_maps():
    model = build("cross_attention", num_layers=3)
    batch = random_batch()
    logits, maps = model(batch, need_weights=True)
    torch.testing.assert_close(logits, model(batch))
    assert len(maps) == 3 and all(m.shape == (4, 2, 8, 6) for m in maps)
    for m in maps:
        assert torch.all(m.masked_select(~batch["region_mask"][:, None, None, :]) == 0)
        torch.testing.assert_close(
            m[:3].sum(-1), torch.ones(3, 2, 8)
        )  # real regions: a distribution
        assert torch.all(m[3] == 0)  # no regions: no attention


def test_bad_batches_and_configs_raise_clear_errors():
    model = build("cross_attention")
    batch = random_batch()
    with pytest.raises(ValueError, match="region_mask"):
        model({k: v for k, v in batch.items() if k != "region_mask"})
    with pytest.raises(ValueError, match="attention_mask"):
        model(dict(batch, attention_mask=batch["attention_mask"].long()))
    with pytest.raises(ValueError, match="region_feats"):
        model(dict(batch, region_feats=batch["region_feats"][..., :5]))
    with pytest.raises(ValueError, match="max_position"):
        model(random_batch(T=12, text_lengths=(12, 1, 1, 1)))
    with pytest.raises(ValueError, match="right-padded"):
        build("late_fusion")(dict(batch, attention_mask=batch["attention_mask"].flip(1)))
    with pytest.raises(ValueError, match="num_heads"):
        small_config(num_heads=3)
    with pytest.raises(ValueError, match="location_dim"):
        small_config(location_dim=4)
    with pytest.raises(ValueError, match="question_encoder"):
        small_config(question_encoder="lstm")
    with pytest.raises(ValueError, match="no fields"):
        VQAConfig.from_dict({**small_config().to_dict(), "hiden_size": 3})


def test_default_config_is_the_calibrated_size():
    config = VQAConfig(vocab_size=64, num_answers=10)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.region_dim) == (
        128,
        2,
        4,
        64,
    )
    model = build_model("cross_attention", config)
    assert 300_000 < model.num_parameters() < 1_000_000


# ---------------------------------------------------------------------------
# A tiny learning test: the answer is a property of the region whose colour the question names
# ---------------------------------------------------------------------------

K, S, R_TOY, D_TOY = 8, 4, 6, 16  # colours, shapes (answers), regions, feature size


class ToyVQA(Dataset):
    """Region features = one-hot colour + one-hot shape + noise; question "[CLS] <colour> [SEP] [PAD]...".

    Only a model that matches the question's colour token against region
    features, and reads the matched region's shape, can beat 1/S. Scenes have
    3-6 regions (the rest padded), so masks matter.
    """

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        colours = torch.stack([torch.randperm(K, generator=g)[:R_TOY] for _ in range(n)])
        shapes = torch.randint(0, S, (n, R_TOY), generator=g)
        feats = torch.zeros(n, R_TOY, D_TOY)
        feats.scatter_(2, colours.unsqueeze(-1), 1.0)
        feats.scatter_(2, (K + shapes).unsqueeze(-1), 1.0)
        feats += 0.1 * torch.randn(n, R_TOY, D_TOY, generator=g)
        count = torch.randint(3, R_TOY + 1, (n,), generator=g)
        self.region_mask = torch.arange(R_TOY)[None] < count[:, None]
        self.region_feats = feats * self.region_mask[..., None]
        target = (torch.rand(n, generator=g) * count).long()  # a real region
        rows = torch.arange(n)
        self.input_ids = torch.zeros(n, 5, dtype=torch.long)
        self.input_ids[:, 0], self.input_ids[:, 1], self.input_ids[:, 2] = (
            1,
            3 + colours[rows, target],
            2,
        )
        self.answer = shapes[rows, target]
        self.loc5 = torch.rand(n, R_TOY, 5, generator=g) * self.region_mask[..., None]

    def __len__(self):
        return len(self.answer)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.input_ids[i] != 0,
            "region_feats": self.region_feats[i],
            "region_loc5": self.loc5[i],
            "region_mask": self.region_mask[i],
            "answer": self.answer[i],
        }


def test_cross_attention_learns_to_find_the_named_region():
    started = time.perf_counter()
    config = VQAConfig(
        vocab_size=3 + K,
        num_answers=S,
        region_dim=D_TOY,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        ffn_size=64,
        dropout=0.0,
        classifier_hidden=32,
        max_text_len=8,
    )
    torch.manual_seed(0)
    model = build_model("cross_attention", config)
    train_loader = DataLoader(ToyVQA(2048, seed=0), batch_size=64, shuffle=True)
    val_loader = DataLoader(ToyVQA(512, seed=1), batch_size=256)

    def step(m, batch, task):
        return {"loss": F.cross_entropy(m(batch), batch["answer"])}

    before = evaluate_vqa(model, val_loader)["accuracy"]
    # One thread: as fast for a model this small, and no thread oversubscription on a busy machine.
    with runtime.num_threads(1):
        history = train(
            model,
            train_loader,
            TrainConfig(steps=200, lr=3e-3, warmup_steps=20, eval_every=50),
            step,
            lambda m: evaluate_vqa(m, val_loader, prefix="val_"),
            device="cpu",
            progress=False,
        )
    after = history.val["val_accuracy"][-1]
    assert before < 0.4 and after > 0.9, (before, history.series("val_accuracy"))
    # About 2 s on an idle machine; the bound only catches a pathological slowdown.
    assert time.perf_counter() - started < 60, f"took {time.perf_counter() - started:.0f} s"
