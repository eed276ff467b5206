"""Tests for fusionlib.losses, each loss against an independent reference.

References and tolerances (also in the chapter 4 closing note):

=================  ===========================================================  ==================
loss               reference                                                   tolerance
=================  ===========================================================  ==================
mlm_loss           plain-Python loop over masked positions (math.log/exp)      1e-10 (float64)
mrfr_loss          plain-Python loop                                           1e-10 (float64)
mrc_loss           plain-Python loop on the argmax class                       1e-10 (float64)
mrc_kl_loss        torch.distributions.kl_divergence(Categorical, Categorical) 1e-10 (float64)
itm_loss           plain-Python loop                                           1e-10 (float64)
contrastive_loss   plain-Python loop InfoNCE (both directions, duplicates)     1e-10 (float64)
ipot / ot cost     POT's exact OT ``ot.emd2``, uniform marginals               relative 3% (max seen 0.9%)
wra_loss           UNITER's formula (pos.sum() - neg.sum()) / (n_pos + n_neg)  1e-12
every loss         torch.autograd.gradcheck in float64                          gradcheck defaults
=================  ===========================================================  ==================
"""

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.distributions import Categorical, kl_divergence

from fusionlib import losses as L

F64 = torch.float64
IGNORE = L.IGNORE_INDEX


def rng(seed):
    return torch.Generator().manual_seed(seed)


def log_softmax_py(row):
    row = [float(v) for v in row.detach()]
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_z for v in row]


def assert_zero_with_grad(loss, *inputs):
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad, "an empty batch must still give a loss connected to the graph"
    loss.backward()
    for x in inputs:
        assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all()


# ------------------------------------------------------------------------ MLM


def test_mlm_matches_loop_reference():
    g = rng(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=F64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[torch.rand(3, 5, generator=g) < 0.6] = IGNORE
    labels[0, 0] = 2
    terms = [
        -log_softmax_py(logits[b, t])[labels[b, t]]
        for b in range(3)
        for t in range(5)
        if labels[b, t] != IGNORE
    ]
    assert L.mlm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), abs=1e-10)


def test_mlm_no_targets_gives_zero_with_gradient():
    logits = torch.randn(2, 4, 6, dtype=F64, requires_grad=True)
    assert_zero_with_grad(L.mlm_loss(logits, torch.full((2, 4), IGNORE)), logits)


def test_mlm_gradcheck_and_errors():
    g = rng(1)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([[1, IGNORE, 4], [IGNORE, 0, IGNORE]])
    assert gradcheck(lambda z: L.mlm_loss(z, labels), (logits,))
    with pytest.raises(ValueError, match="labels"):
        L.mlm_loss(logits, torch.tensor([[1, 5, 0], [0, 0, 0]]))  # 5 is not a class
    with pytest.raises(ValueError, match="labels"):
        L.mlm_loss(logits, labels[:, :2])
    with pytest.raises(TypeError, match="labels"):
        L.mlm_loss(logits, labels.float())


# ------------------------------------------------------------------------ MRM


def region_batch(seed, classes=6, dim=4):
    g = rng(seed)
    logits = torch.randn(3, 5, classes, generator=g, dtype=F64)
    soft = torch.softmax(2 * torch.randn(3, 5, classes, generator=g, dtype=F64), dim=-1)
    masked = torch.rand(3, 5, generator=g) < 0.4
    masked[0, 1] = True
    pred = torch.randn(3, 5, dim, generator=g, dtype=F64)
    target = torch.randn(3, 5, dim, generator=g, dtype=F64)
    return logits, soft, masked, pred, target


def test_mrfr_matches_loop_reference():
    _, _, masked, pred, target = region_batch(2)
    terms = [
        sum((float(pred[b, r, d]) - float(target[b, r, d])) ** 2 for d in range(4)) / 4
        for b in range(3)
        for r in range(5)
        if masked[b, r]
    ]
    assert L.mrfr_loss(pred, target, masked).item() == pytest.approx(
        sum(terms) / len(terms), abs=1e-10
    )


@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra"])
def test_nan_at_unscored_positions_leaks_into_neither_loss_nor_gradient(name):
    """Padded regions / ignored tokens may hold garbage (here NaN); it must not reach the result."""
    logits, soft, masked, pred, target = region_batch(20)
    nan = float("nan")
    if name == "mlm":
        labels = torch.where(masked, torch.randint(0, 6, masked.shape, generator=rng(0)), IGNORE)
        clean = logits.clone().requires_grad_()
        dirty = logits.masked_fill(~masked[..., None], nan).requires_grad_()
        fn = lambda x: L.mlm_loss(x, labels)
    elif name == "mrfr":
        clean = pred.clone().requires_grad_()
        dirty = pred.masked_fill(~masked[..., None], nan).requires_grad_()
        bad_target = target.masked_fill(~masked[..., None], nan)
        fn = lambda x: L.mrfr_loss(x, bad_target, masked)
    elif name in ("mrc", "mrc_kl"):
        bad_soft = soft.masked_fill(~masked[..., None], nan)
        clean = logits.clone().requires_grad_()
        dirty = logits.masked_fill(~masked[..., None], nan).requires_grad_()
        loss_fn = L.mrc_loss if name == "mrc" else L.mrc_kl_loss
        fn = lambda x: loss_fn(x, bad_soft, masked)
    else:
        labels = torch.tensor([1, 0, IGNORE, 1])
        base = torch.randn(4, 2, generator=rng(1), dtype=F64)
        ignored = (labels == IGNORE)[:, None]
        if name == "itm":
            clean = base.clone().requires_grad_()
            dirty = base.masked_fill(ignored, nan).requires_grad_()
            fn = lambda x: L.itm_loss(x, labels)
        else:
            clean = base[:, 0].clone().requires_grad_()
            dirty = base[:, 0].masked_fill(ignored[:, 0], nan).requires_grad_()
            fn = lambda x: L.wra_loss(x, labels)
    want, got = fn(clean), fn(dirty)
    want.backward()
    got.backward()
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(dirty.grad, clean.grad)


def test_mrc_matches_loop_reference_and_background_rule():
    logits, soft, masked, _, _ = region_batch(3)

    def reference(exclude):
        terms = []
        for b in range(3):
            for r in range(5):
                if masked[b, r]:
                    row = soft[b, r].tolist()
                    cands = [c for c in range(len(row)) if c != exclude]
                    target = max(cands, key=lambda c: row[c])
                    terms.append(-log_softmax_py(logits[b, r])[target])
        return sum(terms) / len(terms)

    assert L.mrc_loss(logits, soft, masked).item() == pytest.approx(reference(None), abs=1e-10)
    # make class 0 the detector's favourite somewhere: with background_class=0 it is never the target
    soft2 = soft.clone()
    soft2[0, 1] = torch.tensor([0.9, 0.02, 0.02, 0.02, 0.02, 0.02], dtype=F64)
    soft = soft2
    assert L.mrc_loss(logits, soft, masked, background_class=0).item() == pytest.approx(
        reference(0), abs=1e-10
    )
    assert L.mrc_loss(logits, soft, masked).item() == pytest.approx(reference(None), abs=1e-10)
    assert reference(0) != pytest.approx(reference(None))
    with pytest.raises(ValueError, match="background_class"):
        L.mrc_loss(logits, soft, masked, background_class=6)


def test_mrc_kl_matches_torch_distributions():
    logits, soft, masked, _, _ = region_batch(4)
    soft = soft.clone()
    soft[0, 1] = torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=F64)  # zeros: 0·log 0 = 0
    want = kl_divergence(Categorical(probs=soft[masked]), Categorical(logits=logits[masked])).mean()
    assert L.mrc_kl_loss(logits, soft, masked).item() == pytest.approx(want.item(), abs=1e-10)
    # the KL is zero when the prediction is the detector's distribution
    assert L.mrc_kl_loss(torch.log(soft.clamp_min(1e-300)), soft, masked).item() == pytest.approx(
        0.0, abs=1e-10
    )
    bad = soft.clone()
    bad[0, 1] *= 2
    with pytest.raises(ValueError, match="soft_labels"):
        L.mrc_kl_loss(logits, bad, masked)


@pytest.mark.parametrize("name", ["mrfr", "mrc", "mrc_kl"])
def test_region_losses_empty_mask_gives_zero_with_gradient(name):
    logits, soft, masked, pred, target = region_batch(5)
    none = torch.zeros_like(masked)
    if name == "mrfr":
        pred = pred.requires_grad_()
        assert_zero_with_grad(L.mrfr_loss(pred, target, none), pred)
    else:
        logits = logits.requires_grad_()
        fn = L.mrc_loss if name == "mrc" else L.mrc_kl_loss
        assert_zero_with_grad(fn(logits, soft, none), logits)


def test_region_losses_gradcheck():
    logits, soft, masked, pred, target = region_batch(6)
    logits.requires_grad_()
    pred.requires_grad_()
    target.requires_grad_()
    assert gradcheck(lambda p, t: L.mrfr_loss(p, t, masked), (pred, target))
    assert gradcheck(lambda z: L.mrc_loss(z, soft, masked), (logits,))
    # the KL is differentiable in both arguments where the soft labels are positive
    soft_var = soft.clone().requires_grad_()
    assert gradcheck(lambda z, p: L.mrc_kl_loss(z, p, masked), (logits, soft_var))


def test_region_losses_reject_bad_shapes():
    logits, soft, masked, pred, target = region_batch(7)
    with pytest.raises(ValueError, match="masked"):
        L.mrfr_loss(pred, target, masked[:, :3])
    with pytest.raises(ValueError, match="target"):
        L.mrfr_loss(pred, target[:, :, :2], masked)
    with pytest.raises(TypeError, match="masked"):
        L.mrc_kl_loss(logits, soft, masked.long())


# ------------------------------------------------------------------------ ITM


def test_itm_matches_loop_reference_all_ignored_and_gradcheck():
    g = rng(8)
    logits = torch.randn(6, 2, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([1, 0, IGNORE, 1, 1, 0])
    terms = [-log_softmax_py(logits[i])[labels[i]] for i in range(6) if labels[i] != IGNORE]
    assert L.itm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), abs=1e-10)
    assert gradcheck(lambda z: L.itm_loss(z, labels), (logits,))
    assert_zero_with_grad(L.itm_loss(logits, torch.full((6,), IGNORE)), logits)
    with pytest.raises(ValueError, match="logits"):
        L.itm_loss(torch.randn(6, 3), labels)
    with pytest.raises(ValueError, match="labels"):
        L.itm_loss(logits, torch.tensor([1, 0, 2, 1, 1, 0]))


def test_accuracy_counts_scored_positions_only():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0]]])  # argmax 0, 1, 0
    assert L.accuracy(logits, torch.tensor([[0, 2, IGNORE]])).item() == 0.5  # one hit of two scored
    assert (
        L.accuracy(logits, torch.full((1, 3), IGNORE)).item() == 0.0
    )  # nothing scored: 0, not NaN
    assert L.accuracy(logits[0, :2, :2], torch.tensor([0, 1])).item() == 1.0  # ITM shape (batch, 2)
    assert not L.accuracy(logits.requires_grad_(), torch.tensor([[0, 1, 0]])).requires_grad
    with pytest.raises(ValueError, match="labels"):
        L.accuracy(logits, torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="labels"):
        L.accuracy(logits, torch.tensor([[0.0, 1.0, 0.0]]))


def test_random_negatives_never_self_or_duplicate_and_rate():
    batch, draws = 8, 2000
    group = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])  # duplicates of images 0 and 3
    g = rng(9)
    negatives = 0
    for _ in range(draws):
        partner, labels = L.random_negatives(batch, g, p=0.5, group_ids=group)
        is_self = partner == torch.arange(batch)
        assert torch.equal(labels, is_self.long())
        assert not (group[partner] == group)[~is_self].any(), "a duplicate was used as a negative"
        negatives += (~is_self).sum().item()
    n = batch * draws
    assert abs(negatives - 0.5 * n) <= 5 * math.sqrt(n * 0.25)


def test_random_negatives_without_any_valid_partner_stay_positive():
    partner, labels = L.random_negatives(1, rng(0), p=1.0)
    assert partner.tolist() == [0] and labels.tolist() == [1]
    partner, labels = L.random_negatives(3, rng(0), p=1.0, group_ids=torch.tensor([5, 5, 5]))
    assert partner.tolist() == [0, 1, 2] and labels.tolist() == [1, 1, 1]
    partner, labels = L.random_negatives(2, rng(0), p=1.0)
    assert partner.tolist() == [1, 0] and labels.tolist() == [0, 0]
    with pytest.raises(ValueError, match="group_ids"):
        L.random_negatives(3, rng(0), group_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch_size"):
        L.random_negatives(0, rng(0))


def test_hard_negatives_follow_softmax_of_allowed_and_never_pick_self_or_duplicates():
    sim = torch.tensor(
        [
            [5.0, 1.0, 0.0, 2.0, 9.0],
            [0.0, 3.0, 1.0, -1.0, 0.5],
            [2.0, 2.0, 4.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 1.0, 0.0],
            [9.0, 0.0, 3.0, 0.0, 5.0],
        ]
    )
    group = torch.tensor(
        [0, 1, 2, 3, 0]
    )  # 0 and 4 are the same image: the 9.0s are false negatives
    allowed = ~torch.eye(5, dtype=torch.bool) & (group[:, None] != group[None, :])
    expected = torch.softmax(sim.masked_fill(~allowed, -math.inf), dim=1)
    draws = 2000
    counts = torch.zeros(5, 5)
    g = rng(10)
    for _ in range(draws):
        index, valid = L.hard_negatives(sim, g, group_ids=group)
        assert valid.all()
        counts[torch.arange(5), index] += 1
    assert (counts[~allowed] == 0).all(), "picked itself or a duplicate"
    sigma = (draws * expected * (1 - expected)).sqrt()
    assert ((counts - draws * expected).abs() <= 5 * sigma + 1e-6).all()


def test_hard_negatives_batch_of_one_duplicates_and_extreme_values():
    index, valid = L.hard_negatives(torch.tensor([[3.0]]), rng(0))
    assert index.tolist() == [-1] and valid.tolist() == [False]
    sim = torch.randn(3, 3)
    index, valid = L.hard_negatives(sim, rng(0), group_ids=torch.tensor([7, 7, 1]))
    # rows 0 and 1 may only pick 2; row 2 may pick 0 or 1
    assert index[0] == 2 and index[1] == 2 and index[2] in (0, 1) and valid.all()
    index, valid = L.hard_negatives(torch.randn(3, 3), rng(0), group_ids=torch.tensor([4, 4, 4]))
    assert index.tolist() == [-1, -1, -1] and not valid.any()
    big = torch.tensor(
        [[1e4, -1e4], [-1e4, 1e4]]
    )  # softmax would underflow to 0 for every allowed column
    index, valid = L.hard_negatives(big, rng(0))
    assert index.tolist() == [1, 0] and valid.all()
    with pytest.raises(ValueError, match="sim"):
        L.hard_negatives(torch.randn(2, 3), rng(0))
    with pytest.raises(ValueError, match="sim"):
        L.hard_negatives(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), rng(0))


# ---------------------------------------------------------------- contrastive


def infonce_loop(image, text, logit_scale, group=None):
    """Plain-Python symmetric InfoNCE: normalise, scale, two softmax cross-entropies."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    u = [unit(r.tolist()) for r in image]
    v = [unit(r.tolist()) for r in text]
    s = math.exp(min(max(logit_scale, 0.0), math.log(100)))
    b = len(u)
    logit = [[s * sum(x * y for x, y in zip(u[i], v[j])) for j in range(b)] for i in range(b)]

    def keep(i, j):
        return i == j or group is None or group[i] != group[j]

    total = 0.0
    for i in range(b):
        total += -logit[i][i] + math.log(sum(math.exp(logit[i][j]) for j in range(b) if keep(i, j)))
        total += -logit[i][i] + math.log(sum(math.exp(logit[j][i]) for j in range(b) if keep(i, j)))
    return total / (2 * b)


def test_contrastive_matches_loop_reference_with_and_without_duplicates():
    g = rng(11)
    image = torch.randn(6, 8, generator=g, dtype=F64)
    text = torch.randn(6, 8, generator=g, dtype=F64)
    scale = math.log(1 / 0.07)
    got = L.contrastive_loss(image, text, torch.tensor(scale, dtype=F64))
    assert got.item() == pytest.approx(infonce_loop(image, text, scale), abs=1e-10)
    group = torch.tensor([0, 1, 0, 2, 3, 2])
    got = L.contrastive_loss(image, text, scale, group_ids=group)
    assert got.item() == pytest.approx(infonce_loop(image, text, scale, group.tolist()), abs=1e-10)
    # embeddings are normalised inside: scaling them changes nothing
    assert L.contrastive_loss(3 * image, 0.1 * text, scale).item() == pytest.approx(
        infonce_loop(image, text, scale), abs=1e-10
    )


def test_contrastive_temperature_init_clamp_and_gradcheck():
    module = L.ContrastiveLoss()
    assert module.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert module.temperature == pytest.approx(0.07)
    g = rng(12)
    image = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    text = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    scale = torch.tensor(math.log(1 / 0.07), dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b, s: L.contrastive_loss(a, b, s), (image, text, scale))
    # above the clamp the scale is 100 and has no gradient
    with torch.no_grad():
        module.logit_scale.fill_(10.0)
    assert module.temperature == pytest.approx(0.01)
    loss = module(image.detach().float(), text.detach().float())
    assert loss.item() == pytest.approx(
        infonce_loop(image.detach(), text.detach(), math.log(100)), rel=1e-5
    )
    loss.backward()
    assert module.logit_scale.grad.item() == 0.0
    # batch of one: the only candidate is the positive
    assert L.contrastive_loss(image[:1], text[:1], scale).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="text_emb"):
        L.contrastive_loss(image, text[:3], scale)


# ------------------------------------------------------------------ IPOT / WRA


def uniform_problem(g, n, m, kind):
    if kind == "uniform":
        return torch.rand(1, n, m, generator=g, dtype=F64) * 2
    x = torch.randn(1, n, 16, generator=g, dtype=F64)
    y = torch.randn(1, m, 16, generator=g, dtype=F64)
    return L.cosine_cost(x, y)


IPOT_REL_TOL = (
    0.03  # measured: max 0.37% (mean 0.07%) on these 160 problems, max 0.9% over 400 others
)


@pytest.mark.parametrize("kind", ["uniform", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ipot_transport_cost_matches_exact_ot_from_pot(kind, dtype):
    ot = pytest.importorskip("ot")  # POT, in the `test` extra
    g = rng(13)
    gaps = []
    for _ in range(40):
        n, m = (int(v) for v in torch.randint(2, 13, (2,), generator=g))
        cost = uniform_problem(g, n, m, kind)
        plan = L.ipot(
            cost.to(dtype), torch.ones(1, n, dtype=torch.bool), torch.ones(1, m, dtype=torch.bool)
        )
        approx = (cost * plan.to(F64)).sum().item()
        exact = ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), cost[0].numpy())
        gaps.append(abs(approx - exact) / exact)
        # marginals: columns exact (last Sinkhorn update), rows close
        assert torch.allclose(plan.sum(1), torch.full((1, m), 1 / m, dtype=dtype), rtol=1e-4)
        assert torch.allclose(plan.sum(2), torch.full((1, n), 1 / n, dtype=dtype), rtol=0.05)
    assert max(gaps) <= IPOT_REL_TOL, f"IPOT vs exact OT: max relative gap {max(gaps):.4f}"


def test_ipot_is_unchanged_by_a_large_cost_offset_in_float32():
    """Adding 60 to every cost shifts the OT value by 60 and leaves the plan alone; without the
    per-row shift inside ipot, exp(-60 / 0.5) underflows to 0 in float32 and all mass is lost."""
    g = rng(16)
    cost = torch.rand(2, 5, 7, generator=g)
    ones_x, ones_y = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    plan = L.ipot(cost, ones_x, ones_y)
    shifted = L.ipot(cost + 60, ones_x, ones_y)
    assert torch.allclose(shifted.sum((1, 2)), torch.ones(2), atol=1e-5)
    assert torch.allclose(shifted, plan, atol=1e-5)


def test_ipot_respects_padding_on_both_sides():
    g = rng(14)
    cost = torch.rand(3, 6, 5, generator=g, dtype=F64) * 2
    x_mask = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    y_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cost_with_junk = cost.clone()
    cost_with_junk[0, 4:, :] = float("inf")  # garbage at padding must not matter
    plan = L.ipot(cost_with_junk, x_mask, y_mask)
    assert torch.isfinite(plan).all()
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    assert (plan[~joint] == 0).all()
    assert (plan[2] == 0).all(), "a sample with no real word gets an empty plan"
    for b, (n, m) in enumerate([(4, 3), (6, 2)]):
        alone = L.ipot(
            cost[b : b + 1, :n, :m],
            torch.ones(1, n, dtype=torch.bool),
            torch.ones(1, m, dtype=torch.bool),
        )
        assert torch.allclose(plan[b, :n, :m], alone[0], atol=1e-12)
    with pytest.raises(ValueError, match="y_mask"):
        L.ipot(cost, x_mask, y_mask[:, :4])
    with pytest.raises(ValueError, match="beta"):
        L.ipot(cost, x_mask, y_mask, beta=0)


def test_ot_distance_is_trace_of_cost_times_plan_and_gradient_is_the_plan():
    g = rng(15)
    text_h = torch.randn(2, 5, 8, generator=g, dtype=F64, requires_grad=True)
    region_h = torch.randn(2, 4, 8, generator=g, dtype=F64, requires_grad=True)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    region_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    distance = L.ot_distance(text_h, region_h, text_mask, region_mask)
    cost = L.cosine_cost(text_h, region_h).detach()
    cost[~(text_mask[:, :, None] & region_mask[:, None, :])] = 0
    plan = L.ipot(cost, text_mask, region_mask)
    trace = torch.stack([torch.trace(cost[b] @ plan[b].T) for b in range(2)])
    assert torch.allclose(distance.detach(), trace, atol=1e-12)
    assert not plan.requires_grad
    # with the plan held fixed (as UNITER does), the gradient is exact
    assert gradcheck(
        lambda t, r: L.ot_distance(t, r, text_mask, region_mask, plan=plan), (text_h, region_h)
    )
    # padded states receive no gradient
    distance.sum().backward()
    assert (text_h.grad[1, 3:] == 0).all() and (region_h.grad[1, 2:] == 0).all()


def test_ipot_and_ot_distance_run_in_float32_under_bf16_autocast():
    """TrainConfig.amp trains under bf16 autocast on CUDA, which runs every matrix product in bf16:
    IPOT's plan moved by most of its own size there. CPU autocast casts the same products."""
    g = rng(17)
    text_h, region_h = torch.randn(6, 9, 32, generator=g), torch.randn(6, 7, 32, generator=g)
    text_mask = torch.arange(9)[None] < torch.tensor([9, 7, 5, 9, 3, 8])[:, None]
    region_mask = torch.arange(7)[None] < torch.tensor([7, 6, 2, 5, 7, 1])[:, None]
    cost = L.cosine_cost(text_h, region_h)
    plan, distance = (
        L.ipot(cost, text_mask, region_mask),
        L.ot_distance(text_h, region_h, text_mask, region_mask),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan_amp = L.ipot(cost, text_mask, region_mask)
        distance_amp = L.ot_distance(text_h, region_h, text_mask, region_mask)
    assert plan_amp.dtype == distance_amp.dtype == torch.float32
    torch.testing.assert_close(plan_amp, plan, rtol=0, atol=1e-7)
    torch.testing.assert_close(distance_amp, distance, rtol=0, atol=1e-6)
    # without_autocast is a plain context where there is no autocast to switch off
    with L.without_autocast("meta"):
        pass


def test_wra_loss_matches_uniter_formula_and_edge_cases():
    distance = torch.tensor([0.3, 0.9, 0.2, 0.7, 0.5], dtype=F64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 0, IGNORE])
    pos, neg = distance[:4][labels[:4] == 1], distance[:4][labels[:4] == 0]
    want = (pos.sum() - neg.sum()) / (pos.numel() + neg.numel())
    assert L.wra_loss(distance, labels).item() == pytest.approx(want.item(), abs=1e-12)
    assert gradcheck(lambda d: L.wra_loss(d, labels), (distance,))
    assert_zero_with_grad(L.wra_loss(distance, torch.full((5,), IGNORE)), distance)
    with pytest.raises(ValueError, match="itm_labels"):
        L.wra_loss(distance, torch.tensor([1, 0, 2, 0, 1]))
