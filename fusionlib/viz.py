"""Pictures the book draws again and again: scenes with boxes, attention maps, curves.

Every function takes plain tensors / arrays and an optional matplotlib ``ax``
and returns the ``ax`` (or the figure), so a chapter can compose them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patches

BOX_COLOURS = {
    "red": "#d62728",
    "green": "#2ca02c",
    "blue": "#1f77b4",
    "orange": "#ff7f0e",
    "gray": "#7f7f7f",
    "yellow": "#bcbd22",
}


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def show_scene(
    image: Any,
    boxes: Any = None,
    labels: Sequence[str] | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
    box_colour: str = "black",
    linewidth: float = 1.2,
    fontsize: int = 7,
) -> plt.Axes:
    """Draw an image ``(H, W, 3)`` uint8 and optional pixel boxes ``(N, 4)`` xyxy with labels (chapter 2)."""
    ax = ax or plt.subplots(figsize=(3, 3))[1]
    image = _numpy(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    ax.imshow(image, interpolation="nearest")
    if boxes is not None:
        boxes = _numpy(boxes).reshape(-1, 4)
        if labels is not None and len(labels) != len(boxes):
            raise ValueError(
                f"labels must have one entry per box ({len(boxes)}), got {len(labels)}"
            )
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            # Pixel (x, y) covers [x - 0.5, x + 0.5] in imshow coordinates.
            ax.add_patch(
                patches.Rectangle(
                    (x1 - 0.5, y1 - 0.5),
                    x2 - x1,
                    y2 - y1,
                    fill=False,
                    edgecolor=box_colour,
                    linewidth=linewidth,
                )
            )
            if labels is not None and labels[i]:
                ax.text(
                    x1 - 0.5, y1 - 1.5, labels[i], fontsize=fontsize, color=box_colour, va="bottom"
                )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def attention_heatmap(
    weights: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    ax: plt.Axes | None = None,
    title: str | None = None,
    annotate: bool = True,
    cmap: str = "Blues",
    vmax: float | None = None,
) -> plt.Axes:
    """Heatmap of attention weights ``(rows, cols)``: e.g. words (queries) over regions (keys)."""
    w = _numpy(weights)
    if w.ndim != 2 or w.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"weights must have shape ({len(row_labels)}, {len(col_labels)}) "
            f"to match the labels, got {w.shape}"
        )
    ax = ax or plt.subplots(figsize=(0.5 * len(col_labels) + 2, 0.35 * len(row_labels) + 1))[1]
    vmax = float(w.max()) if vmax is None else vmax
    ax.imshow(w, cmap=cmap, vmin=0, vmax=max(vmax, 1e-8), aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    if annotate and w.size <= 400:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{w[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if w[i, j] > 0.6 * vmax else "black",
                )
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def regions_by_attention(
    image: Any,
    boxes: Any,
    weights: Any,
    ax: plt.Axes | None = None,
    title: str | None = None,
    colour: str = "#d62728",
) -> plt.Axes:
    """Draw region boxes with line width and opacity proportional to their attention weight ``(R,)``."""
    boxes, weights = _numpy(boxes).reshape(-1, 4), _numpy(weights).reshape(-1)
    if len(boxes) != len(weights):
        raise ValueError(f"weights must have one entry per box ({len(boxes)}), got {len(weights)}")
    ax = show_scene(image, ax=ax, title=title)
    top = max(float(weights.max()), 1e-8)
    for (x1, y1, x2, y2), w in zip(boxes, weights):
        strength = float(w) / top
        if strength < 0.05:
            continue
        ax.add_patch(
            patches.Rectangle(
                (x1 - 0.5, y1 - 0.5),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=colour,
                alpha=0.25 + 0.75 * strength,
                linewidth=0.5 + 3 * strength,
            )
        )
        ax.text(x2 - 0.5, y1 - 0.5, f"{w:.2f}", fontsize=6, color=colour, va="bottom", ha="right")
    return ax


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ax: plt.Axes | None = None,
    xlabel: str = "step",
    ylabel: str = "",
    title: str | None = None,
    logy: bool = False,
    smooth: int = 1,
) -> plt.Axes:
    """Plot named curves ``{name: (steps, values)}``; ``smooth`` is a moving-average window."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    for name, (xs, ys) in curves.items():
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if len(xs) != len(ys):
            raise ValueError(f"curve {name!r}: {len(xs)} steps but {len(ys)} values")
        if smooth > 1 and len(ys) >= smooth:
            kernel = np.ones(smooth) / smooth
            ys = np.convolve(ys, kernel, mode="valid")
            xs = xs[smooth - 1 :]
        ax.plot(xs, ys, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(fontsize=8)
    return ax
