"""fusionlib.viz draws what it is given and refuses mismatched inputs."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fusionlib import viz  # noqa: E402


def test_show_scene_draws_one_patch_per_box():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    ax = viz.show_scene(image, torch.tensor([[1, 1, 5, 5], [10, 10, 15, 18]]), ["a", "b"])
    assert len(ax.patches) == 2 and [t.get_text() for t in ax.texts] == ["a", "b"]
    plt.close("all")
    with pytest.raises(ValueError, match="labels must have one entry per box"):
        viz.show_scene(image, [[1, 1, 5, 5]], ["a", "b"])
    with pytest.raises(ValueError, match=r"image must have shape \(H, W, 3\)"):
        viz.show_scene(np.zeros((4, 4)))


def test_attention_heatmap_checks_labels():
    ax = viz.attention_heatmap(torch.rand(2, 3), ["w1", "w2"], ["r1", "r2", "r3"])
    assert len(ax.texts) == 6
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 2\)"):
        viz.attention_heatmap(torch.rand(2, 3), ["w1", "w2"], ["r1", "r2"])
    plt.close("all")


def test_regions_by_attention_skips_tiny_weights():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    ax = viz.regions_by_attention(image, [[1, 1, 5, 5], [6, 6, 9, 9]], [0.9, 0.01])
    assert len(ax.patches) == 1
    with pytest.raises(ValueError, match="one entry per box"):
        viz.regions_by_attention(image, [[1, 1, 5, 5]], [0.5, 0.5])
    plt.close("all")


def test_plot_curves_smooths_and_checks_lengths():
    ax = viz.plot_curves({"loss": (list(range(10)), list(range(10)))}, smooth=3)
    (line,) = ax.get_lines()
    assert len(line.get_xdata()) == 8 and line.get_ydata()[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 steps but 2 values"):
        viz.plot_curves({"x": ([1, 2, 3], [1, 2])})
    plt.close("all")
