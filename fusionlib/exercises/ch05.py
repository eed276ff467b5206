"""Checks for chapter 5's exercises (ViLBERT).

Each check runs the student's function on cases whose answer the library
knows (:func:`fusionlib.vision.loc5`, :class:`fusionlib.models.vilbert.ViLBERTForPretraining`'s
alignment head, :func:`fusionlib.models.vilbert.layer_schedule`,
:func:`fusionlib.models.vilbert.prepare_pretraining_inputs`) and names the
usual mistake when the answer is wrong: an area in pixels, width and height
swapped, a sum where ViLBERT multiplies, BERT's tanh pooler, the layers left
over after the last co-attention forgotten, labels switched off on the wrong
pairs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fusionlib.exercises import call_student, expect_tensor, fail, passed
from fusionlib.losses import IGNORE_INDEX
from fusionlib.vision import loc5

__all__ = [
    "check_location5",
    "check_alignment_logits",
    "check_layer_schedule",
    "check_mismatched_labels",
]


# ---------------------------------------------------------------------------- exercise 1: the 5-d location


def _location_cases():
    g = torch.Generator().manual_seed(505)
    # A square image, then non-square ones: swapped W and H only show when W != H.
    for size in [(75, 75), (60, 90), (120, 40)]:
        H, W = size
        x1 = torch.randint(0, W - 10, (6,), generator=g).float()
        y1 = torch.randint(0, H - 10, (6,), generator=g).float()
        x2 = x1 + 1 + torch.randint(0, 9, (6,), generator=g).float()
        y2 = y1 + 1 + torch.randint(0, 9, (6,), generator=g).float()
        boxes = torch.stack([x1, y1, x2, y2], dim=-1)
        boxes[-1] = torch.tensor([0.0, 0.0, float(W), float(H)])  # the whole image
        yield boxes, size


def check_location5(fn: Callable) -> None:
    """Exercise 1: ``fn(boxes (N, 4) xyxy pixels, image_size (H, W)) -> (N, 5)``:
    ViLBERT's ``[x1/W, y1/H, x2/W, y2/H, area/(W*H)]``."""
    for boxes, (H, W) in _location_cases():
        got = expect_tensor(
            "the location", call_student(fn, boxes.clone(), (H, W)), (len(boxes), 5)
        )
        want = loc5(boxes, (H, W))
        if torch.allclose(got.float(), want, atol=1e-5):
            continue
        x1, y1, x2, y2 = boxes.unbind(-1)
        area = (x2 - x1) * (y2 - y1)
        if torch.allclose(got[:, :4].float(), want[:, :4], atol=1e-5):
            if torch.allclose(got[:, 4].float(), area, atol=1e-3):
                fail(
                    "the area is in pixels: divide it by the image's area W*H, so that it lies in [0, 1]"
                )
            if W != H and any(
                torch.allclose(got[:, 4].float(), area / side**2, atol=1e-5) for side in (H, W)
            ):
                fail("the area must be divided by W*H (the image's area), not by one side squared")
            fail(
                f"the first four coordinates are right but the area is not: expected {want[:, 4].tolist()}, "
                f"got {got[:, 4].tolist()}"
            )
        swapped = torch.stack([x1 / H, y1 / W, x2 / H, y2 / W], dim=-1)
        if W != H and torch.allclose(got[:, :4].float(), swapped, atol=1e-5):
            fail(
                f"x is divided by H and y by W: for an image of H={H}, W={W}, x coordinates go with the width"
            )
        if torch.allclose(got[:, :4].float(), boxes, atol=1e-5):
            fail(
                "the coordinates are still in pixels: divide x by the width W and y by the height H"
            )
        xywh = torch.stack([x1 / W, y1 / H, (x2 - x1) / W, (y2 - y1) / H], dim=-1)
        if torch.allclose(got[:, :4].float(), xywh, atol=1e-5):
            fail(
                "you wrote (x, y, width, height); ViLBERT's location holds the two corners x1, y1, x2, y2"
            )
        fail(
            f"for boxes {boxes[:2].tolist()} in an image of H={H}, W={W} expected {want[:2].tolist()}, "
            f"got {got[:2].tolist()}"
        )
    passed(
        "ViLBERT's 5-d location: both corners over the image size, and the box's share of the image."
    )


# ---------------------------------------------------------------------------- exercise 2: the ITM head


def _alignment_modules(hidden_t: int, hidden_v: int, bi: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text_pooler, visual_pooler, classifier = (
        nn.Linear(hidden_t, bi),
        nn.Linear(hidden_v, bi),
        nn.Linear(bi, 2),
    )
    with torch.no_grad():
        for layer in (text_pooler, visual_pooler, classifier):
            layer.weight.copy_(
                torch.randn(layer.weight.shape, generator=g) / layer.weight.shape[1] ** 0.5
            )
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=g))
    return text_pooler, visual_pooler, classifier


def check_alignment_logits(fn: Callable) -> None:
    """Exercise 2: ``fn(h_cls (B, text_hidden), h_img (B, visual_hidden), text_pooler, visual_pooler,
    classifier) -> (B, 2)``: ``classifier(ReLU(text_pooler(h_cls)) * ReLU(visual_pooler(h_img)))``."""
    for B, ht, hv, bi, seed in [(5, 12, 16, 8, 0), (3, 20, 10, 6, 1)]:
        g = torch.Generator().manual_seed(100 + seed)
        h_cls, h_img = torch.randn(B, ht, generator=g), torch.randn(B, hv, generator=g)
        tp, vp, cls = _alignment_modules(ht, hv, bi, seed)
        got = expect_tensor(
            "the logits", call_student(fn, h_cls.clone(), h_img.clone(), tp, vp, cls), (B, 2)
        )
        with torch.no_grad():
            pt, pv = tp(h_cls), vp(h_img)
            want = cls(torch.relu(pt) * torch.relu(pv))
            if torch.allclose(got, want, atol=1e-5):
                continue
            wrong = {
                "you added the pooled vectors; ViLBERT fuses them by an elementwise product": cls(
                    torch.relu(pt) + torch.relu(pv)
                ),
                "the pooled vectors need a ReLU before the product (ViLBERT's pooler is Linear then ReLU)": cls(
                    pt * pv
                ),
                "that is BERT's tanh pooler; ViLBERT's pooler is Linear then ReLU": cls(
                    torch.tanh(pt) * torch.tanh(pv)
                ),
                "the ReLU goes on each pooled vector, before the product, not on the product": cls(
                    torch.relu(pt * pv)
                ),
                "ViLBERT pools the first position of each stream ([CLS] and [IMG]) with its own Linear + ReLU; "
                "it looks as if you used one pooler for both streams or swapped them": cls(
                    torch.relu(vp(h_img)) * torch.relu(vp(h_img))
                )
                if ht == hv
                else None,
            }
            for message, value in wrong.items():
                if value is not None and torch.allclose(got, value, atol=1e-5):
                    fail(message)
        fail(
            f"expected {want[:2].tolist()} for the first two pairs, got {got[:2].tolist()}: "
            "classifier(ReLU(text_pooler(h_cls)) * ReLU(visual_pooler(h_img)))"
        )
    passed(
        "the alignment head multiplies ReLU(W_t h_CLS) and ReLU(W_v h_IMG) and classifies the product."
    )


# ---------------------------------------------------------------------------- exercise 3: the layer schedule


_SCHEDULE_CASES = [
    # (text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers)
    ((2, 3), (0, 1), 4, 2),  # the book's small model
    ((6, 7, 8, 9, 10, 11), (0, 1, 2, 3, 4, 5), 12, 6),  # the paper's base model
    ((1, 1, 3), (1, 2, 2), 4, 3),  # repeated ids: no layer between two co-TRMs
    ((0,), (0,), 2, 2),  # co-attention first, everything after it
]


def _reference_schedule(t_ids, v_ids, nt, nv):
    from fusionlib.models.vilbert import ViLBERTConfig, layer_schedule

    config = ViLBERTConfig(
        vocab_size=10,
        num_region_classes=3,
        text_num_layers=nt,
        visual_num_layers=nv,
        text_layer_ids=t_ids,
        visual_layer_ids=v_ids,
    )
    return layer_schedule(config)


def check_layer_schedule(fn: Callable) -> None:
    """Exercise 3: ``fn(text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers)`` ->
    ``[("text", i) | ("visual", i) | ("co", k), ...]`` in the order ViLBERT's encoder runs them."""
    for t_ids, v_ids, nt, nv in _SCHEDULE_CASES:
        got = call_student(fn, list(t_ids), list(v_ids), nt, nv)
        if not isinstance(got, (list, tuple)):
            fail(f"return a list of (kind, index) pairs, got {type(got).__name__}")
        try:
            got = [(str(kind), int(i)) for kind, i in got]
        except (TypeError, ValueError):
            fail(f"every entry must be a pair like ('text', 0), got {list(got)[:4]}")
        want = _reference_schedule(t_ids, v_ids, nt, nv)
        if got == want:
            continue
        where = f"for text_layer_ids={list(t_ids)}, visual_layer_ids={list(v_ids)}, {nt} text and {nv} visual layers"
        counts = {kind: sum(k == kind for k, _ in got) for kind in ("text", "visual", "co")}
        expected = {"text": nt, "visual": nv, "co": len(t_ids)}
        if counts["co"] != expected["co"]:
            fail(
                f"{where}: there must be one co-attention layer per entry of the id lists ({expected['co']}), "
                f"got {counts['co']}"
            )
        for kind in ("text", "visual"):
            if counts[kind] < expected[kind]:
                ran = sorted(i for k, i in got if k == kind)
                if ran == list(range(counts[kind])):
                    fail(
                        f"{where}: only {counts[kind]} of the {expected[kind]} {kind} layers run; the layers "
                        f"left after the last co-attention layer must run too"
                    )
                fail(
                    f"{where}: the {kind} layers run are {ran}, expected every one of 0..{expected[kind] - 1}"
                )
            if counts[kind] > expected[kind]:
                fail(
                    f"{where}: {counts[kind]} {kind} layers run, but the stream has only {expected[kind]}; "
                    "ids[k] is a count of layers already run (co-TRM k runs after the first ids[k] layers)"
                )
        first_co = want.index(("co", 0))
        if got.index(("co", 0)) != first_co:
            fail(
                f"{where}: co-TRM 0 must run after exactly {t_ids[0]} text and {v_ids[0]} visual layers "
                f"(ids[k] layers have run before co-TRM k); yours runs at position {got.index(('co', 0))}, "
                f"expected {first_co}"
            )
        tail_want = want[want.index(("co", len(t_ids) - 1)) + 1 :]
        tail_got = (
            got[got.index(("co", len(t_ids) - 1)) + 1 :] if ("co", len(t_ids) - 1) in got else []
        )
        if sorted(tail_got) == sorted(tail_want) and tail_got != tail_want:
            fail(
                f"{where}: after the last co-attention layer the remaining visual layers run first, then the "
                f"remaining text layers (as vilbert-multi-task's BertEncoder): expected {tail_want}, got {tail_got}"
            )
        fail(f"{where}: expected {want}, got {got}")
    passed(
        "the schedule runs ids[k] layers of each stream before co-TRM k, and the rest after the last one."
    )


# ---------------------------------------------------------------------------- exercise 4: mismatched pairs


def _mismatch_cases():
    g = torch.Generator().manual_seed(707)
    for B, T in [(6, 7), (4, 5)]:
        labels = torch.randint(5, 30, (B, T), generator=g)
        labels = labels.masked_fill(torch.rand(B, T, generator=g) < 0.6, IGNORE_INDEX)
        labels[:, 1] = 7  # every row has a target to lose
        caption_index = torch.arange(B)
        caption_index[1], caption_index[3] = 2, 0  # rows 1 and 3 got another image's caption
        yield labels, caption_index


def check_mismatched_labels(fn: Callable) -> None:
    """Exercise 4: ``fn(mlm_labels (B, T) long, caption_index (B,) long) -> (B, T)``: the labels with every
    target of a mismatched pair (``caption_index[i] != i``) set to -100; the input left unchanged."""
    for labels, caption_index in _mismatch_cases():
        original = labels.clone()
        got = call_student(fn, labels, caption_index.clone())
        if not torch.equal(labels, original):
            fail(
                "you changed mlm_labels in place; return a new tensor (the caller may still need the original)"
            )
        got = expect_tensor("the labels", got, tuple(labels.shape))
        matched = caption_index == torch.arange(len(caption_index))
        want = original.masked_fill(~matched[:, None], IGNORE_INDEX)
        if torch.equal(got.long(), want):
            continue
        if torch.equal(got.long(), original.masked_fill(matched[:, None], IGNORE_INDEX)):
            fail(
                "you switched off the matched pairs; the targets to drop are those of the mismatched pairs "
                "(caption_index[i] != i), where the caption does not describe the image"
            )
        if torch.equal(got.long(), original.masked_fill(~matched[:, None], 0)):
            fail(
                "mismatched pairs must get the ignore index -100, not 0 (0 is [PAD], a real class to predict)"
            )
        if torch.equal(got.long(), original):
            fail(
                "nothing changed: rows whose caption_index differs from their own index must lose their targets"
            )
        if not torch.equal(got.long()[matched], want[matched]):
            fail("the matched rows must keep exactly their labels")
        fail(
            f"for caption_index {caption_index.tolist()} expected {want.tolist()}, got {got.tolist()}"
        )
    passed("a mismatched pair keeps its masked inputs but has no MLM target.")
