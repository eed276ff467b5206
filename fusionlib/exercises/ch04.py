"""Checks for chapter 4's exercises (pretraining losses and masking).

Each check runs the student's function on cases whose answer
:mod:`fusionlib.losses` / :mod:`fusionlib.masking` know, and names the usual
mistake when the answer is wrong: dividing by every position instead of the
masked ones, one direction of InfoNCE only, labels where nothing was masked,
``trace(C T)`` instead of ``trace(C Tᵀ)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from fusionlib.exercises import call_student, expect_tensor, fail, passed
from fusionlib.losses import IGNORE_INDEX, contrastive_loss, mlm_loss

__all__ = [
    "check_masked_cross_entropy",
    "check_info_nce",
    "check_bert_replacement",
    "check_transport_cost",
]


def _scalar(name: str, got: object) -> torch.Tensor:
    got = expect_tensor(name, got)
    if got.numel() != 1:
        fail(f"{name} should be a scalar (the mean over the batch), got shape {tuple(got.shape)}")
    return got.reshape(())


# ---------------------------------------------------------------------------- exercise 1


def _mlm_cases():
    g = torch.Generator().manual_seed(404)
    for batch, seq, vocab, keep in [(2, 7, 11, 0.3), (3, 5, 6, 0.5), (1, 9, 20, 0.2)]:
        logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
        labels = torch.randint(vocab, (batch, seq), generator=g)
        chosen = torch.rand(batch, seq, generator=g) < keep
        chosen[0, 1] = True  # at least one target per case
        yield logits, torch.where(chosen, labels, torch.full_like(labels, IGNORE_INDEX))


def check_masked_cross_entropy(fn: Callable) -> None:
    """Exercise 1: ``fn(logits (B, T, V), labels (B, T) long, -100 = no target) -> scalar``:
    the mean cross-entropy over the positions that have a target."""
    for logits, labels in _mlm_cases():
        x = logits.clone().requires_grad_(True)
        got = _scalar("the loss", call_student(fn, x, labels.clone()))
        want = mlm_loss(logits, labels)
        scored = labels != IGNORE_INDEX
        if torch.allclose(got.detach(), want, atol=1e-6):
            if got.requires_grad:
                got.backward()
                if x.grad is not None and (x.grad[~scored].abs() > 1e-12).any():
                    fail(
                        "positions without a target (label -100) still get a gradient: score masked positions only"
                    )
            continue
        per_position = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if torch.allclose(got.detach(), per_position / labels.numel(), atol=1e-6):
            fail(
                "you divided by every position (B*T); the mean is over the masked positions only "
                "(labels != -100)"
            )
        if torch.allclose(got.detach(), per_position, atol=1e-6):
            fail("you returned the sum; divide by the number of masked positions")
        wrong_dim = F.nll_loss(
            F.log_softmax(logits, dim=1).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        )
        if torch.allclose(got.detach(), wrong_dim, atol=1e-6):
            fail(
                "the softmax must run over the vocabulary (the last dimension), not over positions"
            )
        fail(
            f"expected {want.item():.6f} (mean cross-entropy over the {int(scored.sum())} masked positions), "
            f"got {got.item():.6f}"
        )
    empty = torch.full((2, 4), IGNORE_INDEX, dtype=torch.long)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    got = call_student(fn, x, empty)
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        fail(f"with no masked position the loss should still be a scalar tensor, got {got!r}")
    if not torch.isfinite(got).all():
        fail(
            "a batch with no masked token gives NaN (0/0): divide by max(number of masked positions, 1)"
        )
    if got.item() != 0.0:
        fail(f"a batch with no masked token should give 0, got {got.item()}")
    passed(
        "masked-position cross-entropy matches fusionlib.losses.mlm_loss, and an empty batch gives 0"
    )


# ---------------------------------------------------------------------------- exercise 2


def check_info_nce(fn: Callable) -> None:
    """Exercise 2: ``fn(image_emb (B, D), text_emb (B, D), temperature) -> scalar``: symmetric InfoNCE
    with explicit L2 normalisation (CLIP)."""
    g = torch.Generator().manual_seed(7)
    for batch, dim, tau in [(4, 8, 0.07), (6, 5, 0.5), (3, 16, 1.0)]:
        # Different norms per row, so a missing normalisation shows.
        img = (
            torch.randn(batch, dim, generator=g, dtype=torch.float64)
            * torch.linspace(0.5, 3, batch)[:, None]
        )
        txt = img + 0.8 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
        got = _scalar("the loss", call_student(fn, img.clone(), txt.clone(), tau))
        want = contrastive_loss(img, txt, math.log(1 / tau))
        if torch.allclose(got.detach(), want, atol=1e-6):
            continue
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / tau
        target = torch.arange(batch)
        i2t, t2i = F.cross_entropy(logits, target), F.cross_entropy(logits.T, target)
        raw = img @ txt.T / tau
        candidates = {
            "you used only the image-to-text direction; InfoNCE here is symmetric: average image->text "
            "and text->image": i2t,
            "you used only the text-to-image direction; average it with image->text": t2i,
            "you added the two directions; CLIP averages them (divide by 2)": i2t + t2i,
            "the embeddings are not L2-normalised: F.normalize(x, dim=-1) before the dot products": (
                F.cross_entropy(raw, target) + F.cross_entropy(raw.T, target)
            )
            / 2,
            "divide the cosine similarities by the temperature (you multiplied)": (
                F.cross_entropy(logits * tau * tau, target)
                + F.cross_entropy(logits.T * tau * tau, target)
            )
            / 2,
            "you forgot the temperature": (
                F.cross_entropy(logits * tau, target) + F.cross_entropy(logits.T * tau, target)
            )
            / 2,
        }
        for message, value in candidates.items():
            if torch.allclose(got.detach(), value, atol=1e-6):
                fail(message)
        fail(
            f"for batch={batch}, temperature={tau}: expected {want.item():.6f}, got {got.item():.6f}"
        )
    passed("symmetric InfoNCE matches fusionlib.losses.contrastive_loss on 3 cases")


# ---------------------------------------------------------------------------- exercise 3


def check_bert_replacement(fn: Callable) -> None:
    """Exercise 3: ``fn(input_ids, chosen, u, random_ids, mask_token_id) -> (inputs, labels)``: of the
    chosen positions, ``u < 0.8`` -> ``[MASK]``, ``0.8 <= u < 0.9`` -> ``random_ids``, else kept;
    labels hold the original id where chosen and -100 elsewhere."""
    g = torch.Generator().manual_seed(11)
    mask_id = 4
    for batch, seq in [(3, 12), (5, 7)]:
        ids = torch.randint(5, 50, (batch, seq), generator=g)
        chosen = torch.rand(batch, seq, generator=g) < 0.5
        u = torch.rand(batch, seq, generator=g)
        u[0, :4] = torch.tensor([0.1, 0.85, 0.95, 0.8])  # one of each fate, and the 0.8 boundary
        chosen[0, :4] = True
        random_ids = torch.randint(5, 50, (batch, seq), generator=g)
        random_ids[random_ids == ids] += 1  # a random replacement always differs here
        original = ids.clone()
        out = call_student(fn, ids, chosen.clone(), u.clone(), random_ids.clone(), mask_id)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail(f"return a pair (inputs, labels), got {type(out).__name__}")
        inputs = expect_tensor("inputs", out[0], (batch, seq))
        labels = expect_tensor("labels", out[1], (batch, seq))
        if not torch.equal(ids, original):
            fail("you modified input_ids in place; clone it first (the originals are the labels)")
        want_inputs = original.clone()
        want_inputs[chosen & (u < 0.8)] = mask_id
        rnd = chosen & (u >= 0.8) & (u < 0.9)
        want_inputs[rnd] = random_ids[rnd]
        want_labels = torch.where(chosen, original, torch.full_like(original, IGNORE_INDEX))
        if not torch.equal(inputs[~chosen], original[~chosen]):
            fail("tokens that were not chosen changed; only chosen positions are replaced")
        if not torch.equal(labels, want_labels):
            if torch.equal(labels, original):
                fail(
                    "labels must be -100 where no token was chosen, so the loss ignores those positions"
                )
            if torch.equal(labels[chosen], inputs[chosen]):
                fail(
                    "labels must hold the ORIGINAL token at chosen positions, not the replaced input"
                )
            fail("labels should be input_ids at chosen positions and -100 elsewhere")
        if not torch.equal(inputs, want_inputs):
            if (inputs[chosen & (u >= 0.9)] == mask_id).any() or (
                inputs[chosen & (u < 0.8)] != mask_id
            ).any():
                fail(
                    "of the chosen positions, exactly those with u < 0.8 become [MASK]; "
                    "0.8 <= u < 0.9 become the random id, u >= 0.9 stay unchanged"
                )
            fail(
                "of the chosen positions with 0.8 <= u < 0.9, the token becomes random_ids at that position; "
                "u >= 0.9 keeps the original"
            )
    passed("the 80/10/10 replacement and the labels are right, boundaries included")


# ---------------------------------------------------------------------------- exercise 4


def check_transport_cost(fn: Callable) -> None:
    """Exercise 4: ``fn(cost (B, n, m), plan (B, n, m)) -> (B,)``: ``trace(C Tᵀ)`` per sample."""
    g = torch.Generator().manual_seed(3)
    for batch, n, m in [(2, 4, 4), (3, 5, 3), (1, 2, 6)]:
        cost = torch.rand(batch, n, m, generator=g, dtype=torch.float64) * 2
        plan = torch.rand(batch, n, m, generator=g, dtype=torch.float64)
        plan = plan / plan.sum(dim=(1, 2), keepdim=True)
        got = expect_tensor("the cost", call_student(fn, cost.clone(), plan.clone()))
        want = torch.einsum("bij,bij->b", cost, plan)
        if got.shape != (batch,):
            if got.numel() == 1 and torch.allclose(got.reshape(()), want.sum(), atol=1e-9):
                fail("you summed over the batch too; return one cost per sample, shape (B,)")
            fail(f"the cost should have shape (B,) = ({batch},), got {tuple(got.shape)}")
        if torch.allclose(got, want, atol=1e-9):
            continue
        if n == m and torch.allclose(
            got, torch.diagonal(cost @ plan, dim1=1, dim2=2).sum(-1), atol=1e-9
        ):
            fail("that is trace(C T); the transport cost is trace(C Tᵀ) = sum_ij C_ij T_ij")
        if torch.allclose(got, want / (n * m), atol=1e-9):
            fail("you took the mean of C * T; the cost is the sum over all (word, region) pairs")
        fail(f"expected sum_ij C_ij T_ij = {want.tolist()}, got {got.tolist()}")
    passed("trace(C Tᵀ) per sample, on square and non-square plans")
