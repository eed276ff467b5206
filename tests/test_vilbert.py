"""fusionlib.models.vilbert and fusionlib.layers.CoAttentionLayer (chapter 5).

Batches are synthetic (random tensors with the keys of
``fusionlib.data.datasets.collate``), so these tests do not depend on the
data pipeline. The paper-size model is only built on the meta device, to
count its parameters.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fusionlib import runtime
from fusionlib.data.datasets import collate
from fusionlib.layers import CoAttentionLayer
from fusionlib.losses import IGNORE_INDEX
from fusionlib.metrics import image_text_recall
from fusionlib.models import available_models, build_model, load_pretrained
from fusionlib.models.vilbert import (
    ViLBERT,
    ViLBERTConfig,
    ViLBERTForPretraining,
    ViLBERTForVQA,
    layer_schedule,
    load_encoder,
    load_text_stream_from_bert,
    pair_scores,
    prepare_pretraining_inputs,
    pretraining_step,
    vqa_step,
)
from fusionlib.models.vl_base import pretraining_losses
from fusionlib.train import TrainConfig, train

VOCAB, CLASSES, D, ANSWERS = 30, 7, 12, 5
SPECIAL = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine one thread is faster than two fighting."""
    with runtime.num_threads(1):
        yield


def small_config(**changes):
    base = ViLBERTConfig.small(
        vocab_size=VOCAB,
        num_region_classes=CLASSES,
        region_dim=D,
        text_hidden_size=32,
        text_num_heads=2,
        text_ffn_size=64,
        visual_hidden_size=24,
        visual_num_heads=2,
        visual_ffn_size=48,
        bi_hidden_size=16,
        bi_num_heads=2,
        max_text_len=10,
        num_answers=ANSWERS,
        itm_negatives="random",
    )  # random ids: nothing to judge
    return dataclasses.replace(base, **changes)


def random_batch(
    B=4, T=8, R=6, text_lengths=(8, 5, 3, 2), region_counts=(6, 4, 2, 0), image_index=None, seed=0
):
    """A batch like ``collate`` makes: ``[CLS] ... [SEP]`` right-padded, real regions first, pads zeroed."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(text_lengths)
    attention_mask = torch.arange(T)[None] < lengths[:, None]
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g)
    input_ids[:, 0] = 2
    input_ids[torch.arange(B)[lengths > 1], (lengths - 1)[lengths > 1]] = 3
    input_ids = input_ids.masked_fill(~attention_mask, 0)
    region_mask = torch.arange(R)[None] < torch.tensor(region_counts)[:, None]
    x1y1 = torch.rand(B, R, 2, generator=g) * 0.7
    x2y2 = x1y1 + 0.1 + 0.2 * torch.rand(B, R, 2, generator=g)
    loc5 = (
        torch.cat([x1y1, x2y2, (x2y2 - x1y1).prod(-1, keepdim=True)], -1) * region_mask[..., None]
    )
    feats = torch.randn(B, R, D, generator=g) * region_mask[..., None]
    soft = torch.softmax(3 * torch.randn(B, R, CLASSES, generator=g), -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_feats": feats,
        "region_loc5": loc5,
        "region_mask": region_mask,
        "region_soft_labels": soft * region_mask[..., None],
        "image_feats": feats.sum(1) / region_mask.sum(1, keepdim=True).clamp(min=1),
        "image_index": torch.arange(B) if image_index is None else torch.as_tensor(image_index),
        "answer": torch.randint(0, ANSWERS, (B,), generator=g),
    }


def perturb_padding(batch, seed=1):
    """The same batch with garbage at every padded token and region."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    pad_t, pad_r = ~batch["attention_mask"], ~batch["region_mask"]
    out["input_ids"] = torch.where(
        pad_t, torch.randint(5, VOCAB, pad_t.shape, generator=g), batch["input_ids"]
    )
    for key in ("region_feats", "region_loc5"):
        noise = 50 * torch.randn(batch[key].shape, generator=g)
        out[key] = torch.where(pad_r[..., None], noise, batch[key])
    return out


def build(cls=ViLBERTForPretraining, **changes):
    torch.manual_seed(0)
    return cls(small_config(**changes)).eval()


def finite_grads(model):
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------
# CoAttentionLayer
# ---------------------------------------------------------------------------


def reference_co_attention(layer, text, visual, text_mask, visual_mask):
    """ViLBERT's co-TRM written out with plain tensor ops from the layer's weights (eval mode)."""
    Hb, H = layer.bi_hidden_size, layer.num_heads
    dh = Hb // H

    def split(x):  # (B, N, Hb) -> (B, H, N, dh)
        return x.view(x.shape[0], x.shape[1], H, dh).transpose(1, 2)

    def attend(q, k, v, key_mask):
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        w = scores.softmax(-1)
        return (w @ split(v)).transpose(1, 2).reshape(q.shape[0], q.shape[1], Hb), w

    qt, kt, vt = F.linear(text, layer.text_in_proj.weight, layer.text_in_proj.bias).split(Hb, -1)
    qv, kv, vv = F.linear(visual, layer.visual_in_proj.weight, layer.visual_in_proj.bias).split(
        Hb, -1
    )
    ct, w_tv = attend(qt, kv, vv, visual_mask)  # words over regions
    cv, w_vt = attend(qv, kt, vt, text_mask)  # regions over words

    def post(x, context, out_proj, residual, ffn, ffn_residual):
        x = residual.norm(x + out_proj(context))
        hidden = F.gelu(ffn.linear1(x))
        return ffn_residual.norm(x + ffn.linear2(hidden))

    t = post(
        text, ct, layer.text_out_proj, layer.text_residual, layer.text_ffn, layer.text_ffn_residual
    )
    v = post(
        visual,
        cv,
        layer.visual_out_proj,
        layer.visual_residual,
        layer.visual_ffn,
        layer.visual_ffn_residual,
    )
    return t, v, w_tv, w_vt


def co_layer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    text, visual = torch.randn(3, 5, 32, generator=g), torch.randn(3, 4, 24, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    visual_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    return text, visual, text_mask, visual_mask


def test_co_attention_layer_matches_written_out_reference():
    torch.manual_seed(0)
    layer = CoAttentionLayer(32, 24, 16, 4, text_ffn_size=64, visual_ffn_size=40).eval()
    text, visual, text_mask, visual_mask = co_layer_inputs()
    t_ref, v_ref, w_tv_ref, w_vt_ref = reference_co_attention(
        layer, text, visual, text_mask, visual_mask
    )
    for need_weights in (False, True):  # fused SDPA and the written-out attention
        t, v, weights = layer(text, visual, text_mask, visual_mask, need_weights=need_weights)
        torch.testing.assert_close(t, t_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    assert weights.text_to_visual.shape == (3, 4, 5, 4) and weights.visual_to_text.shape == (
        3,
        4,
        4,
        5,
    )
    torch.testing.assert_close(weights.text_to_visual, w_tv_ref)
    torch.testing.assert_close(weights.visual_to_text, w_vt_ref)
    # Distributions over the real keys only.
    assert torch.allclose(weights.text_to_visual.sum(-1), torch.ones(3, 4, 5))
    assert (weights.text_to_visual[1, :, :, 2:] == 0).all() and (
        weights.visual_to_text[2, :, :, 1:] == 0
    ).all()


def test_co_attention_layer_padding_and_empty_keys():
    torch.manual_seed(0)
    layer = CoAttentionLayer(32, 24, 16, 2, text_ffn_size=64, visual_ffn_size=48).eval()
    text, visual, text_mask, visual_mask = co_layer_inputs()
    t, v, _ = layer(text, visual, text_mask, visual_mask)
    t2, v2, _ = layer(
        torch.where(text_mask[..., None], text, 99.0),
        torch.where(visual_mask[..., None], visual, -7.0),
        text_mask,
        visual_mask,
    )
    torch.testing.assert_close(t2[text_mask], t[text_mask])
    torch.testing.assert_close(v2[visual_mask], v[visual_mask])
    # A sample with no real word: its regions have nothing to attend to, and must not turn NaN.
    layer.train()
    empty_text = text_mask.clone()
    empty_text[2] = False
    for need_weights in (False, True):
        layer.zero_grad()
        t, v, _ = layer(text, visual, empty_text, visual_mask, need_weights=need_weights)
        (t.sum() + v.sum()).backward()
        assert torch.isfinite(t).all() and torch.isfinite(v).all() and finite_grads(layer)


def test_co_attention_layer_rejects_bad_input():
    layer = CoAttentionLayer(32, 24, 16, 2)
    text, visual, text_mask, visual_mask = co_layer_inputs()
    with pytest.raises(ValueError, match="visual"):
        layer(text, torch.randn(3, 4, 32), text_mask, visual_mask)
    with pytest.raises(ValueError, match="batch size"):
        layer(text, visual[:2], text_mask, visual_mask[:2])
    with pytest.raises(ValueError, match="visual_mask"):
        layer(text, visual, text_mask, visual_mask.long())
    with pytest.raises(ValueError, match="bi_num_heads"):
        CoAttentionLayer(32, 24, 16, 3)
    with pytest.raises(ValueError, match="visual_ffn_size"):
        CoAttentionLayer(32, 24, 16, 2, visual_ffn_size=0)


# ---------------------------------------------------------------------------
# Config and the layer schedule
# ---------------------------------------------------------------------------


def schedule_string(plan):
    return " ".join({"text": "T", "visual": "V", "co": "C"}[kind] + str(i) for kind, i in plan)


def test_paper_base_schedule():
    """vilbert-multi-task's BertEncoder with t_biattention_id=[6..11], v_biattention_id=[0..5]."""
    plan = layer_schedule(ViLBERTConfig.paper_base())
    assert schedule_string(plan) == (
        "T0 T1 T2 T3 T4 T5 C0 T6 V0 C1 T7 V1 C2 T8 V2 C3 T9 V3 C4 T10 V4 C5 V5 T11"
    )
    kinds = [kind for kind, _ in plan]
    assert (kinds.count("text"), kinds.count("visual"), kinds.count("co")) == (12, 6, 6)
    assert kinds[:7] == ["text"] * 6 + ["co"]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, "T0 T1 C0 T2 V0 C1 V1 T3"),  # the book's small model
        ({"text_layer_ids": (0, 4), "visual_layer_ids": (2, 2)}, "V0 V1 C0 T0 T1 T2 T3 C1"),
        (
            {"text_layer_ids": (), "visual_layer_ids": ()},
            "V0 V1 T0 T1 T2 T3",
        ),  # two streams that never meet
    ],
)
def test_forward_runs_the_schedule_in_order(changes, expected):
    model = build(ViLBERT, **changes)
    assert schedule_string(model.schedule) == expected
    ran = []
    for kind, layers in (
        ("T", model.text_layers),
        ("V", model.visual_layers),
        ("C", model.co_layers),
    ):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, name=f"{kind}{i}": ran.append(name))
    model(random_batch())
    assert " ".join(ran) == expected
    kinds = expected.split()
    assert (len(model.text_layers), len(model.visual_layers), len(model.co_layers)) == tuple(
        sum(k.startswith(c) for k in kinds) for c in "TVC"
    )


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"text_layer_ids": (2, 5)}, "text_layer_ids"),
        ({"text_layer_ids": (3, 2)}, "text_layer_ids"),
        ({"visual_layer_ids": (0,)}, "visual_layer_ids"),
        ({"visual_layer_ids": (0, 3)}, "visual_layer_ids"),
        ({"bi_num_heads": 3}, "bi_num_heads"),
        ({"text_num_heads": 5}, "text_num_heads"),
        ({"location_dim": 7}, "location_dim"),
        ({"mask_token_id": VOCAB}, "mask_token_id"),
        ({"dropout": 1.0}, "dropout"),
        ({"visual_hidden_size": 0}, "visual_hidden_size"),
        ({"num_answers": -1}, "num_answers"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        small_config(**changes)


def test_config_round_trips_through_json():
    config = small_config(text_layer_ids=(1, 3), attention_dropout=0.0)
    back = ViLBERTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert (
        back == config
        and back.text_layer_ids == (1, 3)
        and isinstance(back.special_token_ids, tuple)
    )
    with pytest.raises(ValueError, match="no fields"):
        ViLBERTConfig.from_dict({**config.to_dict(), "v_biattention_id": [0]})


def test_paper_base_parameter_count():
    """The paper-size model, built on the meta device (no memory), counted part by part."""
    from transformers import BertConfig, BertModel

    config = ViLBERTConfig.paper_base()
    with torch.device("meta"):
        model = ViLBERTForPretraining(config)
        bert = BertModel(BertConfig(), add_pooling_layer=False)  # bert-base-uncased's shape
    enc = model.vilbert
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    # The text stream is exactly BERT-base (without BERT's tanh pooler).
    text_stream = count(enc.text_embeddings) + count(enc.text_layers)
    assert text_stream == count(bert) == 108_891_648

    def transformer_layer(h, f):  # attention, FFN, two LayerNorms
        return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h

    assert count(enc.visual_layers) == 6 * transformer_layer(1024, 1024)
    t, v, b = 768, 1024, 1024
    co_layer = (
        (3 * b * t + 3 * b)
        + (3 * b * v + 3 * b)
        + (b * t + t)
        + (b * v + v)
        + 2 * t
        + 2 * v
        + (2 * t * 3072 + 3072 + t + 2 * t)
        + (2 * v * 1024 + 1024 + v + 2 * v)
    )
    assert count(enc.co_layers) == 6 * co_layer
    assert count(enc.region_embeddings) == 2048 * 1024 + 1024 + 5 * 1024 + 1024 + 2 * 1024

    total = model.num_parameters()
    print(
        f"\nViLBERT paper-base: {total / 1e6:.1f}M with pretraining heads, encoder {enc.num_parameters() / 1e6:.1f}M "
        f"(text stream {text_stream / 1e6:.1f}M, visual layers {count(enc.visual_layers) / 1e6:.1f}M, "
        f"co-TRM {count(enc.co_layers) / 1e6:.1f}M)"
    )
    assert 200e6 < total < 260e6


# ---------------------------------------------------------------------------
# Shapes and masks
# ---------------------------------------------------------------------------


def test_output_shapes_and_attention_maps():
    model = build()
    out = model(random_batch(), need_weights=True)
    assert out.mlm_logits.shape == (4, 8, VOCAB) and out.mrc_logits.shape == (4, 6, CLASSES)
    assert out.itm_logits.shape == (4, 2)
    enc = out.encoder
    assert enc.text_hidden.shape == (4, 8, 32) and enc.visual_hidden.shape == (4, 7, 24)
    assert enc.pooled_text.shape == enc.pooled_visual.shape == (4, 16)
    assert (enc.pooled_text >= 0).all() and (enc.pooled_visual >= 0).all()  # ReLU poolers
    assert (
        enc.visual_mask[:, 0].all() and enc.visual_mask.sum().item() == 4 + 12
    )  # [IMG] + real regions
    maps = enc.attentions
    assert [m.shape for m in maps.text] == [(4, 2, 8, 8)] * 4
    assert [m.shape for m in maps.visual] == [(4, 2, 7, 7)] * 2
    assert [m.shape for m in maps.text_to_visual] == [(4, 2, 8, 7)] * 2
    assert [m.shape for m in maps.visual_to_text] == [(4, 2, 7, 8)] * 2
    # Sample 3 has no region: its words can only look at [IMG].
    assert torch.allclose(maps.text_to_visual[0][3, :, :, 0], torch.ones(2, 8))


@pytest.mark.parametrize("need_weights", [False, True])
def test_padding_never_changes_real_outputs(need_weights):
    model = build()
    batch = random_batch()
    a, b = (
        model(batch, need_weights=need_weights),
        model(perturb_padding(batch), need_weights=need_weights),
    )
    text, visual = batch["attention_mask"], a.encoder.visual_mask
    torch.testing.assert_close(
        b.encoder.text_hidden[text], a.encoder.text_hidden[text], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        b.encoder.visual_hidden[visual], a.encoder.visual_hidden[visual], atol=1e-5, rtol=1e-5
    )
    for name in ("pooled_text", "pooled_visual"):
        torch.testing.assert_close(
            getattr(b.encoder, name), getattr(a.encoder, name), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(b.mlm_logits[text], a.mlm_logits[text], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        b.mrc_logits[batch["region_mask"]], a.mrc_logits[batch["region_mask"]], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(b.itm_logits, a.itm_logits, atol=1e-5, rtol=1e-5)


def test_co_attention_carries_each_modality_into_the_other():
    """The converse of the padding test: real regions change the text stream, real words the visual one."""
    model = build(ViLBERT)
    batch = random_batch()
    out = model(batch)
    regions = dict(
        batch, region_feats=batch["region_feats"] + batch["region_mask"][..., None].float()
    )
    words = dict(
        batch,
        input_ids=torch.where(
            batch["attention_mask"] & (batch["input_ids"] > 4),
            (batch["input_ids"] - 4) % (VOCAB - 5) + 5,
            batch["input_ids"],
        ),
    )
    assert not torch.allclose(model(regions).text_hidden[:3], out.text_hidden[:3], atol=1e-4)
    assert not torch.allclose(model(words).visual_hidden, out.visual_hidden, atol=1e-4)
    # Without co-TRM layers the streams are independent.
    apart = build(ViLBERT, text_layer_ids=(), visual_layer_ids=())
    torch.testing.assert_close(apart(regions).text_hidden, apart(batch).text_hidden)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_padded_samples_give_no_nan(need_weights):
    """One sample with no region, one with no token at all, one with neither: forward and backward finite."""
    model = build().train()
    batch = random_batch(text_lengths=(8, 0, 0, 3), region_counts=(6, 0, 3, 0))
    out = model(batch, need_weights=need_weights)
    for t in (
        out.mlm_logits,
        out.mrc_logits,
        out.itm_logits,
        out.encoder.text_hidden,
        out.encoder.visual_hidden,
    ):
        assert torch.isfinite(t).all()
    result = pretraining_step(model, batch, generator=torch.Generator().manual_seed(0))
    result["loss"].backward()
    assert all(torch.isfinite(v) for v in result.values()) and finite_grads(model)
    # Nothing real at all in the whole batch: still finite.
    model.zero_grad()
    empty = random_batch(text_lengths=(0,) * 4, region_counts=(0,) * 4)
    result = pretraining_step(model, empty, generator=torch.Generator().manual_seed(0))
    result["loss"].backward()
    assert torch.isfinite(result["loss"]) and finite_grads(model)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda b: b.pop("image_feats"), "image_feats"),
        (lambda b: b.pop("region_loc5"), "region_loc5"),
        (lambda b: b.update(region_loc5=b["region_loc5"][..., :4]), "region_loc5"),
        (lambda b: b.update(attention_mask=b["attention_mask"].long()), "attention_mask"),
        (lambda b: b.update(region_mask=b["region_mask"][:, :5]), "region_mask"),
        (lambda b: b.update(region_feats=b["region_feats"][..., :10]), "region_feats"),
        (lambda b: b.update(region_feats=b["region_feats"][:3]), "region_feats"),
        (lambda b: b.update(image_feats=b["image_feats"][:, None]), "image_feats"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), "input_ids"),
    ],
)
def test_bad_batches_raise_naming_the_key(mutate, key):
    model = build()
    batch = random_batch()
    mutate(batch)
    with pytest.raises(ValueError, match=key):
        model(batch)


def test_pretraining_batches_need_their_keys():
    model = build()
    for key in ("region_soft_labels", "image_index"):
        batch = random_batch()
        batch.pop(key)
        with pytest.raises(ValueError, match=key):
            pretraining_step(model, batch, generator=torch.Generator().manual_seed(0))
    batch = random_batch()
    batch["region_soft_labels"] = batch["region_soft_labels"][..., :5]
    with pytest.raises(ValueError, match="region_soft_labels"):
        pretraining_step(model, batch, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="task"):
        pretraining_step(
            model, random_batch(), task="wra", generator=torch.Generator().manual_seed(0)
        )


# ---------------------------------------------------------------------------
# Save / load, and moving weights
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, name",
    [
        (ViLBERT, "vilbert"),
        (ViLBERTForPretraining, "vilbert_pretraining"),
        (ViLBERTForVQA, "vilbert_vqa"),
    ],
)
def test_save_load_gives_identical_outputs(cls, name, tmp_path):
    assert name in available_models()
    torch.manual_seed(0)
    model = build_model(name, small_config()).eval()
    assert type(model) is cls
    batch = random_batch()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["text_layer_ids"] == [2, 3]
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.config == model.config
    a, b = (
        model(batch, need_weights=True),
        loaded(batch, need_weights=True),
    )  # outputs and attention maps
    leaves_a, leaves_b = (
        [x for x in torch.utils._pytree.tree_leaves(out) if x is not None]  # heads it lacks
        for out in (a, b)
    )
    assert len(leaves_a) == len(leaves_b) > 4
    for x, y in zip(leaves_a, leaves_b):
        assert torch.equal(x, y)


def test_mlm_head_is_tied_to_the_word_embeddings(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    with torch.no_grad():
        loaded.vilbert.text_embeddings.word_embeddings.weight.mul_(2.0)  # the decoder must follow
    out = loaded(random_batch())
    head = loaded.mlm_head
    expected = (
        head.transform(out.encoder.text_hidden)
        @ loaded.vilbert.text_embeddings.word_embeddings.weight.T
    )
    torch.testing.assert_close(out.mlm_logits, expected + head.bias)
    assert head.decoder.weight is loaded.vilbert.text_embeddings.word_embeddings.weight
    assert loaded.num_parameters() == model.num_parameters()  # the shared matrix counted once


def test_vqa_from_encoder_shares_the_encoder(tmp_path):
    pretrained = build()
    with torch.no_grad():
        pretrained.vilbert.visual_pooler[0].bias.add_(0.5)  # something a fresh model would not have
    pretrained.save_pretrained(tmp_path)
    for source in (pretrained, tmp_path):
        vqa = ViLBERTForVQA.from_encoder(source, num_answers=9, classifier_dropout=0.2).eval()
        assert vqa.config.num_answers == 9 and vqa.config.classifier_dropout == 0.2
        for (k, a), (_, b) in zip(
            pretrained.vilbert.state_dict().items(), vqa.vilbert.state_dict().items()
        ):
            assert torch.equal(a, b), k
    batch = random_batch()
    torch.testing.assert_close(
        vqa.vilbert(batch).pooled_visual, pretrained.vilbert(batch).pooled_visual
    )
    assert vqa(batch).shape == (4, 9)
    with pytest.raises(ValueError, match="text_num_layers"):
        load_encoder(build(ViLBERTForVQA, text_num_layers=3, text_layer_ids=(2, 3)), pretrained)
    with pytest.raises(ValueError, match="num_answers"):
        ViLBERTForVQA(small_config(num_answers=0))


def test_load_text_stream_from_bert(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=50,
            max_position_embeddings=64,
        )
    ).eval()
    bert.save_pretrained(tmp_path)
    config = dataclasses.replace(
        small_config(),
        vocab_size=50,
        text_hidden_size=32,
        text_num_layers=2,
        text_num_heads=4,
        text_ffn_size=64,
        text_layer_ids=(1, 2),
    )
    model = ViLBERTForPretraining(config).eval()
    loaded = load_text_stream_from_bert(model, tmp_path)
    assert len(loaded) == 5 + 2 * 12 and "text_layers.1.attention.in_proj_weight" in loaded

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (3, 9), generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 6, 2])[:, None]
    types = torch.randint(0, 2, (3, 9), generator=g)
    with torch.no_grad():
        expected = bert(
            input_ids=ids, attention_mask=mask.long(), token_type_ids=types
        ).last_hidden_state
        ours = model.vilbert.encode_text(ids, mask, types)
    torch.testing.assert_close(ours[mask], expected[mask], atol=1e-5, rtol=1e-5)
    # The whole model still runs on top of it.
    assert torch.isfinite(
        model(dict(random_batch(), input_ids=torch.randint(5, 50, (4, 8)))).mlm_logits
    ).all()

    with pytest.raises(ValueError, match="text_ffn_size"):
        load_text_stream_from_bert(ViLBERT(dataclasses.replace(config, text_ffn_size=48)), tmp_path)
    with pytest.raises(ValueError, match="max_text_len"):
        load_text_stream_from_bert(ViLBERT(dataclasses.replace(config, max_text_len=65)), tmp_path)
    # A checkpoint with a weight missing: transformers would fill it with random numbers; we refuse.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layer.1.output.dense.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        load_text_stream_from_bert(ViLBERT(config), tmp_path)


# ---------------------------------------------------------------------------
# Pretraining: masking, negatives, losses
# ---------------------------------------------------------------------------


def test_mismatched_pairs_get_no_mlm_or_mrc_kl_targets():
    config = small_config()
    batch = random_batch(
        B=8,
        text_lengths=(8, 7, 6, 5, 8, 7, 6, 5),
        region_counts=(6, 5, 4, 3, 6, 5, 4, 3),
        image_index=[0, 1, 1, 2, 3, 3, 4, 5],
        seed=3,
    )
    inputs = prepare_pretraining_inputs(batch, config, torch.Generator().manual_seed(4))
    neg = inputs.itm_labels == 0
    assert 0 < int(neg.sum()) < 8
    # A negative's caption comes from a sample showing another image, never a duplicate of its own.
    partner = inputs.caption_index
    assert (batch["image_index"][partner[neg]] != batch["image_index"][neg]).all()
    assert (partner[~neg] == torch.arange(8)[~neg]).all()
    # Negatives: no MLM labels, no scored regions. Positives: both.
    assert (inputs.mlm_labels[neg] == IGNORE_INDEX).all() and not inputs.region_masked[neg].any()
    assert ((inputs.mlm_labels[~neg] != IGNORE_INDEX).sum(1) > 0).all() and inputs.region_masked[
        ~neg
    ].any(1).all()
    # ...but their inputs are corrupted like everyone's, so masking cannot reveal the label.
    swapped = batch["input_ids"][partner]
    assert (inputs.input_ids[neg] == 4).any() and (inputs.input_ids[~neg] == 4).any()
    assert (inputs.region_feats[neg] != batch["region_feats"][neg]).any()
    assert torch.equal(inputs.attention_mask, batch["attention_mask"][partner])
    unmasked = inputs.mlm_labels == IGNORE_INDEX
    assert torch.equal(
        inputs.input_ids[unmasked & ~neg[:, None]], swapped[unmasked & ~neg[:, None]]
    )
    # [IMG] is the mean of the masked real features, not the batch's (which would leak masked regions).
    expected_img = inputs.region_feats.sum(1) / batch["region_mask"].sum(1, keepdim=True)
    torch.testing.assert_close(inputs.image_feats, expected_img)

    # The MLM and MRC-kl losses send no gradient to the negatives' logits.
    model = build(**{})
    prepared = inputs.batch(batch)
    out = model(prepared)
    mlm_logits = out.mlm_logits.detach().requires_grad_()
    mrc_logits = out.mrc_logits.detach().requires_grad_()
    losses = pretraining_losses(
        out._replace(mlm_logits=mlm_logits, mrc_logits=mrc_logits), prepared, ("mlm", "mrc_kl")
    )
    losses["loss"].backward()
    assert (mlm_logits.grad[neg] == 0).all() and (mlm_logits.grad[~neg] != 0).any()
    assert (mrc_logits.grad[neg] == 0).all() and (mrc_logits.grad[~neg] != 0).any()


def test_pretraining_step_losses_and_gradients():
    model = build().train()
    batch = random_batch(B=6, text_lengths=(8, 7, 6, 5, 4, 3), region_counts=(6, 5, 4, 3, 2, 1))
    batch["image_index"] = torch.arange(6)
    result = pretraining_step(model, batch, generator=torch.Generator().manual_seed(0))
    assert set(result) == {
        "loss",
        "mlm_loss",
        "mrc_kl_loss",
        "itm_loss",
        "mlm_accuracy",
        "itm_accuracy",
    }
    for key in ("mlm_loss", "mrc_kl_loss", "itm_loss"):
        assert torch.isfinite(result[key]) and result[key] > 0 and not result[key].requires_grad
    torch.testing.assert_close(
        result["loss"].detach(), result["mlm_loss"] + result["mrc_kl_loss"] + result["itm_loss"]
    )
    assert 0 <= result["itm_accuracy"] <= 1 and 0 <= result["mlm_accuracy"] <= 1
    assert abs(result["mlm_loss"].item() - math.log(VOCAB)) < 1.0  # near chance at initialisation
    assert abs(result["itm_loss"].item() - math.log(2)) < 0.2
    result["loss"].backward()
    assert finite_grads(model)
    for head in (model.mlm_head, model.mrc_head, model.itm_head, model.vilbert.co_layers):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_pretraining_step_is_the_sum_of_its_parts_and_deterministic():
    model = build()  # eval: no dropout
    batch = random_batch()
    result = pretraining_step(model, batch, generator=torch.Generator().manual_seed(5))
    prepared = prepare_pretraining_inputs(
        batch, model.config, torch.Generator().manual_seed(5)
    ).batch(batch)
    parts = pretraining_losses(model(prepared), prepared, ("mlm", "mrc_kl", "itm"))
    for key in ("mlm_loss", "mrc_kl_loss", "itm_loss", "mlm_accuracy", "itm_accuracy"):
        torch.testing.assert_close(result[key], parts[key])
    # Without a generator, the masks come from the global seed: the same seed, the same step.
    torch.manual_seed(11)
    a = pretraining_step(model, batch)["loss"]
    torch.manual_seed(11)
    b = pretraining_step(model, batch)["loss"]
    c = pretraining_step(model, batch)["loss"]
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_single_task_steps_corrupt_only_their_own_inputs():
    config = small_config()
    batch = random_batch()
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    itm = prepare_pretraining_inputs(batch, config, g(), tasks=("itm",))
    assert torch.equal(itm.input_ids, batch["input_ids"][itm.caption_index])  # no [MASK]
    assert torch.equal(itm.region_feats, batch["region_feats"]) and not itm.region_masked.any()
    mlm = prepare_pretraining_inputs(batch, config, g(), tasks=("mlm",))
    assert (
        torch.equal(mlm.caption_index, torch.arange(4)) and (mlm.itm_labels == IGNORE_INDEX).all()
    )
    assert (mlm.mlm_labels != IGNORE_INDEX).any() and torch.equal(
        mlm.region_feats, batch["region_feats"]
    )
    model = build()
    for task in ("mlm", "mrc_kl", "itm"):
        result = pretraining_step(model, batch, task=task, generator=g())
        assert set(result) == {"loss", f"{task}_loss"} | (
            {f"{task}_accuracy"} if task in ("mlm", "itm") else set()
        )
        torch.testing.assert_close(result["loss"].detach(), result[f"{task}_loss"])
    itm_only = dict(batch)
    itm_only.pop("region_soft_labels")  # not needed without MRC-kl
    assert set(pretraining_step(model, itm_only, task="itm", generator=g())) == {
        "loss",
        "itm_loss",
        "itm_accuracy",
    }


def test_grounded_words_are_masked_at_their_own_chance():
    batch = random_batch()
    real = batch["attention_mask"] & (batch["input_ids"] > 4)
    grounded_ids = tuple(sorted(set(batch["input_ids"][real].tolist()))[::2])  # half the words
    config = small_config(grounded_word_ids=grounded_ids, grounded_word_probability=1.0)
    assert ViLBERTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    mlm = prepare_pretraining_inputs(
        batch, config, torch.Generator().manual_seed(2), tasks=("mlm",)
    )
    grounded = torch.isin(batch["input_ids"], torch.tensor(grounded_ids)) & real
    assert grounded.any() and (mlm.mlm_labels != IGNORE_INDEX)[grounded].all()
    with pytest.raises(ValueError, match="grounded_probability"):
        small_config(grounded_word_ids=grounded_ids)
    with pytest.raises(ValueError, match="grounded_ids"):
        small_config(grounded_word_ids=(VOCAB,), grounded_word_probability=0.5)


# ---------------------------------------------------------------------------
# Downstream: VQA and retrieval
# ---------------------------------------------------------------------------


def test_vqa_step():
    model = build(ViLBERTForVQA).train()
    result = vqa_step(model, random_batch())
    assert torch.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
    result["loss"].backward()
    assert finite_grads(model) and model.classifier[0].weight.grad.abs().sum() > 0
    logits, maps = model.eval()(random_batch(), need_weights=True)
    assert logits.shape == (4, ANSWERS) and len(maps.text_to_visual) == 2


def test_pair_scores_rank_every_image_caption_pair():
    model = build()
    batch = random_batch()
    images = {
        k: batch[k][:3] for k in ("region_feats", "region_loc5", "region_mask", "image_feats")
    }
    texts = {k: batch[k] for k in ("input_ids", "attention_mask")}
    scores = pair_scores(model, images, texts, batch_size=5)
    assert scores.shape == (3, 4)
    pair = {**{k: v[2:3] for k, v in images.items()}, **{k: v[1:2] for k, v in texts.items()}}
    logits = model(pair).itm_logits
    torch.testing.assert_close(scores[2, 1], logits[0, 1] - logits[0, 0])
    recall = image_text_recall(scores, torch.tensor([0, 1, 2, 0]))
    assert set(recall) >= {"i2t_R@1", "t2i_R@1"}
    with pytest.raises(ValueError, match="texts"):
        pair_scores(model, images, {"input_ids": texts["input_ids"]})


# ---------------------------------------------------------------------------
# A tiny overfit with fusionlib.train
# ---------------------------------------------------------------------------


class TinyCaptions(Dataset):
    """8 images x 2 captions; each caption names its image's region classes, so all three losses can be learned."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for image in range(8):
            classes = torch.randperm(CLASSES, generator=g)[:4]
            feats = F.one_hot(classes, D).float() + 0.1 * torch.randn(4, D, generator=g)
            soft = 0.9 * F.one_hot(classes, CLASSES).float() + 0.1 / CLASSES
            loc = torch.rand(4, 5, generator=g)
            for caption in range(2):
                order = classes if caption == 0 else classes.flip(0)
                self.items.append(
                    {
                        "input_ids": torch.cat([torch.tensor([2]), 5 + order, torch.tensor([3])]),
                        "region_feats": feats,
                        "region_loc5": loc,
                        "region_mask": torch.ones(4, dtype=torch.bool),
                        "region_soft_labels": soft / soft.sum(-1, keepdim=True),
                        "image_feats": feats.mean(0),
                        "image_index": torch.tensor(image),
                    }
                )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_tiny_pretraining_run_reduces_the_loss():
    """80 steps of MLM + MRC-kl + ITM with fusionlib.train: the summed loss and its MLM and MRM parts fall.

    (ITM stays near log 2 this early: it learns once MLM/MRM have grounded words in regions,
    after ~200 steps at the book's size; too long for a unit test.)
    """
    torch.manual_seed(0)
    model = ViLBERTForPretraining(small_config(dropout=0.0))
    loader = DataLoader(TinyCaptions(), batch_size=16, shuffle=True, collate_fn=collate)
    history = train(
        model,
        loader,
        TrainConfig(steps=80, lr=3e-3, warmup_steps=5, seed=0),
        pretraining_step,
        device="cpu",
        progress=False,
    )
    mean = lambda key, part: sum(part(history.train[key])) / 5  # noqa: E731
    first, last = (lambda x: x[:5]), (lambda x: x[-5:])
    print(
        f"\ntiny ViLBERT pretraining, mean of first/last 5 steps: "
        + ", ".join(
            f"{k} {mean(k, first):.3f} -> {mean(k, last):.3f}"
            for k in ("loss", "mlm_loss", "mrc_kl_loss", "itm_loss")
        )
    )
    assert mean("loss", last) < 0.75 * mean("loss", first)
    assert mean("mlm_loss", last) < 0.75 * mean("mlm_loss", first)
    assert mean("mrc_kl_loss", last) < mean("mrc_kl_loss", first)
    assert all(math.isfinite(v) for v in history.train["loss"])


def test_vqa_mean_pooling_reads_the_mean_of_the_real_words(tmp_path):
    """vqa_pooling="mean": the classifier reads the masked mean of the text stream, blind to padding."""
    b = random_batch()
    model = build(ViLBERTForVQA, vqa_pooling="mean")
    assert model.classifier[0].in_features == model.config.text_hidden_size
    with torch.no_grad():
        logits = model(b)
        text = model.vilbert(b).text_hidden  # (B, T, text_hidden)
        words = b["attention_mask"]
        by_hand = torch.stack([text[i][words[i]].mean(0) for i in range(len(words))])
        torch.testing.assert_close(logits, model.classifier(by_hand))
        torch.testing.assert_close(model(perturb_padding(b)), logits)
    pretrained = build()
    vqa = ViLBERTForVQA.from_encoder(pretrained, num_answers=ANSWERS, vqa_pooling="mean")
    assert (
        vqa.config.vqa_pooling == "mean"
        and vqa.classifier[0].in_features == vqa.config.text_hidden_size
    )
    vqa.save_pretrained(tmp_path / "vqa")
    again = load_pretrained(tmp_path / "vqa").eval()
    torch.testing.assert_close(again(b), vqa.eval()(b))
    with pytest.raises(ValueError, match="vqa_pooling"):
        small_config(vqa_pooling="cls")


def test_img_location_moves_only_the_img_token(tmp_path):
    """config.img_location moves the [IMG] token's box (and only its); it survives save/load."""
    from fusionlib.models.vilbert import IMG_LOCATION, STANDARDISED_IMG_LOCATION

    box = STANDARDISED_IMG_LOCATION
    assert box != IMG_LOCATION and len(box) == len(IMG_LOCATION)
    b = random_batch()
    raw, moved = build(ViLBERTForVQA), build(ViLBERTForVQA, img_location=box)
    with torch.no_grad():
        visual_raw, _ = raw.vilbert.embed_visual(
            b["region_feats"], b["region_loc5"], b["region_mask"], b["image_feats"]
        )
        visual_moved, _ = moved.vilbert.embed_visual(
            b["region_feats"], b["region_loc5"], b["region_mask"], b["image_feats"]
        )
        by_hand = moved.vilbert.region_embeddings(
            b["image_feats"][:, None], torch.tensor(box).expand(4, 1, 5)
        )
    torch.testing.assert_close(visual_moved[:, 1:], visual_raw[:, 1:])  # the regions do not move
    torch.testing.assert_close(visual_moved[:, :1], by_hand)  # [IMG] sits at the given box
    assert not torch.allclose(visual_moved[:, 0], visual_raw[:, 0])
    moved.save_pretrained(tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    assert again.config.img_location == box
    torch.testing.assert_close(again.eval()(b), moved(b))
    with pytest.raises(ValueError, match="img_location"):
        small_config(img_location=(0.0, 0.0, 1.0, 1.0))


def test_co_attention_first_preset_is_small_with_the_streams_meeting_first():
    """The book's preset: small()'s widths, schedule C0 | T0 V0 C1 | T1; other changes pass through."""
    config = ViLBERTConfig.co_attention_first(VOCAB, CLASSES, region_dim=D, text_hidden_size=32)
    assert config == ViLBERTConfig.small(
        VOCAB,
        CLASSES,
        region_dim=D,
        text_hidden_size=32,
        text_num_layers=2,
        text_layer_ids=(0, 1),
        visual_num_layers=1,
        visual_layer_ids=(0, 1),
    )
    assert layer_schedule(config) == [("co", 0), ("text", 0), ("visual", 0), ("co", 1), ("text", 1)]


@pytest.mark.parametrize("word_order", [True, False])
def test_without_word_order_the_text_is_a_bag_of_words(word_order):
    model = build(word_order=word_order, initializer_range=0.2).eval()  # positions matter at once
    batch = random_batch()
    shuffled = dict(batch)
    ids = batch["input_ids"].clone()
    ids[0, 1:-1] = ids[0, 1:-1].flip(0)  # row 0 fills the width: [CLS] words reversed [SEP]
    shuffled["input_ids"] = ids
    with torch.no_grad():
        # What [CLS] reads of the sentence (its MLM logits), and the ITM head's verdict.
        same = torch.cat([model(batch, "mlm").mlm_logits[0, 0], model.itm_logits(batch)[0]])
        other = torch.cat([model(shuffled, "mlm").mlm_logits[0, 0], model.itm_logits(shuffled)[0]])
    if word_order:
        assert (same - other).abs().max() > 1e-3  # the positions make the reversal visible
    else:
        torch.testing.assert_close(same, other, atol=1e-5, rtol=1e-5)
        assert "text_embeddings.position_embeddings.weight" not in model.state_dict().keys() and (
            not any("position_embeddings" in k for k in model.state_dict())
        )
    with pytest.raises(ValueError, match="word_order"):
        build(word_order="no")
