"""fusionlib.metrics against hand-computed cases (chapters 3-6)."""

import itertools
import math
import time
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fusionlib import metrics
from fusionlib.metrics import (
    evaluate_vqa,
    expected_recall_at_k,
    image_text_recall,
    itm_accuracy,
    recall_at_k,
    retrieval_bounds,
    retrieval_chance,
    retrieval_scores,
    vqa_accuracy,
)

FAMILIES = ("shape", "left", "top", "closest", "furthest", "count")

# Six questions: right answers, predictions, families, relational flags.
ANSWERS = torch.tensor([0, 1, 2, 0, 1, 2])
PREDS = torch.tensor([0, 1, 0, 0, 2, 2])  # right, right, wrong, right, wrong, right
FAMS = torch.tensor([0, 0, 3, 4, 5, 5])  # shape, shape, closest, furthest, count, count
REL = torch.tensor([False, False, True, True, True, True])


def test_vqa_accuracy_hand_computed():
    out = vqa_accuracy(PREDS, ANSWERS, FAMS, REL, family_names=FAMILIES)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["n"] == 6
    assert out["non_relational_accuracy"] == 1.0 and out["non_relational_n"] == 2
    assert out["relational_accuracy"] == 0.5 and out["relational_n"] == 4
    assert out["shape_accuracy"] == 1.0 and out["shape_n"] == 2
    assert out["closest_accuracy"] == 0.0 and out["closest_n"] == 1
    assert out["furthest_accuracy"] == 1.0 and out["count_accuracy"] == 0.5 and out["count_n"] == 2
    assert (
        math.isnan(out["left_accuracy"]) and out["left_n"] == 0
    )  # no such questions: undefined, not 0


def test_vqa_accuracy_from_logits_and_default_family_names():
    logits = F.one_hot(PREDS, 3).float() + 0.1 * torch.arange(3)  # argmax is PREDS
    out = vqa_accuracy(logits, ANSWERS, FAMS, REL)  # names from fusionlib.data.shapes
    assert out == vqa_accuracy(PREDS, ANSWERS, FAMS, REL, family_names=FAMILIES)
    assert set(vqa_accuracy(PREDS, ANSWERS)) == {"accuracy", "n"}


def test_vqa_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy(PREDS, ANSWERS[:5])
    with pytest.raises(ValueError, match="relational"):
        vqa_accuracy(PREDS, ANSWERS, relational=REL.long())
    with pytest.raises(ValueError, match="families"):
        vqa_accuracy(PREDS, ANSWERS, FAMS + 1, family_names=FAMILIES)
    with pytest.raises(ValueError, match="logits"):
        vqa_accuracy(torch.zeros(6, 3, 2), ANSWERS)


class Oracle(nn.Module):
    """Answers whatever the batch's ``fake_pred`` says, with logit 5 on it and 0 elsewhere."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def forward(self, batch):
        assert not self.training
        return 5.0 * F.one_hot(batch["fake_pred"], 3).float()


def test_evaluate_vqa_over_a_loader():
    items = [
        {"fake_pred": p, "answer": a, "family": f, "relational": r}
        for p, a, f, r in zip(PREDS, ANSWERS, FAMS, REL)
    ]
    loader = DataLoader(items, batch_size=4)  # batches of 4 and 2
    model = Oracle().train()
    out = evaluate_vqa(model, loader, prefix="val_", family_names=FAMILIES)
    assert model.training  # mode restored
    assert out["val_accuracy"] == pytest.approx(4 / 6) and out["val_relational_accuracy"] == 0.5
    assert out["val_closest_accuracy"] == 0.0
    right = -math.log(math.exp(5) / (math.exp(5) + 2))
    wrong = -math.log(1 / (math.exp(5) + 2))
    assert out["val_loss"] == pytest.approx((4 * right + 2 * wrong) / 6)


def test_recall_at_k_hand_computed():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # positive 0 ranks first
            [0.2, 0.4, 0.8, 0.6],  # positive 1 has two wrong candidates above it
            [0.7, 0.7, 0.1, 0.0],
        ]
    )  # positive 1 ties a wrong one: the tie counts against
    out = recall_at_k(sim, torch.tensor([0, 1, 1]), ks=(1, 2, 3))
    assert out == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    several = torch.tensor(
        [
            [True, False, False, False],
            [False, True, False, True],  # a second positive at 0.6: one wrong above it
            [False, True, False, False],
        ]
    )
    assert recall_at_k(sim, several, ks=(1, 2)) == pytest.approx({"R@1": 1 / 3, "R@2": 1.0})
    # Constant scores: every wrong candidate ties, so only K = all candidates finds the right one.
    assert recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 2]), ks=(1, 3, 4)) == {
        "R@1": 0.0,
        "R@3": 0.0,
        "R@4": 1.0,
    }
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(sim, torch.zeros(3, 4, dtype=torch.bool))


def test_image_text_recall_both_directions():
    sim = torch.tensor(
        [
            [0.9, 0.2, 0.8, 0.1],  # image 0: captions 0, 1
            [0.3, 0.95, 0.4, 0.5],
        ]
    )  # image 1: captions 2, 3
    out = image_text_recall(sim, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert out == pytest.approx({"i2t_R@1": 0.5, "i2t_R@2": 1.0, "t2i_R@1": 0.5, "t2i_R@2": 1.0})
    with pytest.raises(ValueError, match="caption_image"):
        image_text_recall(sim, torch.tensor([0, 1, 2, 0]))


def test_itm_accuracy_hand_computed():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert itm_accuracy(logits, torch.tensor([0, 1, 1, -100])) == pytest.approx(2 / 3)
    assert itm_accuracy(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1, 1, 0])) == pytest.approx(
        1 / 3
    )
    assert math.isnan(itm_accuracy(torch.tensor([0.5]), torch.tensor([-100])))
    with pytest.raises(ValueError, match="labels"):
        itm_accuracy(torch.tensor([0.5]), torch.tensor([2]))


def test_retrieval_chance_is_the_mean_recall_of_every_ranking():
    # 3 images with 2 captions each: average the recall of image_text_recall over every ordering of
    # the scores, which is what a random ranking draws from.
    num_images, per_image, ks = 3, 2, (1, 2, 5)
    caption_image = torch.arange(num_images).repeat_interleave(per_image)  # (6,)
    totals: dict[str, float] = {}
    orders = list(itertools.permutations(range(num_images * per_image)))
    for n, order in enumerate(orders):
        captions_first = torch.tensor(order, dtype=torch.float32)  # one ranking of the captions
        images_first = torch.tensor(orders[(7 * n) % len(orders)][:num_images], dtype=torch.float32)
        sim = (
            captions_first[None, :] + 100 * images_first[:, None]
        )  # i2t by captions, t2i by images
        for key, value in image_text_recall(sim, caption_image, ks).items():
            totals[key] = totals.get(key, 0.0) + value
    chance = retrieval_chance(num_images, per_image, ks)
    assert chance == pytest.approx(
        {k: v / len(orders) for k, v in totals.items()}, abs=1e-6
    )  # recall is a float32 mean
    assert chance["t2i_R@5"] == 1.0 and chance["i2t_R@1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 5), "num_images"),
        ((40, 0), "captions_per_image"),
        ((40, 5, (0,)), "ks"),
        ((2.5, 5), "num_images"),
        ((True, 5), "num_images"),
    ],
)
def test_retrieval_chance_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        retrieval_chance(*args)


def test_retrieval_chance_when_k_exceeds_the_captions():
    # 2 images x 2 captions: from K = 3 on every top K holds one of an image's captions.
    sim = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.1, 0.2, 0.9, 0.8]])
    recall = image_text_recall(sim, torch.tensor([0, 0, 1, 1]), ks=(3, 4, 9))
    chance = retrieval_chance(2, 2, ks=(3, 4, 9))
    assert {k: v for k, v in chance.items() if k.startswith("i2t")} == {
        "i2t_R@3": 1.0,
        "i2t_R@4": 1.0,
        "i2t_R@9": 1.0,
    }
    assert all(recall[k] == 1.0 for k in chance if k.startswith("i2t"))
    assert retrieval_chance(1, 5, ks=(1, 10)) == {
        "i2t_R@1": 1.0,
        "i2t_R@10": 1.0,
        "t2i_R@1": 1.0,
        "t2i_R@10": 1.0,
    }


# ---- Expected recall with random tie-breaking, truth-aware retrieval (chapter 2) ----------------------------------


def brute_hit(scores, right, k):
    """Exact P(a right candidate in the top k) when ties are broken uniformly at random.

    Every ordering of the candidates is equally likely; candidates are ranked by score, descending,
    then by their place in the ordering, which breaks each tie group uniformly at random.
    """
    n = len(scores)
    hits, orders = 0, 0
    for order in itertools.permutations(range(n)):
        place = {c: i for i, c in enumerate(order)}
        ranked = sorted(range(n), key=lambda c: (-scores[c], place[c]))
        hits += any(c in right for c in ranked[:k])
        orders += 1
    return Fraction(hits, orders)


def brute_recall(sim, right_sets, ks):
    """Mean of brute_hit over queries: sim is a list of score lists, right_sets a list of sets."""
    return {
        f"R@{k}": float(
            sum(brute_hit(row, right, k) for row, right in zip(sim, right_sets)) / len(sim)
        )
        for k in ks
    }


# Six candidates, scores in {0, 1, 2}: many ties, right ones inside, above and below the tie groups.
TIE_SIM = torch.tensor(
    [
        [1.0, 1.0, 1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [2.0, 1.0, 1.0, 1.0, 2.0, 0.0],
        [1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
        [0.0, 1.0, 0.0, 2.0, 0.0, 0.0],
    ]
)
TIE_POS = torch.tensor(
    [
        [False, True, False, False, True, False],  # two right ones in a tie group of 4
        [False, False, False, True, False, False],  # constant scores: chance
        [False, True, False, True, False, False],  # two wrong above, 2 of 3 right in the tie
        [True, False, False, False, False, True],  # right ones split across groups
        [False, False, False, True, False, False],
    ]
)  # right one alone on top
TIE_KS = (1, 2, 3, 4, 5, 6, 9)


def test_expected_recall_at_k_equals_brute_force_with_bool_positives():
    rights = [set(row.nonzero().flatten().tolist()) for row in TIE_POS]
    out = expected_recall_at_k(TIE_SIM, TIE_POS, TIE_KS)
    assert list(out) == [f"R@{k}" for k in TIE_KS]
    assert out == pytest.approx(brute_recall(TIE_SIM.tolist(), rights, TIE_KS), abs=1e-12)


def test_expected_recall_at_k_equals_brute_force_with_index_positives():
    index = torch.tensor([2, 0, 5, 3, 1])
    out = expected_recall_at_k(TIE_SIM.double(), index, TIE_KS)
    assert out == pytest.approx(
        brute_recall(TIE_SIM.tolist(), [{int(i)} for i in index], TIE_KS), abs=1e-12
    )
    # Each query on its own, so no query's error can hide behind another's in the mean.
    for q in range(len(index)):
        one = expected_recall_at_k(TIE_SIM[q : q + 1], index[q : q + 1], TIE_KS)
        assert one == pytest.approx(
            brute_recall([TIE_SIM[q].tolist()], [{int(index[q])}], TIE_KS), abs=1e-12
        )


def test_expected_recall_at_k_on_random_ties_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        sim = torch.randint(0, 2, (3, 5), generator=gen).float()
        pos = torch.rand(3, 5, generator=gen) < 0.35
        pos[torch.arange(3), torch.randint(0, 5, (3,), generator=gen)] = True
        rights = [set(row.nonzero().flatten().tolist()) for row in pos]
        assert expected_recall_at_k(sim, pos, (1, 2, 3, 5)) == pytest.approx(
            brute_recall(sim.tolist(), rights, (1, 2, 3, 5)), abs=1e-12
        )


def test_expected_recall_at_k_without_ties_is_recall_at_k():
    sim = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    pos = torch.randint(0, 30, (20,), generator=torch.Generator().manual_seed(2))
    assert expected_recall_at_k(sim, pos, (1, 5, 10)) == pytest.approx(
        recall_at_k(sim, pos, (1, 5, 10)), abs=1e-6
    )


def test_expected_recall_at_k_ties_are_exact_equality_in_the_given_dtype():
    # 1 and 1 + 1e-12 are distinct in float64 (no tie: the right one wins) but equal in float32 (a tie: half).
    close = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    assert expected_recall_at_k(close, torch.tensor([1]), ks=(1,)) == {"R@1": 1.0}
    assert expected_recall_at_k(close.float(), torch.tensor([1]), ks=(1,)) == {"R@1": 0.5}
    # Half precision is widened exactly, so its ties stay ties.
    assert expected_recall_at_k(close.half(), torch.tensor([1]), ks=(1,)) == {"R@1": 0.5}


def test_expected_recall_at_k_constant_scores_give_chance_not_zero():
    out = expected_recall_at_k(torch.zeros(4, 10), torch.tensor([0, 3, 5, 9]), ks=(1, 5, 10, 20))
    assert out == pytest.approx({"R@1": 0.1, "R@5": 0.5, "R@10": 1.0, "R@20": 1.0}, abs=1e-15)
    assert (
        recall_at_k(torch.zeros(4, 10), torch.tensor([0, 3, 5, 9]), ks=(1, 5))["R@5"] == 0.0
    )  # pessimistic


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize(
    "right, k", [(1, 1), (3, 10), (30, 30), (200, 200), (1, 9999), (17, 10000)]
)
def test_expected_recall_at_k_is_exact_for_large_tie_groups(right, k, chunk, monkeypatch):
    # One query, 10,000 candidates all tied, `right` of them right: 1 - C(t - p, K) / C(t, K) in exact arithmetic.
    # chunk=7 splits the product over many chunks, as a long product of factors would be.
    if chunk is not None:
        monkeypatch.setattr(metrics, "_PRODUCT_CHUNK", chunk)
    t = 10_000
    pos = torch.zeros(1, t, dtype=torch.bool)
    pos[0, torch.randperm(t, generator=torch.Generator().manual_seed(3))[:right]] = True
    exact = 1 - Fraction(math.comb(t - right, k), math.comb(t, k))
    assert expected_recall_at_k(torch.zeros(1, t), pos, (k,))[f"R@{k}"] == pytest.approx(
        float(exact), abs=1e-12
    )


# Three images, five texts. Text 0 ("a red shape") is true of every image, text 2 of images 1 and 2,
# text 4 of images 0 and 1; texts 1 and 3 are descriptions true of their own image only.
TRUTH = torch.tensor(
    [
        [True, True, True],
        [True, False, False],
        [False, True, True],
        [False, False, True],
        [True, True, False],
    ]
)
TEXT_IMAGE = torch.tensor([0, 0, 1, 2, 1])
BOUND_KS = (1, 2, 3, 4, 6)


def brute_retrieval(sim, truth, text_image, ks):
    """Every key of retrieval_scores by brute force; sim is (N_images, N_texts) as a list of lists."""
    n_texts, n_images = len(truth), len(truth[0])
    by_image = [[row[t] for row in sim] for t in range(n_texts)]  # (N_texts, N_images)
    queried = [i for i in range(n_images) if i in text_image]  # images without a text: distractors
    sets = {
        "i2t": (
            [sim[i] for i in queried],
            [{t for t in range(n_texts) if text_image[t] == i} for i in queried],
        ),
        "t2i": (by_image, [{text_image[t]} for t in range(n_texts)]),
        "truth_t2i": (
            by_image,
            [{i for i in range(n_images) if truth[t][i]} for t in range(n_texts)],
        ),
        "truth_i2t": (
            [sim[i] for i in queried],
            [{t for t in range(n_texts) if truth[t][i]} for i in queried],
        ),
    }
    return {
        f"{name}_{key}": value
        for name, (scores, rights) in sets.items()
        for key, value in brute_recall(scores, rights, ks).items()
    }


def test_retrieval_bounds_equal_brute_force():
    bounds = retrieval_bounds(TRUTH, TEXT_IMAGE, BOUND_KS)
    truth, owner = TRUTH.tolist(), TEXT_IMAGE.tolist()
    chance = brute_retrieval([[0.0] * 5 for _ in range(3)], truth, owner, BOUND_KS)
    ceiling = brute_retrieval(
        [[float(truth[t][i]) for t in range(5)] for i in range(3)], truth, owner, BOUND_KS
    )
    assert set(bounds) == {"chance", "ceiling"}
    assert list(bounds["chance"]) == list(chance) and list(bounds["ceiling"]) == list(ceiling)
    assert bounds["chance"] == pytest.approx(chance, abs=1e-12)
    assert bounds["ceiling"] == pytest.approx(ceiling, abs=1e-12)
    # By hand: at K = 1, text 0 finds its image 1 time in 3, texts 2 and 4 half the time, texts 1 and 3 always.
    assert bounds["ceiling"]["t2i_R@1"] == pytest.approx((1 / 3 + 1 + 1 / 2 + 1 + 1 / 2) / 5)


def test_retrieval_scores_equal_brute_force_on_tied_scores():
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        sim = torch.randint(0, 3, (3, 5), generator=gen).float()
        out = retrieval_scores(sim, TEXT_IMAGE, TRUTH, BOUND_KS)
        assert out == pytest.approx(
            brute_retrieval(sim.tolist(), TRUTH.tolist(), TEXT_IMAGE.tolist(), BOUND_KS), abs=1e-12
        )


def test_images_without_a_text_are_distractors():
    # Image 3 has no text: a candidate for every text (it ties the right image for texts 0 and 2), not a query.
    truth = torch.cat(
        [TRUTH, torch.tensor([[True], [False], [True], [False], [False]])], dim=1
    )  # (5, 4)
    gen = torch.Generator().manual_seed(8)
    for sim in (
        torch.zeros(4, 5),
        truth.T.float(),
        torch.randint(0, 3, (4, 5), generator=gen).float(),
    ):
        out = retrieval_scores(sim, TEXT_IMAGE, truth, BOUND_KS)
        assert out == pytest.approx(
            brute_retrieval(sim.tolist(), truth.tolist(), TEXT_IMAGE.tolist(), BOUND_KS), abs=1e-12
        )
    # Its row of scores cannot change the i2t keys, only the t2i ones.
    sim = torch.randint(0, 3, (4, 5), generator=gen).float()
    other = sim.clone()
    other[3] = 5.0
    a, b = retrieval_scores(sim, TEXT_IMAGE, truth), retrieval_scores(other, TEXT_IMAGE, truth)
    assert all(a[k] == b[k] for k in a if "i2t" in k) and b["t2i_R@1"] == 0.0


def test_retrieval_scores_without_ties_match_image_text_recall():
    sim = torch.randn(6, 12, generator=torch.Generator().manual_seed(5))
    caption_image = torch.arange(6).repeat(2)
    out = retrieval_scores(sim, caption_image, ks=(1, 3))
    assert out == pytest.approx(
        image_text_recall(sim, caption_image, ks=(1, 3)), abs=1e-6
    )  # a float32 mean
    assert set(out) == {"i2t_R@1", "i2t_R@3", "t2i_R@1", "t2i_R@3"}  # no truth, no truth keys


def test_constant_scores_give_exactly_retrieval_chance():
    # 8 images with 3 texts each: the exact-match keys are retrieval_chance's, both ways.
    num_images, per_image, ks = 8, 3, (1, 2, 5, 10, 30)
    text_image = torch.arange(num_images).repeat_interleave(per_image)
    out = retrieval_scores(torch.full((num_images, num_images * per_image), 0.5), text_image, ks=ks)
    assert out == pytest.approx(retrieval_chance(num_images, per_image, ks), abs=1e-12)
    # One description per image: identification chance is K / N both ways.
    ident = retrieval_bounds(torch.eye(10, dtype=torch.bool), torch.arange(10), ks=(1, 5, 10))
    assert ident["chance"] == pytest.approx(
        {
            f"{d}_R@{k}": k / 10
            for d in ("i2t", "t2i", "truth_t2i", "truth_i2t")
            for k in (1, 5, 10)
        },
        abs=1e-12,
    )
    # The truth-aware chance of a text true of m of N images is 1 - C(N - m, K) / C(N, K).
    truth = torch.tril(
        torch.ones(5, 5, dtype=torch.bool)
    )  # text t is true of images 0..t: m = t + 1
    chance = retrieval_bounds(truth, torch.arange(5), ks=(2,))["chance"]
    expected = sum(1 - math.comb(5 - m, 2) / math.comb(5, 2) for m in range(1, 6)) / 5
    assert chance["truth_t2i_R@2"] == pytest.approx(expected, abs=1e-12)
    assert chance["t2i_R@2"] == pytest.approx(2 / 5, abs=1e-12)


def test_ceiling_is_one_when_truth_aware_and_below_one_for_exact_match_under_ties():
    bounds = retrieval_bounds(TRUTH, TEXT_IMAGE, ks=(1, 5))
    assert all(
        bounds["ceiling"][f"{d}_R@{k}"] == 1.0 for d in ("truth_t2i", "truth_i2t") for k in (1, 5)
    )
    assert bounds["ceiling"]["t2i_R@1"] < 1.0 and bounds["ceiling"]["i2t_R@1"] < 1.0
    assert all(bounds["chance"][k] <= bounds["ceiling"][k] for k in bounds["chance"])
    # Descriptions true of their own image only: the identification ceiling is 1 everywhere.
    ident = retrieval_bounds(torch.eye(7, dtype=torch.bool), torch.arange(7), ks=(1, 5))
    assert set(ident["ceiling"].values()) == {1.0}
    # The ceiling is the perfect truth judge's score, ties at random: retrieval_scores of truth.T.
    assert bounds["ceiling"] == retrieval_scores(TRUTH.T.float(), TEXT_IMAGE, TRUTH, ks=(1, 5))


@pytest.fixture
def one_thread():
    """Time on one torch thread: on a small shared machine, two threads fighting another process for the
    cores can run ten times slower than one; the bound is on the algorithm, not on the scheduler."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def best_time(fn, repeats=3):
    """(the fastest of ``repeats`` timed calls after a warm-up, fn's result): robust to a busy machine."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def test_large_case_is_fast_finite_and_in_range(one_thread):
    # 1,000 captions of 2,000 images, each true of its own image and of about 15% of the others; scores with
    # heavy ties (rounded to one decimal) so the tie product runs for many queries.
    gen = torch.Generator().manual_seed(6)
    n_texts, n_images = 1000, 2000
    text_image = torch.randperm(n_images, generator=gen)[
        :n_texts
    ]  # the other 1,000 images are distractors
    truth = torch.rand(n_texts, n_images, generator=gen) < 0.15
    truth[torch.arange(n_texts), text_image] = True
    sim = (torch.rand(n_images, n_texts, generator=gen) + 0.3 * truth.T).mul(10).round()
    elapsed, (scores, bounds) = best_time(
        lambda: (
            retrieval_scores(sim, text_image, truth, ks=(1, 5, 10, 100)),
            retrieval_bounds(truth, text_image, ks=(1, 5, 10, 100)),
        )
    )
    assert elapsed < 1.0, f"retrieval_scores + retrieval_bounds took {elapsed:.2f} s"  # about 0.1 s
    for values in (scores, bounds["chance"], bounds["ceiling"]):
        assert len(values) == 16 and all(
            isinstance(v, float) and 0.0 <= v <= 1.0 for v in values.values()
        )
    assert all(
        bounds["chance"][k] <= scores[k] <= bounds["ceiling"][k] + 1e-12
        for k in scores
        if "truth" in k
    )


def test_expected_recall_at_k_on_1000_by_10000_is_fast(one_thread):
    gen = torch.Generator().manual_seed(7)
    sim = torch.randint(0, 20, (1000, 10_000), generator=gen).float()  # ties everywhere
    pos = torch.rand(1000, 10_000, generator=gen) < 0.01
    pos[:, 0] = True
    elapsed, out = best_time(lambda: expected_recall_at_k(sim, pos, ks=(1, 5, 10, 1000)))
    assert elapsed < 1.0, f"expected_recall_at_k took {elapsed:.2f} s"  # about 0.2 s
    assert all(0.0 <= v <= 1.0 for v in out.values())


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: expected_recall_at_k(torch.zeros(3), torch.tensor([0, 1, 2])),
            r"similarity must be a float \(Nq, Nc\)",
        ),
        (
            lambda: expected_recall_at_k(
                torch.zeros(3, 4, dtype=torch.long), torch.tensor([0, 1, 2])
            ),
            "similarity",
        ),
        (lambda: expected_recall_at_k(torch.full((2, 2), math.nan), torch.tensor([0, 1])), "NaN"),
        (
            lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1])),
            r"index positives must have shape \(3,\)",
        ),
        (
            lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 4])),
            r"\[0, 4\).*\[2\]",
        ),
        (
            lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0])),
            "integer dtype",
        ),
        (
            lambda: expected_recall_at_k(torch.zeros(3, 4), torch.ones(4, 3, dtype=torch.bool)),
            r"\(3, 4\)",
        ),
        (
            lambda: expected_recall_at_k(
                torch.zeros(3, 4), torch.eye(3, 4, dtype=torch.bool).flip(0) & False
            ),
            "at least one positive",
        ),
        (lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 2]), ks=(0,)), "ks"),
        (lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 2]), ks=()), "ks"),
        (
            lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 2]), ks=(True,)),
            "ks",
        ),
        (lambda: expected_recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 2]), ks=(1.5,)), "ks"),
        (lambda: retrieval_scores(torch.zeros(3, 5), TEXT_IMAGE, TRUTH, ks=(-1,)), "ks"),
        (
            lambda: retrieval_scores(torch.zeros(5, 3), TEXT_IMAGE, TRUTH),
            r"text_image must be an integer \(3,\)",
        ),
        (
            lambda: retrieval_scores(torch.zeros(3, 5), TEXT_IMAGE.float(), TRUTH),
            "text_image must be an integer",
        ),
        (
            lambda: retrieval_scores(torch.zeros(3, 5), torch.tensor([0, 0, 1, 3, 1]), TRUTH),
            r"text_image must hold image indices in \[0, 3\).*\[3\]",
        ),
        (
            lambda: retrieval_scores(torch.zeros(3, 5), torch.tensor([0, 0, 1, -1, 1]), TRUTH),
            "text_image",
        ),
        (
            lambda: retrieval_scores(torch.zeros(3, 5), TEXT_IMAGE, TRUTH.long()),
            "truth must be a bool",
        ),
        (
            lambda: retrieval_scores(torch.zeros(3, 5), TEXT_IMAGE, TRUTH.T),
            r"truth must be a bool.*not transposed",
        ),
        (lambda: retrieval_scores(torch.zeros(3, 5), TEXT_IMAGE, TRUTH[:4]), r"\(5, 3\)"),
        (
            lambda: retrieval_scores(
                torch.zeros(3, 5),
                TEXT_IMAGE,
                TRUTH.index_put((torch.tensor([3, 4]), torch.tensor([2, 1])), torch.tensor(False)),
            ),
            r"texts \[3, 4\] \(2 in all\) are not",
        ),
        (lambda: retrieval_bounds(TRUTH.float(), TEXT_IMAGE), "truth must be a bool"),
        (lambda: retrieval_bounds(TRUTH, TEXT_IMAGE[:4]), r"text_image must be an integer \(5,\)"),
        (
            lambda: retrieval_bounds(
                TRUTH.index_put((torch.tensor([1]), torch.tensor([0])), torch.tensor(False)),
                TEXT_IMAGE,
            ),
            r"texts \[1\]",
        ),
        (lambda: retrieval_bounds(TRUTH, TEXT_IMAGE, ks=[2, 0]), "ks"),
    ],
)
def test_retrieval_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mean_range_prints_the_spread_only_when_seeds_differ():
    from fusionlib.metrics import mean_range

    assert mean_range([0.814, 0.821, 0.929]) == "0.855 (0.814–0.929)"
    assert mean_range([1.0, 1.0, 1.0]) == "1.000"
    assert mean_range([0.5, 0.5004], digits=2) == "0.50"
    assert mean_range([0.25, 0.75], digits=1) == "0.5 (0.2–0.8)"
    for bad, match in (([], "at least one"), ([0.1, float("nan")], "NaN")):
        with pytest.raises(ValueError, match=match):
            mean_range(bad)
    with pytest.raises(ValueError, match="digits"):
        mean_range([0.1], digits=-1)
