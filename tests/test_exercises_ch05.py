"""Chapter 5's exercise checks pass right answers and explain typical wrong ones."""

from __future__ import annotations

import pytest
import torch

from fusionlib.exercises import ExerciseFailure
from fusionlib.exercises import ch05

IGNORE = -100


def not_written(*args, **kwargs):
    raise NotImplementedError


# -- exercise 1: the 5-d location ------------------------------------------------------


def location_right(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) * (y2 - y1) / (W * H)], dim=-1)


def location_pixel_area(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) * (y2 - y1)], dim=-1)


def location_swapped(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 / H, y1 / W, x2 / H, y2 / W, (x2 - x1) * (y2 - y1) / (W * H)], dim=-1)


def location_xywh(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        [x1 / W, y1 / H, (x2 - x1) / W, (y2 - y1) / H, (x2 - x1) * (y2 - y1) / (W * H)], dim=-1
    )


def location_pixels(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1) / (W * H)], dim=-1)


def location_four(boxes, image_size):
    H, W = image_size
    return boxes / torch.tensor([W, H, W, H])


def location_area_by_height_squared(boxes, image_size):
    H, W = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1 / W, y1 / H, x2 / W, y2 / H, (x2 - x1) * (y2 - y1) / (H * H)], dim=-1)


def test_location5_check(capsys):
    ch05.check_location5(location_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (location_pixel_area, "area is in pixels"),
        (location_swapped, "divided by H"),
        (location_xywh, "x, y, width, height"),
        (location_pixels, "still in pixels"),
        (location_four, r"shape \(6, 5\)"),
        (location_area_by_height_squared, "not by one side squared"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch05.check_location5(wrong)


# -- exercise 2: the alignment (ITM) head ------------------------------------------------


def itm_right(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return classifier(torch.relu(text_pooler(h_cls)) * torch.relu(visual_pooler(h_img)))


def itm_sum(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return classifier(torch.relu(text_pooler(h_cls)) + torch.relu(visual_pooler(h_img)))


def itm_no_relu(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return classifier(text_pooler(h_cls) * visual_pooler(h_img))


def itm_tanh(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return classifier(torch.tanh(text_pooler(h_cls)) * torch.tanh(visual_pooler(h_img)))


def itm_relu_after(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return classifier(torch.relu(text_pooler(h_cls) * visual_pooler(h_img)))


def itm_concat(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return classifier(
        torch.cat([torch.relu(text_pooler(h_cls)), torch.relu(visual_pooler(h_img))], -1)
    )


def itm_one_logit(h_cls, h_img, text_pooler, visual_pooler, classifier):
    return itm_right(h_cls, h_img, text_pooler, visual_pooler, classifier)[:, 1]


def test_alignment_logits_check(capsys):
    ch05.check_alignment_logits(itm_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (itm_sum, "elementwise product"),
        (itm_no_relu, "need a ReLU"),
        (itm_tanh, "tanh"),
        (itm_relu_after, "before the product"),
        (itm_concat, "raised RuntimeError"),
        (itm_one_logit, r"shape \(5, 2\)"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch05.check_alignment_logits(wrong)


# -- exercise 3: the layer schedule ------------------------------------------------------


def schedule_right(text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers):
    plan, t, v = [], 0, 0
    for k, (t_end, v_end) in enumerate(zip(text_layer_ids, visual_layer_ids)):
        plan += (
            [("text", i) for i in range(t, t_end)]
            + [("visual", i) for i in range(v, v_end)]
            + [("co", k)]
        )
        t, v = t_end, v_end
    return (
        plan
        + [("visual", i) for i in range(v, visual_num_layers)]
        + [("text", i) for i in range(t, text_num_layers)]
    )


def schedule_forgets_the_rest(text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers):
    plan, t, v = [], 0, 0
    for k, (t_end, v_end) in enumerate(zip(text_layer_ids, visual_layer_ids)):
        plan += (
            [("text", i) for i in range(t, t_end)]
            + [("visual", i) for i in range(v, v_end)]
            + [("co", k)]
        )
        t, v = t_end, v_end
    return plan


def schedule_text_last_then_visual(
    text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers
):
    plan = schedule_forgets_the_rest(
        text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers
    )
    t, v = text_layer_ids[-1], visual_layer_ids[-1]
    return (
        plan
        + [("text", i) for i in range(t, text_num_layers)]
        + [("visual", i) for i in range(v, visual_num_layers)]
    )


def schedule_off_by_one(text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers):
    # Treats ids[k] as the index of the layer to run before co-TRM k (one layer too many).
    plan, t, v = [], 0, 0
    for k, (t_end, v_end) in enumerate(zip(text_layer_ids, visual_layer_ids)):
        plan += [("text", i) for i in range(t, t_end + 1)] + [
            ("visual", i) for i in range(v, v_end + 1)
        ]
        plan.append(("co", k))
        t, v = t_end + 1, v_end + 1
    return (
        plan
        + [("visual", i) for i in range(v, visual_num_layers)]
        + [("text", i) for i in range(t, text_num_layers)]
    )


def schedule_all_first(text_layer_ids, visual_layer_ids, text_num_layers, visual_num_layers):
    return (
        [("text", i) for i in range(text_num_layers)]
        + [("visual", i) for i in range(visual_num_layers)]
        + [("co", k) for k in range(len(text_layer_ids))]
    )


def test_layer_schedule_check(capsys):
    ch05.check_layer_schedule(schedule_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (schedule_forgets_the_rest, "left after the last co-attention layer"),
        (schedule_text_last_then_visual, "remaining visual layers run first"),
        (schedule_off_by_one, "ids\\[k\\] is a count|must run after exactly"),
        (schedule_all_first, "must run after exactly"),
        (lambda *a: "T0 T1 C0", "list of \\(kind, index\\) pairs"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch05.check_layer_schedule(wrong)


# -- exercise 4: no MLM targets for mismatched pairs -------------------------------------


def mismatch_right(mlm_labels, caption_index):
    matched = caption_index == torch.arange(len(caption_index))
    return mlm_labels.masked_fill(~matched[:, None], IGNORE)


def mismatch_in_place(mlm_labels, caption_index):
    matched = caption_index == torch.arange(len(caption_index))
    mlm_labels[~matched] = IGNORE
    return mlm_labels


def mismatch_inverted(mlm_labels, caption_index):
    matched = caption_index == torch.arange(len(caption_index))
    return mlm_labels.masked_fill(matched[:, None], IGNORE)


def mismatch_zero(mlm_labels, caption_index):
    matched = caption_index == torch.arange(len(caption_index))
    return mlm_labels.masked_fill(~matched[:, None], 0)


def mismatch_nothing(mlm_labels, caption_index):
    return mlm_labels.clone()


def mismatch_by_column(mlm_labels, caption_index):
    # Treats caption_index as a position in the caption: drops columns instead of rows.
    out = mlm_labels.clone()
    out[:, caption_index[caption_index != torch.arange(len(caption_index))]] = IGNORE
    return out


def test_mismatched_labels_check(capsys):
    ch05.check_mismatched_labels(mismatch_right)
    assert "Correct" in capsys.readouterr().out
    for wrong, message in [
        (mismatch_in_place, "in place"),
        (mismatch_inverted, "switched off the matched pairs"),
        (mismatch_zero, "not 0"),
        (mismatch_nothing, "nothing changed"),
        (mismatch_by_column, "matched rows must keep"),
        (not_written, "not implemented yet"),
    ]:
        with pytest.raises(ExerciseFailure, match=message):
            ch05.check_mismatched_labels(wrong)
