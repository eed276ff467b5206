"""fusionlib.metrics against hand-computed cases (chapters 3-6)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fusionlib.metrics import (evaluate_vqa, image_text_recall, itm_accuracy, recall_at_k, retrieval_chance,
                               vqa_accuracy)

FAMILIES = ("shape", "left", "top", "closest", "furthest", "count")

# Six questions: right answers, predictions, families, relational flags.
ANSWERS = torch.tensor([0, 1, 2, 0, 1, 2])
PREDS = torch.tensor([0, 1, 0, 0, 2, 2])          # right, right, wrong, right, wrong, right
FAMS = torch.tensor([0, 0, 3, 4, 5, 5])           # shape, shape, closest, furthest, count, count
REL = torch.tensor([False, False, True, True, True, True])


def test_vqa_accuracy_hand_computed():
    out = vqa_accuracy(PREDS, ANSWERS, FAMS, REL, family_names=FAMILIES)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["n"] == 6
    assert out["non_relational_accuracy"] == 1.0 and out["non_relational_n"] == 2
    assert out["relational_accuracy"] == 0.5 and out["relational_n"] == 4
    assert out["shape_accuracy"] == 1.0 and out["shape_n"] == 2
    assert out["closest_accuracy"] == 0.0 and out["closest_n"] == 1
    assert out["furthest_accuracy"] == 1.0 and out["count_accuracy"] == 0.5 and out["count_n"] == 2
    assert math.isnan(out["left_accuracy"]) and out["left_n"] == 0      # no such questions: undefined, not 0


def test_vqa_accuracy_from_logits_and_default_family_names():
    logits = F.one_hot(PREDS, 3).float() + 0.1 * torch.arange(3)      # argmax is PREDS
    out = vqa_accuracy(logits, ANSWERS, FAMS, REL)                     # names from fusionlib.data.shapes
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
    items = [{"fake_pred": p, "answer": a, "family": f, "relational": r}
             for p, a, f, r in zip(PREDS, ANSWERS, FAMS, REL)]
    loader = DataLoader(items, batch_size=4)                  # batches of 4 and 2
    model = Oracle().train()
    out = evaluate_vqa(model, loader, prefix="val_", family_names=FAMILIES)
    assert model.training                                     # mode restored
    assert out["val_accuracy"] == pytest.approx(4 / 6) and out["val_relational_accuracy"] == 0.5
    assert out["val_closest_accuracy"] == 0.0
    right = -math.log(math.exp(5) / (math.exp(5) + 2))
    wrong = -math.log(1 / (math.exp(5) + 2))
    assert out["val_loss"] == pytest.approx((4 * right + 2 * wrong) / 6)


def test_recall_at_k_hand_computed():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3],     # positive 0 ranks first
                        [0.2, 0.4, 0.8, 0.6],     # positive 1 has two wrong candidates above it
                        [0.7, 0.7, 0.1, 0.0]])    # positive 1 ties a wrong one: the tie counts against
    out = recall_at_k(sim, torch.tensor([0, 1, 1]), ks=(1, 2, 3))
    assert out == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    several = torch.tensor([[True, False, False, False],
                            [False, True, False, True],   # a second positive at 0.6: one wrong above it
                            [False, True, False, False]])
    assert recall_at_k(sim, several, ks=(1, 2)) == pytest.approx({"R@1": 1 / 3, "R@2": 1.0})
    # Constant scores: every wrong candidate ties, so only K = all candidates finds the right one.
    assert recall_at_k(torch.zeros(3, 4), torch.tensor([0, 1, 2]), ks=(1, 3, 4)) == {"R@1": 0.0, "R@3": 0.0,
                                                                                        "R@4": 1.0}
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(sim, torch.zeros(3, 4, dtype=torch.bool))


def test_image_text_recall_both_directions():
    sim = torch.tensor([[0.9, 0.2, 0.8, 0.1],     # image 0: captions 0, 1
                        [0.3, 0.95, 0.4, 0.5]])   # image 1: captions 2, 3
    out = image_text_recall(sim, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert out == pytest.approx({"i2t_R@1": 0.5, "i2t_R@2": 1.0, "t2i_R@1": 0.5, "t2i_R@2": 1.0})
    with pytest.raises(ValueError, match="caption_image"):
        image_text_recall(sim, torch.tensor([0, 1, 2, 0]))


def test_itm_accuracy_hand_computed():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert itm_accuracy(logits, torch.tensor([0, 1, 1, -100])) == pytest.approx(2 / 3)
    assert itm_accuracy(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1, 1, 0])) == pytest.approx(1 / 3)
    assert math.isnan(itm_accuracy(torch.tensor([0.5]), torch.tensor([-100])))
    with pytest.raises(ValueError, match="labels"):
        itm_accuracy(torch.tensor([0.5]), torch.tensor([2]))


def test_retrieval_chance_is_the_mean_recall_of_every_ranking():
    # 3 images with 2 captions each: average the recall of image_text_recall over every ordering of
    # the scores, which is what a random ranking draws from.
    num_images, per_image, ks = 3, 2, (1, 2, 5)
    caption_image = torch.arange(num_images).repeat_interleave(per_image)          # (6,)
    totals: dict[str, float] = {}
    orders = list(itertools.permutations(range(num_images * per_image)))
    for n, order in enumerate(orders):
        captions_first = torch.tensor(order, dtype=torch.float32)                  # one ranking of the captions
        images_first = torch.tensor(orders[(7 * n) % len(orders)][:num_images], dtype=torch.float32)
        sim = captions_first[None, :] + 100 * images_first[:, None]                # i2t by captions, t2i by images
        for key, value in image_text_recall(sim, caption_image, ks).items():
            totals[key] = totals.get(key, 0.0) + value
    chance = retrieval_chance(num_images, per_image, ks)
    assert chance == pytest.approx({k: v / len(orders) for k, v in totals.items()}, abs=1e-6)   # recall is a float32 mean
    assert chance["t2i_R@5"] == 1.0 and chance["i2t_R@1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("args, match", [((0, 5), "num_images"), ((40, 0), "captions_per_image"),
                                         ((40, 5, (0,)), "ks"), ((2.5, 5), "num_images"),
                                         ((True, 5), "num_images")])
def test_retrieval_chance_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        retrieval_chance(*args)


def test_retrieval_chance_when_k_exceeds_the_captions():
    # 2 images x 2 captions: from K = 3 on every top K holds one of an image's captions.
    sim = torch.tensor([[0.1, 0.2, 0.9, 0.8], [0.1, 0.2, 0.9, 0.8]])
    recall = image_text_recall(sim, torch.tensor([0, 0, 1, 1]), ks=(3, 4, 9))
    chance = retrieval_chance(2, 2, ks=(3, 4, 9))
    assert {k: v for k, v in chance.items() if k.startswith("i2t")} == {"i2t_R@3": 1.0, "i2t_R@4": 1.0, "i2t_R@9": 1.0}
    assert all(recall[k] == 1.0 for k in chance if k.startswith("i2t"))
    assert retrieval_chance(1, 5, ks=(1, 10)) == {"i2t_R@1": 1.0, "i2t_R@10": 1.0, "t2i_R@1": 1.0, "t2i_R@10": 1.0}
