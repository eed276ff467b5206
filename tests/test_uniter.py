"""fusionlib.models.uniter: embeddings, tied heads, task-sampled pretraining, WRA, save/load (chapter 6).

Batches are built synthetically (random tensors with the keys of
``fusionlib.data.datasets.collate``), so these tests do not depend on the
data pipeline. Special ids follow fusionlib's tokenizer: [PAD]=0 [UNK]=1
[CLS]=2 [SEP]=3 [MASK]=4.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fusionlib import runtime
from fusionlib.embeddings import UniterImageEmbeddings
from fusionlib.losses import WRA_WEIGHT
from fusionlib.masking import IGNORE_INDEX
from fusionlib.models import available_models, build_model, load_pretrained
from fusionlib.models.uniter import (
    PRETRAINING_TASKS,
    UNITER_TASK_MIX,
    UniterConfig,
    UniterForPretraining,
    UniterForVQA,
    UniterModel,
    masked_word_accuracy,
    pair_scores,
    prepare_pretraining_batch,
    pretraining_loaders,
    pretraining_step,
    vqa_step,
    word_region_alignment,
)
from fusionlib.models.vl_base import pretraining_losses
from fusionlib.train import TrainConfig, train

VOCAB, CLASSES, D, ANSWERS = 40, 6, 12, 5
CLS, SEP = 2, 3
MASKING_TASKS = ("mlm", "mrfr", "mrc", "mrc_kl")


def tiny_config(**changes):
    # Random token ids say nothing the truth judge could read: these batches draw UNITER's random negatives.
    return UniterConfig(
        **{
            "vocab_size": VOCAB,
            "num_region_classes": CLASSES,
            "region_dim": D,
            "hidden_size": 16,
            "num_layers": 2,
            "num_heads": 2,
            "ffn_size": 32,
            "max_text_len": 12,
            "itm_negatives": "random",
            **changes,
        }
    )


def build(cls=UniterForPretraining, **changes):
    torch.manual_seed(0)
    return cls(tiny_config(**changes)).eval()


def random_batch(
    B=5,
    T=9,
    R=6,
    text_lengths=(9, 6, 4, 3, 9),
    region_counts=(6, 4, 2, 1, 0),
    seed=0,
    image_index=None,
):
    """A batch dict like ``collate`` makes: ``[CLS] words [SEP]``, right-padded; real regions first."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(text_lengths)
    attention_mask = torch.arange(T)[None] < lengths[:, None]
    input_ids = torch.randint(5, VOCAB, (B, T), generator=g).masked_fill(~attention_mask, 0)
    input_ids[:, 0] = CLS
    input_ids[torch.arange(B), (lengths - 1).clamp(min=0)] = SEP
    input_ids = input_ids.masked_fill(~attention_mask, 0)
    region_mask = torch.arange(R)[None] < torch.tensor(region_counts)[:, None]
    real = region_mask[..., None]
    soft = torch.softmax(2 * torch.randn(B, R, CLASSES, generator=g), -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_feats": torch.randn(B, R, D, generator=g) * real,
        "region_loc7": torch.rand(B, R, 7, generator=g) * real,
        "region_mask": region_mask,
        "region_soft_labels": soft * real,
        "image_index": torch.arange(B) if image_index is None else torch.as_tensor(image_index),
    }


def perturb_padding(batch, seed=1):
    """The same batch with garbage at every padded token and region."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    pad_t, pad_r = ~batch["attention_mask"], ~batch["region_mask"]
    out["input_ids"] = torch.where(
        pad_t, torch.randint(5, VOCAB, pad_t.shape, generator=g), batch["input_ids"]
    )
    for key in ("region_feats", "region_loc7"):
        out[key] = torch.where(
            pad_r[..., None], 50 * torch.randn(batch[key].shape, generator=g), batch[key]
        )
    return out


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny: on a busy 2-core machine a second intra-op thread only adds waiting
    # (measured: a 2-layer step took 7 ms on one thread and up to 100x that on two under load).
    with runtime.num_threads(1):
        yield


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------


def _randomise_norms(module, seed=0):
    g = gen(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def test_image_embedding_formula_by_hand():
    torch.manual_seed(0)
    emb = UniterImageEmbeddings(D, 16, location_dim=7, dropout=0.3).eval()
    _randomise_norms(emb)
    b = random_batch()
    feats, loc = b["region_feats"], b["region_loc7"]
    type_emb = torch.randn(16)
    zeroed = torch.zeros(feats.shape[:2], dtype=torch.bool)
    zeroed[0, 1] = zeroed[2, 0] = True

    def ln(x, norm):
        return F.layer_norm(x, (16,), norm.weight, norm.bias, norm.eps)

    masked_feats = torch.where(zeroed[..., None], emb.mask_embedding.expand_as(feats), feats)
    image = ln(masked_feats @ emb.img_linear.weight.T + emb.img_linear.bias, emb.img_layer_norm)
    where = ln(loc @ emb.pos_linear.weight.T + emb.pos_linear.bias, emb.pos_layer_norm)
    expected = ln(image + where + type_emb, emb.norm)
    torch.testing.assert_close(emb(feats, loc, type_emb, zeroed), expected, atol=1e-5, rtol=1e-5)
    # A zeroed region's own feature does not matter at all, whatever it was.
    garbage = feats.clone()
    garbage[0, 1] = 1e6
    torch.testing.assert_close(emb(garbage, loc, type_emb, zeroed), expected, atol=1e-5, rtol=1e-5)
    # Without the learned [MASK] feature, a masked region's image part is LN(bias) alone.
    plain = UniterImageEmbeddings(D, 16, mask_embedding=False).eval()
    assert plain.mask_embedding is None
    out = plain(feats, loc, type_emb, zeroed)
    image0 = F.layer_norm(
        plain.img_linear.bias,
        (16,),
        plain.img_layer_norm.weight,
        plain.img_layer_norm.bias,
        plain.img_layer_norm.eps,
    )
    where0 = F.layer_norm(
        loc[0, 1] @ plain.pos_linear.weight.T + plain.pos_linear.bias,
        (16,),
        plain.pos_layer_norm.weight,
        plain.pos_layer_norm.bias,
        plain.pos_layer_norm.eps,
    )
    torch.testing.assert_close(
        out[0, 1],
        F.layer_norm(
            image0 + where0 + type_emb, (16,), plain.norm.weight, plain.norm.bias, plain.norm.eps
        ),
        atol=1e-5,
        rtol=1e-5,
    )
    # Dropout is applied in training mode.
    emb.train()
    assert not torch.allclose(emb(feats, loc, type_emb), emb(feats, loc, type_emb))


def test_the_model_embeds_regions_as_type_1_and_words_as_type_0_of_one_table():
    model = build(UniterModel)
    _randomise_norms(model)
    b = random_batch()
    seen = {}
    model.image_embeddings.register_forward_hook(
        lambda m, args, out: seen.__setitem__("image", out)
    )
    model.text_embeddings.register_forward_hook(lambda m, args, out: seen.__setitem__("text", out))
    model(b)
    types = model.text_embeddings.token_type_embeddings.weight
    assert types.shape[0] == 2
    ie = model.image_embeddings
    expected_image = ie(b["region_feats"], b["region_loc7"], types[1])
    torch.testing.assert_close(seen["image"], expected_image)
    te = model.text_embeddings
    T = b["input_ids"].shape[1]
    words = te.word_embeddings(b["input_ids"]) + te.position_embeddings.weight[:T] + types[0]
    torch.testing.assert_close(
        seen["text"], F.layer_norm(words, (16,), te.norm.weight, te.norm.bias, te.norm.eps)
    )
    # The [PAD] row starts at zero after UNITER's N(0, 0.02) initialisation.
    assert torch.count_nonzero(te.word_embeddings.weight[0]) == 0
    assert 0.01 < float(te.word_embeddings.weight[5:].detach().std()) < 0.03


# ---------------------------------------------------------------------------
# The encoder: one sequence, padding, attention maps
# ---------------------------------------------------------------------------


def test_encoder_output_shapes_and_padding_never_changes_real_positions():
    model = build(UniterModel)
    b = random_batch()
    out = model(b)
    B, T, R = 5, 9, 6
    assert (
        out.sequence.shape == (B, T + R, 16) and out.pooled.shape == (B, 16) and out.num_text == T
    )
    assert out.text.shape == (B, T, 16) and out.regions.shape == (B, R, 16)
    torch.testing.assert_close(out.mask, torch.cat([b["attention_mask"], b["region_mask"]], 1))
    torch.testing.assert_close(out.pooled, torch.tanh(model.pooler(out.sequence[:, 0])))
    other = model(perturb_padding(b))
    torch.testing.assert_close(
        other.sequence[out.mask], out.sequence[out.mask], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(other.pooled, out.pooled, atol=1e-5, rtol=1e-5)
    # Extra padding (more pad tokens, more pad regions) changes nothing either.
    wider = dict(b)
    wider["input_ids"] = F.pad(b["input_ids"], (0, 2))
    wider["attention_mask"] = F.pad(b["attention_mask"], (0, 2))
    for key in ("region_feats", "region_loc7", "region_soft_labels"):
        wider[key] = F.pad(b[key], (0, 0, 0, 3))
    wider["region_mask"] = F.pad(b["region_mask"], (0, 3))
    w = model(wider)
    torch.testing.assert_close(
        w.text[:, :T][b["attention_mask"]], out.text[b["attention_mask"]], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        w.regions[:, :R][b["region_mask"]], out.regions[b["region_mask"]], atol=1e-5, rtol=1e-5
    )


def test_attention_maps_and_their_text_to_region_block():
    model = build(UniterModel)
    b = random_batch()
    out = model(b, need_weights=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (5, 2, 15, 15)
    t2r = out.text_to_region()
    assert t2r.shape == (5, 2, 9, 6) and out.region_to_text(0).shape == (5, 2, 6, 9)
    torch.testing.assert_close(
        out.attentions[-1].sum(-1)[out.mask[:, None].expand(-1, 2, -1)],
        torch.ones(int(out.mask.sum()) * 2),
        atol=1e-5,
        rtol=1e-5,
    )
    assert torch.all(
        t2r.masked_select(~b["region_mask"][:, None, None, :]) == 0
    )  # padded regions: no attention
    torch.testing.assert_close(t2r, out.attentions[-1][:, :, :9, 9:])
    # The written-out attention (need_weights) and the fused kernel agree.
    torch.testing.assert_close(model(b).sequence, out.sequence, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="need_weights"):
        model(b).text_to_region()


# ---------------------------------------------------------------------------
# Tied weights
# ---------------------------------------------------------------------------


def test_mrfr_output_weight_is_the_image_projection():
    model = build()
    img_linear = model.uniter.image_embeddings.img_linear
    head = model.mrfr_head
    assert (
        head.weight is img_linear.weight and head.weight.data_ptr() == img_linear.weight.data_ptr()
    )
    assert model.mlm_head.decoder.weight is model.uniter.text_embeddings.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "mrfr_head.weight" not in names and "uniter.image_embeddings.img_linear.weight" in names
    assert model.num_parameters() == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values()
    )
    # The head computes F.linear(transform(h), img_linear.weight.T, bias)...
    h = torch.randn(3, 4, 16, generator=gen())
    torch.testing.assert_close(
        head(h), F.linear(head.transform(h), img_linear.weight.t(), head.bias)
    )
    # ...so MRFR's gradient reaches the image projection through the head's output layer as well.
    (grad,) = torch.autograd.grad(head(h).pow(2).sum(), img_linear.weight)
    assert grad.abs().sum() > 0
    # One optimizer step on the MRFR loss moves the one shared matrix, seen from both places.
    model.train()
    before = img_linear.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pretraining_step(model, random_batch(), "mrfr", gen())["loss"].backward()
    optimizer.step()
    assert not torch.equal(img_linear.weight, before)
    assert head.weight is img_linear.weight and torch.equal(head.weight, img_linear.weight)


# ---------------------------------------------------------------------------
# Task sampling and conditional masking
# ---------------------------------------------------------------------------


class Pairs(Dataset):
    """Caption-like items for ``collate``: ``[CLS] w [SEP]`` and a few regions of an image ``i % images``."""

    def __init__(self, n=8, images=8, seed=0):
        g = gen(seed)
        self.n, self.images = n, images
        self.feats = torch.randn(images, 3, D, generator=g)
        self.loc7 = torch.rand(images, 3, 7, generator=g)
        self.soft = torch.softmax(3 * torch.randn(images, 3, CLASSES, generator=g), -1)
        # Each image's caption names its image (word 5 + image) and two more words that differ per image.
        self.words = torch.randint(5, VOCAB, (images, 2), generator=g)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = i % self.images
        ids = torch.tensor([CLS, 5 + img, *self.words[img].tolist(), SEP])
        return {
            "input_ids": ids,
            "region_feats": self.feats[img],
            "region_loc7": self.loc7[img],
            "region_mask": torch.ones(3, dtype=torch.bool),
            "region_soft_labels": self.soft[img],
            "image_index": torch.tensor(img),
        }


def test_task_sampling_frequencies_follow_uniters_mix():
    loaders = pretraining_loaders(Pairs(), batch_size=4)
    assert set(loaders) == set(UNITER_TASK_MIX) and len({id(v) for v in loaders.values()}) == len(
        loaders
    )
    seen = []

    def step_fn(model, batch, task):  # a dummy step: count the task, return any loss
        seen.append(task)
        return {"loss": model(batch["region_feats"][:, 0, :1]).pow(2).mean()}

    steps = 1200
    history = train(
        nn.Linear(1, 1),
        loaders,
        TrainConfig(steps=steps, lr=1e-4),
        step_fn,
        task_mix=UNITER_TASK_MIX,
        device="cpu",
        progress=False,
    )
    assert history.train["task"] == seen and len(seen) == steps
    total = sum(UNITER_TASK_MIX.values())
    for task, weight in UNITER_TASK_MIX.items():
        p = weight / total
        tolerance = 4 * math.sqrt(p * (1 - p) / steps)  # 4 standard deviations of a binomial share
        assert seen.count(task) / steps == pytest.approx(p, abs=tolerance), task
    with pytest.raises(TypeError):
        UNITER_TASK_MIX["mrc"] = 1  # the default mix is read-only
    with pytest.raises(ValueError, match="tasks"):
        pretraining_loaders(Pairs(), 4, ("mlm", "vqa"))


@pytest.mark.parametrize("task", MASKING_TASKS)
def test_conditional_masking_masks_exactly_one_modality_per_sample(task):
    config = tiny_config()
    for seed in range(5):
        b = random_batch(seed=seed)
        p = prepare_pretraining_batch(b, task, config, gen(seed))
        has_text = (b["attention_mask"] & (b["input_ids"] > 4)).any(1)
        has_regions = b["region_mask"].any(1)
        text_scored = (p["mlm_labels"] != IGNORE_INDEX).any(1)
        regions_scored = p["region_masked"].any(1)
        assert not torch.any(text_scored & regions_scored)  # never both
        if task == "mlm":  # words only, the image intact
            assert torch.equal(text_scored, has_text) and torch.equal(p["text_masked"], has_text)
            assert not p["region_zeroed"].any() and not p["image_masked"].any()
            changed = p["input_ids"] != b["input_ids"]
            assert not torch.any(
                changed & (p["mlm_labels"] == IGNORE_INDEX)
            )  # only chosen words change
        else:  # regions only, the sentence intact
            assert torch.equal(regions_scored, has_regions) and torch.equal(
                p["image_masked"], has_regions
            )
            assert torch.equal(p["input_ids"], b["input_ids"]) and not p["text_masked"].any()
            assert torch.equal(
                p["region_zeroed"], p["region_masked"]
            )  # UNITER zeroes every masked region
            assert not torch.any(p["region_masked"] & ~b["region_mask"])  # never a padded region
        assert torch.equal(
            p["region_feats"], b["region_feats"]
        )  # the MRFR target stays the original
        assert torch.all(p["itm_labels"] == 1)  # matched pairs only
    assert "mlm_labels" not in b  # the input batch is not modified


def test_joint_masking_masks_both_modalities_and_itm_masks_nothing():
    config = tiny_config(masking="joint")
    b = random_batch()
    for task in MASKING_TASKS:
        p = prepare_pretraining_batch(b, task, config, gen())
        both = (b["attention_mask"] & (b["input_ids"] > 4)).any(1) & b["region_mask"].any(1)
        assert torch.equal(
            (p["mlm_labels"] != IGNORE_INDEX).any(1) & p["region_masked"].any(1), both
        )
    p = prepare_pretraining_batch(b, "itm", config, gen())
    assert torch.all(p["mlm_labels"] == IGNORE_INDEX) and not p["region_zeroed"].any()
    assert torch.equal(p["input_ids"], b["input_ids"])


@pytest.mark.parametrize("masking", ["conditional", "joint"])
def test_grounded_words_are_masked_at_their_own_chance(masking):
    b = random_batch()
    real = b["attention_mask"] & (b["input_ids"] > 4)
    grounded_ids = tuple(sorted(set(b["input_ids"][real].tolist()))[::2])  # half the words
    config = tiny_config(
        masking=masking, grounded_word_ids=grounded_ids, grounded_word_probability=1.0
    )
    p = prepare_pretraining_batch(b, "mlm", config, gen())
    grounded = torch.isin(b["input_ids"], torch.tensor(grounded_ids)) & real
    assert grounded.any() and (p["mlm_labels"] != IGNORE_INDEX)[grounded].all()
    with pytest.raises(ValueError, match="grounded_ids"):
        tiny_config(grounded_word_probability=0.5)


def test_itm_negatives_swap_in_another_image_never_a_duplicate():
    config = tiny_config(itm_negative_probability=0.5)
    image_index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])  # pairs of captions share an image
    b = random_batch(
        B=8, text_lengths=(9,) * 8, region_counts=(6, 5, 4, 3, 2, 1, 6, 5), image_index=image_index
    )
    labels = []
    for seed in range(30):
        p = prepare_pretraining_batch(b, "itm", config, gen(seed))
        for i in range(8):
            # Where did row i's image come from? (Every row of the test batch has distinct features.)
            (k,) = [k for k in range(8) if torch.equal(p["region_feats"][i], b["region_feats"][k])]
            if p["itm_labels"][i] == 1:
                assert k == i
            else:
                assert int(image_index[k]) != int(
                    image_index[i]
                )  # never the same image, nor a duplicate
            for key in ("region_loc7", "region_mask", "region_soft_labels", "image_index"):
                assert torch.equal(p[key][i], b[key][k]), key  # the whole image moves together
            assert torch.equal(p["input_ids"][i], b["input_ids"][i])  # the caption stays
        labels.append(p["itm_labels"])
    share = torch.cat(labels).float().mean()
    assert 0.35 < share < 0.65  # p = 0.5


# ---------------------------------------------------------------------------
# ITM + WRA
# ---------------------------------------------------------------------------


def test_wra_ignores_padding_and_matched_pairs_pull_unmatched_push():
    model = build()
    b = random_batch()
    out = model.uniter(b)
    distance, plan = word_region_alignment(out, b["attention_mask"], b["region_mask"])
    joint = b["attention_mask"][:, :, None] & b["region_mask"][:, None, :]
    assert torch.all(plan.masked_select(~joint) == 0)  # padding gets no transport mass
    has = joint.any(dim=(1, 2))
    n_regions = b["region_mask"].sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(
        plan.sum(1)[has], (b["region_mask"] / n_regions)[has]
    )  # column marginals
    n_words = b["attention_mask"].sum(1, keepdim=True)
    torch.testing.assert_close(
        plan.sum(2)[has], (b["attention_mask"] / n_words)[has], atol=2e-3, rtol=0
    )
    assert float(distance[~has].detach().abs().sum()) == 0  # no regions: nothing to align
    # The ITM step's loss: itm + 0.1 * wra, with wra = (sum d_matched - sum d_unmatched) / B.
    seed = next(
        s
        for s in range(100)  # a draw with both kinds of pair
        if 0
        < int(prepare_pretraining_batch(b, "itm", model.config, gen(s))["itm_labels"].sum())
        < 5
    )
    p = prepare_pretraining_batch(b, "itm", model.config, gen(seed))
    result = pretraining_step(model, b, "itm", gen(seed))  # the same draw as p
    assert set(result) == {"loss", "itm_loss", "itm_accuracy", "wra_loss"}
    d, _ = word_region_alignment(model.uniter(p), p["attention_mask"], p["region_mask"])
    torch.testing.assert_close(model(p, "itm").wra_distance, d)
    labels = p["itm_labels"]
    wra = (d[labels == 1].sum() - d[labels == 0].sum()) / len(labels)
    torch.testing.assert_close(result["wra_loss"], wra)
    torch.testing.assert_close(result["loss"], result["itm_loss"] + WRA_WEIGHT * wra)
    # Changing what sits in padded words and regions changes nothing.
    again = pretraining_step(model, perturb_padding(b), "itm", gen(seed))
    torch.testing.assert_close(again["loss"], result["loss"], atol=1e-5, rtol=1e-5)
    # Without WRA the loss is the ITM loss alone.
    model.config = model.config.replace(use_wra=False)
    assert model(p, "itm").wra_distance is None
    plain = pretraining_step(model, b, "itm", gen(seed))
    assert "wra_loss" not in plain
    torch.testing.assert_close(plain["loss"], result["itm_loss"])


def test_wra_is_float32_under_bf16_autocast():
    """ITM steps run under bf16 autocast on CUDA (TrainConfig.amp); WRA stays in float32, as in UNITER."""
    model = build()
    b = random_batch()
    out = model.uniter(b)
    distance, plan = word_region_alignment(out, b["attention_mask"], b["region_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance_amp, plan_amp = word_region_alignment(out, b["attention_mask"], b["region_mask"])
        result = pretraining_step(model, b, "itm", gen(0))
    assert distance_amp.dtype == plan_amp.dtype == result["wra_loss"].dtype == torch.float32
    torch.testing.assert_close(plan_amp, plan, rtol=0, atol=1e-6)
    torch.testing.assert_close(distance_amp, distance, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# Degenerate inputs and errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", PRETRAINING_TASKS)
@pytest.mark.parametrize("masking", ["conditional", "joint"])
def test_no_nan_on_fully_padded_inputs(task, masking):
    model = build(masking=masking).train()
    # Sample 0: text but no regions; sample 1: nothing at all; sample 2: regions only, padded text.
    b = random_batch(B=4, text_lengths=(5, 0, 0, 9), region_counts=(0, 0, 3, 6))
    no_regions = random_batch(B=3, text_lengths=(9, 4, 2), region_counts=(0, 0, 0))
    no_region_slots = random_batch(B=3, R=0, text_lengths=(9, 4, 2), region_counts=(0, 0, 0))
    for batch in (b, no_regions, no_region_slots):
        model.zero_grad()
        out = pretraining_step(model, batch, task, gen())
        assert torch.isfinite(out["loss"]), (task, out)
        out["loss"].backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    vqa = build(UniterForVQA, num_answers=ANSWERS).train()
    logits = vqa(b)
    assert torch.isfinite(logits).all()
    logits.sum().backward()


def test_clear_errors_for_bad_batches_and_configs():
    model = build()
    b = random_batch()
    missing = {k: v for k, v in b.items() if k != "region_feats"}
    with pytest.raises(ValueError, match="region_feats"):
        model.uniter(missing)
    with pytest.raises(ValueError, match="region_feats"):
        model.uniter({**b, "region_feats": b["region_feats"][..., :5]})
    with pytest.raises(ValueError, match="region_loc7"):
        model.uniter({**b, "region_loc7": b["region_loc7"][..., :5]})
    with pytest.raises(ValueError, match="attention_mask"):
        model.uniter({**b, "attention_mask": b["attention_mask"].long()})
    with pytest.raises(ValueError, match="region_mask"):
        model.uniter({**b, "region_mask": b["region_mask"][:, :3]})
    with pytest.raises(ValueError, match="max_position"):
        model.uniter(
            {
                **b,
                "input_ids": torch.full((5, 20), 7),
                "attention_mask": torch.ones(5, 20, dtype=torch.bool),
            }
        )
    with pytest.raises(ValueError, match="task"):
        pretraining_step(model, b, "contrastive", gen())
    with pytest.raises(ValueError, match="image_index"):
        pretraining_step(model, {k: v for k, v in b.items() if k != "image_index"}, "itm", gen())
    with pytest.raises(ValueError, match="region_soft_labels"):
        pretraining_step(
            model, {k: v for k, v in b.items() if k != "region_soft_labels"}, "mrc_kl", gen()
        )
    with pytest.raises(ValueError, match="mlm_labels"):
        pretraining_losses(model(b, "mlm"), b, ("mlm",))  # an unprepared batch
    with pytest.raises(ValueError, match="task"):
        model(b, "mrm")  # ViLBERT's paper name: here "mrc_kl"
    with pytest.raises(TypeError, match="UniterForPretraining"):
        pretraining_step(nn.Linear(2, 2), b, "mlm", gen())
    with pytest.raises(TypeError, match="generator"):
        pretraining_step(model, b, "mlm", 0)
    for field, value in (
        ("vocab_size", 0),
        ("num_heads", 3),
        ("masking", "both"),
        ("mask_token_id", VOCAB),
        ("location_dim", 4),
        ("mask_probability", 0.0),
        ("mrc_background_class", CLASSES),
        ("itm_negative_probability", 1.5),
        ("num_answers", 0),
    ):
        with pytest.raises(ValueError, match=field if field != "num_heads" else "num_heads"):
            tiny_config(**{field: value})
    with pytest.raises(ValueError, match="num_answers"):
        UniterForVQA(tiny_config())


# ---------------------------------------------------------------------------
# Save / load, downstream
# ---------------------------------------------------------------------------


def test_save_load_gives_identical_outputs_and_keeps_the_ties(tmp_path):
    model = build()
    assert {"uniter", "uniter_pretraining", "uniter_vqa"} <= set(available_models())
    b = random_batch()
    expected = {t: pretraining_step(model, b, t, gen(7))["loss"] for t in PRETRAINING_TASKS}
    model.save_pretrained(tmp_path / "pre")
    meta = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert meta["model_class"] == "UniterForPretraining" and meta["config"][
        "special_token_ids"
    ] == [0, 1, 2, 3, 4]
    loaded = load_pretrained(tmp_path / "pre")
    assert isinstance(loaded, UniterForPretraining) and loaded.config == model.config
    for t in PRETRAINING_TASKS:
        torch.testing.assert_close(
            pretraining_step(loaded, b, t, gen(7))["loss"], expected[t], atol=0, rtol=0
        )
    assert loaded.mrfr_head.weight is loaded.uniter.image_embeddings.img_linear.weight
    assert loaded.mlm_head.decoder.weight is loaded.uniter.text_embeddings.word_embeddings.weight
    # Downstream: a VQA model starts from the pretrained encoder (a directory or a model).
    vqa = UniterForVQA.from_encoder(tmp_path / "pre", num_answers=ANSWERS).eval()
    assert (
        vqa.config.num_answers == ANSWERS and vqa.config.replace(num_answers=None) == model.config
    )
    torch.testing.assert_close(vqa.uniter(b).sequence, model.uniter(b).sequence, atol=0, rtol=0)
    assert vqa(b).shape == (5, ANSWERS)
    vqa.save_pretrained(tmp_path / "vqa")
    torch.testing.assert_close(load_pretrained(tmp_path / "vqa")(b), vqa(b), atol=0, rtol=0)
    encoder_only = UniterForVQA.from_encoder(model.uniter, num_answers=ANSWERS).eval()
    torch.testing.assert_close(
        encoder_only.uniter(b).pooled, model.uniter(b).pooled, atol=0, rtol=0
    )
    assert build_model("uniter", tiny_config()).num_parameters() == model.uniter.num_parameters()
    assert UniterConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config


def test_retrieval_scores_are_the_itm_match_logit():
    model = build()
    b = random_batch(B=4, text_lengths=(9, 6, 4, 3), region_counts=(6, 4, 2, 1))
    images = {k: b[k] for k in ("region_feats", "region_loc7", "region_mask")}
    captions = {k: b[k] for k in ("input_ids", "attention_mask")}
    sim = pair_scores(model, images, captions, batch_size=3)
    assert sim.shape == (4, 4)
    torch.testing.assert_close(
        sim.diagonal(), model.itm_logits(b)[:, 1].detach(), atol=1e-5, rtol=1e-5
    )
    swapped = {**captions, **{k: v[[1, 0, 3, 2]] for k, v in images.items()}}
    torch.testing.assert_close(
        sim[[1, 0, 3, 2], torch.arange(4)],
        model.itm_logits(swapped)[:, 1].detach(),
        atol=1e-5,
        rtol=1e-5,
    )


class _ConstantWord(nn.Module):
    """An MLM head that always predicts `word`."""

    def __init__(self, word):
        super().__init__()
        self.word = word

    def forward(self, hidden):
        return F.one_hot(torch.full(hidden.shape[:2], self.word), VOCAB).float()


def test_masked_word_accuracy_masks_every_probe_word_and_scores_only_them():
    model = build()
    b = random_batch()
    words, counts = b["input_ids"][b["attention_mask"] & (b["input_ids"] > 4)].unique(
        return_counts=True
    )
    probe = tuple(
        words[counts.argsort(descending=True)[:3]].tolist()
    )  # the batch's three commonest words
    where = torch.isin(b["input_ids"], torch.tensor(probe)) & b["attention_mask"]
    assert (
        where.sum() > 3
        and (b["input_ids"][where] == probe[0]).any()
        and (b["input_ids"][where] != probe[0]).any()
    )
    seen = {}
    model.uniter.register_forward_hook(
        lambda m, args, out: seen.update(ids=args[0]["input_ids"].clone())
    )
    model.mlm_head = _ConstantWord(probe[0])
    model.train()
    accuracy = masked_word_accuracy(model, b, list(probe))
    # Every probe word (and nothing else) went in as [MASK]; the score is the share of them that are probe[0].
    torch.testing.assert_close(seen["ids"], b["input_ids"].masked_fill(where, 4))
    assert accuracy == pytest.approx(float((b["input_ids"][where] == probe[0]).float().mean()))
    assert 0 < accuracy < 1
    assert model.training, "the model's mode is restored"
    model.mlm_head = _ConstantWord(
        next(w for w in range(5, VOCAB) if w not in probe)
    )  # nothing right
    assert masked_word_accuracy(model, b, torch.tensor(probe)) == 0.0


def test_masked_word_accuracy_refuses_bad_probes():
    model, b = build(), random_batch()
    absent = sorted(set(range(5, VOCAB)) - set(b["input_ids"][b["attention_mask"]].tolist()))[0]
    with pytest.raises(ValueError, match="no word of word_ids"):
        masked_word_accuracy(model, b, [absent])
    with pytest.raises(ValueError, match="special tokens"):
        masked_word_accuracy(model, b, [CLS, 7])
    with pytest.raises(ValueError, match="vocab_size=40"):
        masked_word_accuracy(model, b, [VOCAB])
    with pytest.raises(ValueError, match="non-empty"):
        masked_word_accuracy(model, b, [])
    with pytest.raises(TypeError, match="UniterForPretraining"):
        masked_word_accuracy(build(UniterForVQA, num_answers=ANSWERS), b, [7])


def test_paper_base_parameter_count():
    """UNITER-base: 12 x 768-wide BERT layers + pooler = 85.6M, the paper's "86M". The embeddings come on top:
    bert-base-cased's 28,996 words (22.3M) and the region embedding (1.6M)."""
    config = UniterConfig.paper_base()
    with torch.device("meta"):  # count without allocating 440 MB
        model = UniterModel(config)
    H, L, F_, V, P, Dimg = 768, 12, 3072, 28996, 512, 2048
    per_layer = (3 * H * H + 3 * H) + (H * H + H) + 2 * H + (H * F_ + F_) + (F_ * H + H) + 2 * H
    layers = sum(p.numel() for p in model.layers.parameters())
    pooler = sum(p.numel() for p in model.pooler.parameters())
    assert layers == L * per_layer == 85_054_464
    assert round((layers + pooler) / 1e6) == 86
    text = V * H + P * H + 2 * H + 2 * H
    image = (Dimg * H + H) + (7 * H + H) + 3 * 2 * H + Dimg
    assert model.num_parameters() == layers + (H * H + H) + text + image == 109_896_704
    small = UniterConfig.small(vocab_size=512, num_region_classes=13)
    assert (small.hidden_size, small.num_layers, small.num_heads, small.ffn_size) == (
        128,
        4,
        4,
        512,
    )


# ---------------------------------------------------------------------------
# It learns
# ---------------------------------------------------------------------------


def test_tiny_pretraining_run_overfits_every_task_through_train():
    # initializer_range=None (PyTorch's default init): with BERT's N(0, 0.02) a 32-wide model trained from
    # scratch sits on an ITM plateau (loss 0.693) for ~800 steps (measured), too long for a unit test.
    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=VOCAB,
        num_region_classes=CLASSES,
        region_dim=D,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        ffn_size=64,
        max_text_len=12,
        dropout=0.0,
        initializer_range=None,
        itm_negatives="random",
    )  # random ids: nothing to judge
    model = UniterForPretraining(config)
    mix = {**UNITER_TASK_MIX, "mrc": 1}
    loaders = pretraining_loaders(Pairs(n=8, images=4), batch_size=8, tasks=mix)
    history = train(
        model,
        loaders,
        TrainConfig(steps=400, lr=2e-3, warmup_steps=20, weight_decay=0.0, seed=0),
        pretraining_step,
        task_mix=mix,
        device="cpu",
        progress=False,
    )
    curves = history.task_losses()
    assert set(curves) == set(mix)
    for task in MASKING_TASKS:
        values = curves[task][1]
        first, last = sum(values[:4]) / 4, sum(values[-6:]) / 6
        assert last < 0.5 * first, (task, first, last)
    itm = [i for i, t in enumerate(history.train["task"]) if t == "itm"][-6:]
    itm_loss = sum(history.train["itm_loss"][i] for i in itm) / len(itm)
    itm_accuracy = sum(history.train["itm_accuracy"][i] for i in itm) / len(itm)
    assert itm_loss < 0.6 and itm_accuracy > 0.7, (itm_loss, itm_accuracy)  # chance: 0.693 and 0.5
    # Fine-tune VQA from the pretrained encoder: answer = the image's id, a function of the regions.
    vqa = UniterForVQA.from_encoder(model, num_answers=8)

    class Questions(Pairs):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["answer"] = item["image_index"].clone()
            return item

    from fusionlib.data.datasets import make_loader

    h = train(
        vqa,
        make_loader(Questions(), 8),
        TrainConfig(steps=60, lr=3e-3, weight_decay=0.0),
        vqa_step,
        device="cpu",
        progress=False,
    )
    assert h.train["accuracy"][-1] == 1.0 and h.train["loss"][-1] < 0.2 * h.train["loss"][0]


def test_vqa_mean_pooling_reads_the_mean_of_the_real_words():
    """vqa_pooling="mean": the head reads the masked mean of the words' outputs, blind to padding."""
    b = random_batch()
    vqa = build(UniterForVQA, num_answers=ANSWERS, vqa_pooling="mean").eval()
    with torch.no_grad():
        logits, out = vqa(b, need_weights=True)
        words = b["attention_mask"]
        by_hand = torch.stack(
            [
                out.text[i][words[i]].mean(0)
                if words[i].any()
                else out.text.new_zeros(out.text.shape[-1])
                for i in range(len(words))
            ]
        )
        torch.testing.assert_close(logits, vqa.vqa_head(by_hand))
        torch.testing.assert_close(vqa(perturb_padding(b)), logits)
        cls_head = UniterForVQA(vqa.config.replace(vqa_pooling="cls")).eval()
        cls_head.load_state_dict(vqa.state_dict())
        assert not torch.allclose(
            cls_head(b), logits
        )  # the same weights, another input to the head
    from_encoder = UniterForVQA.from_encoder(
        build(), num_answers=ANSWERS, vqa_pooling="mean"
    ).eval()
    assert from_encoder.config.vqa_pooling == "mean" and torch.isfinite(from_encoder(b)).all()
    with pytest.raises(ValueError, match="vqa_pooling"):
        tiny_config(vqa_pooling="max")


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
