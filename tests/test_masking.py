"""Tests for fusionlib.masking: rates within binomial tolerances, and the rules that must never break.

Statistical checks use 5 binomial standard errors (a false alarm about once in
1.7 million runs), with fixed seeds so a run is reproducible.
"""

import math
from collections import Counter

import pytest
import torch

from fusionlib.masking import (
    IGNORE_INDEX,
    apply_region_mask,
    conditional_masking,
    joint_masking,
    mask_regions,
    mask_tokens,
    maskable_tokens,
)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 1000
SIGMAS = 5.0


def make_batch(batch, max_len, min_len, seed):
    """[CLS] w1 .. wk [SEP] [PAD]...: random word ids in [5, VOCAB), random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    ids = torch.randint(len(SPECIAL), VOCAB, (batch, max_len), generator=g)
    positions = torch.arange(max_len)[None, :]
    attention = positions < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[~attention] = PAD
    return ids, attention


def within(observed, expected, sigma, name):
    assert abs(observed - expected) <= SIGMAS * sigma, (
        f"{name}: observed {observed:.1f}, expected {expected:.1f} ± {SIGMAS}·{sigma:.2f}"
    )


def forced_count_moments(n, p):
    """Mean and variance of X + 1[X = 0], X ~ Binomial(n, p): chosen tokens with 'at least one'."""
    probs = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    values = [max(k, 1) for k in range(n + 1)]
    mean = sum(pk * v for pk, v in zip(probs, values))
    var = sum(pk * (v - mean) ** 2 for pk, v in zip(probs, values))
    return mean, var


def batch_moments(counts, p):
    """Mean and variance of the total chosen over rows with ``counts`` candidates each."""
    mean = var = 0.0
    for n, rows in Counter(counts.tolist()).items():
        if n > 0:
            m, v = forced_count_moments(n, p)
            mean, var = mean + rows * m, var + rows * v
    return mean, var


# --------------------------------------------------------------------- tokens


def test_maskable_excludes_special_and_padding_and_accepts_int_masks():
    ids = torch.tensor([[CLS, 10, UNK, 11, SEP, PAD], [CLS, 12, SEP, PAD, PAD, PAD]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    got = maskable_tokens(ids, attention, SPECIAL)
    want = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, want)
    assert torch.equal(maskable_tokens(ids, attention.bool(), SPECIAL), want)
    # a real word id at a padded position is still not maskable
    ids2 = ids.clone()
    ids2[0, 5] = 20
    assert not maskable_tokens(ids2, attention, SPECIAL)[0, 5]
    with pytest.raises(ValueError, match="attention_mask"):
        maskable_tokens(ids, attention * 2, SPECIAL)
    with pytest.raises(ValueError, match="attention_mask"):
        maskable_tokens(ids, attention[:, :3], SPECIAL)


def test_mask_tokens_rates_over_500k_tokens():
    # 500k positions (~390k maskable): at 5 sigma this resolves the 15% rate to about +-0.3
    # percentage points and the 10% shares to about +-0.6 points.
    ids, attention = make_batch(batch=5000, max_len=100, min_len=60, seed=0)
    assert ids.numel() == 500_000
    maskable = maskable_tokens(ids, attention, SPECIAL)
    g = torch.Generator().manual_seed(1)
    inputs, labels = mask_tokens(
        ids, maskable, mask_token_id=MASK, vocab_size=VOCAB, generator=g, special_ids=SPECIAL
    )
    chosen = labels != IGNORE_INDEX
    p = 0.15

    # 15% of maskable tokens, plus the (tiny) expected contribution of the "at least one" rule.
    expected, variance = batch_moments(maskable.sum(1), p)
    within(chosen.sum().item(), expected, math.sqrt(variance), "chosen tokens")

    # Of the chosen: 80% [MASK], 10% random, 10% unchanged. A random draw equals the original
    # with probability 1/len(candidates); account for it rather than widen the tolerance.
    k = chosen.sum().item()
    n_candidates = VOCAB - len(SPECIAL)
    coincide = 1 / n_candidates
    fractions = {
        "mask": ((inputs == MASK) & chosen, 0.8),
        "random": ((inputs != MASK) & (inputs != ids) & chosen, 0.1 * (1 - coincide)),
        "unchanged": ((inputs == ids) & chosen, 0.1 + 0.1 * coincide),
    }
    for name, (where, q) in fractions.items():
        within(where.sum().item(), k * q, math.sqrt(k * q * (1 - q)), name)

    # Never a special or padded token; nothing changes where there is no target.
    assert not chosen[~maskable].any()
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    assert (labels[~chosen] == IGNORE_INDEX).all()
    random_ids = inputs[fractions["random"][0]]
    assert not torch.isin(random_ids, torch.tensor(SPECIAL)).any()
    assert ((random_ids >= 0) & (random_ids < VOCAB)).all()


def test_at_least_one_token_per_sequence_and_exact_short_sequence_rate():
    # 20,000 sequences with 3 maskable words: P(none chosen) = 0.85^3 = 0.61, so the rule matters.
    batch = 20_000
    ids = torch.tensor([CLS, 10, 11, 12, SEP, PAD]).repeat(batch, 1)
    attention = ids != PAD
    maskable = maskable_tokens(ids, attention, SPECIAL)
    g = torch.Generator().manual_seed(2)
    _, labels = mask_tokens(
        ids, maskable, mask_token_id=MASK, vocab_size=VOCAB, generator=g, special_ids=SPECIAL
    )
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) >= 1).all()
    mean, var = forced_count_moments(3, 0.15)
    within(
        chosen.sum().item(), batch * mean, math.sqrt(batch * var), "chosen with at-least-one rule"
    )
    # the forced token is uniform over the maskable positions: each of the 3 words equally often
    per_position = chosen[:, 1:4].sum(0).float()
    q = mean / 3
    for count in per_position:
        within(count.item(), batch * q, math.sqrt(batch * q * (1 - q)), "per-position rate")


def test_row_without_maskable_tokens_is_left_alone():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 10, 11, SEP]])
    maskable = maskable_tokens(ids, ids != PAD, SPECIAL)
    inputs, labels = mask_tokens(
        ids,
        maskable,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        generator=torch.Generator().manual_seed(0),
        special_ids=SPECIAL,
    )
    assert torch.equal(inputs[0], ids[0])
    assert (labels[0] == IGNORE_INDEX).all()
    assert (labels[1] != IGNORE_INDEX).sum() >= 1


def test_mask_tokens_is_reproducible_and_seed_dependent():
    ids, attention = make_batch(batch=8, max_len=20, min_len=10, seed=3)
    maskable = maskable_tokens(ids, attention, SPECIAL)

    def run(seed):
        return mask_tokens(
            ids,
            maskable,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            generator=torch.Generator().manual_seed(seed),
            special_ids=SPECIAL,
        )

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_mask_tokens_rejects_bad_arguments():
    ids, attention = make_batch(batch=2, max_len=8, min_len=4, seed=0)
    maskable = maskable_tokens(ids, attention, SPECIAL)
    g = torch.Generator().manual_seed(0)
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, generator=g, special_ids=SPECIAL)
    with pytest.raises(ValueError, match="maskable"):
        mask_tokens(ids, maskable[:, :4], **kw)
    with pytest.raises(TypeError, match="maskable"):
        mask_tokens(ids, maskable.long(), **kw)
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens(ids.float(), maskable, **kw)
    with pytest.raises(ValueError, match="input_ids"):
        mask_tokens(ids, maskable, **{**kw, "vocab_size": 50})
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, maskable, **{**kw, "mask_token_id": VOCAB})
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, maskable, **kw, probability=0.0)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, maskable, **kw, probability="0.15")
    with pytest.raises(TypeError, match="generator"):
        mask_tokens(ids, maskable, **{**kw, "generator": 0})


def test_grounded_words_are_chosen_at_their_own_rate():
    # Ids 5..104 (a tenth of the words) are "grounded": chosen at 0.5, the rest at 0.15.
    ids, attention = make_batch(batch=4000, max_len=100, min_len=60, seed=2)
    maskable = maskable_tokens(ids, attention, SPECIAL)
    grounded_ids = tuple(range(5, 105))
    kw = dict(mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL)
    _, labels = mask_tokens(
        ids,
        maskable,
        generator=torch.Generator().manual_seed(3),
        grounded_ids=grounded_ids,
        grounded_probability=0.5,
        **kw,
    )
    chosen = labels != IGNORE_INDEX
    grounded = torch.isin(ids, torch.tensor(grounded_ids)) & maskable
    for where, p, name in ((grounded, 0.5, "grounded"), (maskable & ~grounded, 0.15, "other")):
        n = where.sum().item()
        # Rows of 60+ words: the "at least one" rule almost never fires (P < 0.85^60 = 6e-5).
        within(chosen[where].sum().item(), n * p, math.sqrt(n * p * (1 - p)), name)
    # Naming the words at the ordinary chance changes nothing: the same draws, the same masks.
    plain = mask_tokens(ids, maskable, generator=torch.Generator().manual_seed(3), **kw)
    same = mask_tokens(
        ids,
        maskable,
        generator=torch.Generator().manual_seed(3),
        grounded_ids=grounded_ids,
        grounded_probability=0.15,
        **kw,
    )
    assert torch.equal(plain.inputs, same.inputs) and torch.equal(plain.labels, same.labels)


def test_grounded_words_reach_conditional_and_joint_masking():
    ids, attention = make_batch(batch=2000, max_len=20, min_len=10, seed=4)
    maskable = maskable_tokens(ids, attention, SPECIAL)
    regions = torch.ones(2000, 6, dtype=torch.bool)
    grounded_ids = tuple(range(5, 105))
    grounded = torch.isin(ids, torch.tensor(grounded_ids)) & maskable
    for fn in (conditional_masking, joint_masking):
        m = fn(
            ids,
            maskable,
            regions,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            generator=torch.Generator().manual_seed(5),
            special_ids=SPECIAL,
            grounded_ids=grounded_ids,
            grounded_probability=1.0,
        )
        # Every grounded word of a sample whose text was masked is chosen.
        assert (m.labels != IGNORE_INDEX)[grounded & m.text_masked[:, None]].all(), fn.__name__


def test_grounded_words_reject_bad_arguments():
    ids, attention = make_batch(batch=2, max_len=8, min_len=4, seed=0)
    maskable = maskable_tokens(ids, attention, SPECIAL)
    kw = dict(
        mask_token_id=MASK, vocab_size=VOCAB, generator=torch.Generator(), special_ids=SPECIAL
    )
    with pytest.raises(ValueError, match="grounded_probability"):
        mask_tokens(ids, maskable, grounded_ids=(7,), **kw)
    with pytest.raises(ValueError, match="grounded_ids"):
        mask_tokens(ids, maskable, grounded_probability=0.5, **kw)
    with pytest.raises(ValueError, match="grounded_ids"):
        mask_tokens(ids, maskable, grounded_ids=("red",), grounded_probability=0.5, **kw)
    with pytest.raises(ValueError, match="grounded_probability"):
        mask_tokens(ids, maskable, grounded_ids=(7,), grounded_probability=1.5, **kw)


# -------------------------------------------------------------------- regions


def test_mask_regions_rates_and_padding():
    batch, regions = 10_000, 50  # 500k slots, ~250k real regions
    g = torch.Generator().manual_seed(4)
    num_real = torch.randint(0, regions + 1, (batch,), generator=g)
    num_real[:5] = 0  # some samples without any region
    region_mask = torch.arange(regions)[None, :] < num_real[:, None]
    out = mask_regions(region_mask, torch.Generator().manual_seed(5))

    assert not out.masked[~region_mask].any(), "a padded region was chosen"
    assert not (out.zeroed & ~out.masked).any()
    has = region_mask.any(1)
    assert (out.masked.sum(1)[has] >= 1).all()
    assert (out.masked.sum(1)[~has] == 0).all()

    mean, var = batch_moments(num_real, 0.15)
    within(out.masked.sum().item(), mean, math.sqrt(var), "masked regions")
    k = out.masked.sum().item()
    within(out.zeroed.sum().item(), 0.9 * k, math.sqrt(k * 0.9 * 0.1), "zeroed of masked")
    assert torch.equal(out.kept, out.masked & ~out.zeroed)


def test_apply_region_mask_zeroes_only_the_zeroed_regions_and_copies():
    feats = torch.randn(3, 4, 5) + 10
    zeroed = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    before = feats.clone()
    out = apply_region_mask(feats, zeroed)
    assert torch.equal(feats, before), "the input (the MRFR target) must not change"
    assert (out[zeroed] == 0).all()
    assert torch.equal(out[~zeroed], feats[~zeroed])
    with pytest.raises(ValueError, match="zeroed"):
        apply_region_mask(feats, zeroed[:, :3])


def test_mask_regions_zero_fraction_one_is_uniters_rule():
    region_mask = torch.ones(200, 36, dtype=torch.bool)
    out = mask_regions(region_mask, torch.Generator().manual_seed(0), zero_fraction=1.0)
    assert torch.equal(out.masked, out.zeroed)
    with pytest.raises(ValueError, match="zero_fraction"):
        mask_regions(region_mask, torch.Generator(), zero_fraction=1.5)
    with pytest.raises(TypeError, match="region_mask"):
        mask_regions(region_mask.long(), torch.Generator())


# ---------------------------------------------------------------- conditional


def _multimodal_batch(batch, seed):
    ids, attention = make_batch(batch=batch, max_len=16, min_len=5, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    num_regions = torch.randint(1, 11, (batch,), generator=g)
    region_mask = torch.arange(10)[None, :] < num_regions[:, None]
    return ids, maskable_tokens(ids, attention, SPECIAL), region_mask


def test_conditional_masking_masks_exactly_one_modality_per_sample():
    batch = 4000
    ids, maskable, region_mask = _multimodal_batch(batch, seed=7)
    # sample 0 has no maskable word, sample 1 no region: each must mask the other modality
    maskable[0] = False
    region_mask[1] = False
    out = conditional_masking(
        ids,
        maskable,
        region_mask,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        generator=torch.Generator().manual_seed(8),
        special_ids=SPECIAL,
    )
    text_has = (out.labels != IGNORE_INDEX).any(1)
    image_has = out.region_masked.any(1)
    assert torch.equal(text_has, out.text_masked)
    assert torch.equal(image_has, out.image_masked)
    assert (text_has ^ image_has).all(), "every sample masks exactly one modality"
    assert out.image_masked[0] and out.text_masked[1]
    # the other modality is intact
    assert torch.equal(out.input_ids[~out.text_masked], ids[~out.text_masked])
    assert not out.region_zeroed[~out.image_masked].any()
    assert not out.region_masked[~region_mask].any()
    assert not (out.labels != IGNORE_INDEX)[~maskable].any()
    # the modality is a fair coin (samples 0 and 1 were forced)
    within(
        out.text_masked[2:].sum().item(),
        (batch - 2) * 0.5,
        math.sqrt((batch - 2) * 0.25),
        "text share",
    )
    # UNITER zeroes every masked region by default
    assert torch.equal(out.region_masked, out.region_zeroed)


def test_joint_masking_masks_both_modalities():
    ids, maskable, region_mask = _multimodal_batch(500, seed=9)
    out = joint_masking(
        ids,
        maskable,
        region_mask,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        generator=torch.Generator().manual_seed(10),
        special_ids=SPECIAL,
        zero_fraction=0.9,
    )
    assert out.text_masked.all() and out.image_masked.all()
    assert ((out.labels != IGNORE_INDEX).sum(1) >= 1).all()
    assert (out.region_masked.sum(1) >= 1).all()
    with pytest.raises(ValueError, match="region_mask"):
        joint_masking(
            ids,
            maskable,
            region_mask[:3],
            mask_token_id=MASK,
            vocab_size=VOCAB,
            generator=torch.Generator(),
        )
