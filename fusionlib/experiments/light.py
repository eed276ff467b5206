"""Chapter 7's lightweight curve: chapter 3's cross-attention model at four sizes, in one fixed budget.

Section 7.5 asks how much accuracy a fusion model keeps when it shrinks. Every
size here trains on chapter 3's data (:func:`fusionlib.experiments.fusion.vqa_data`:
region features and locations z-scored, locations scaled), with chapter 3's
step (:func:`~fusionlib.experiments.fusion.answer_loss`) and chapter 3's
schedule shape (AdamW, warm-up then cosine decay, the settings of
:func:`~fusionlib.experiments.fusion.fusion_train_config`), and with *the same
steps and batch for every size*: the curve measures how much each size learns
in a fixed budget, not what it could reach at convergence. Each size is
trained with three seeds (:data:`LIGHT_SEEDS`), so the chapter can show the
spread that one seed hides.

* :data:`LIGHT_SIZES` -- the sizes, as :class:`LightSize` (hidden width, cross-attention layers);
* :func:`light_train_config` and :data:`LIGHT_BUDGET` -- the fixed budget per recipe;
* :func:`light_name` / :func:`light_runs` -- the checkpoint names, ``"ch07/light_h64_l2_seed1"``;
* :func:`light_spec` and :func:`train_light_model` -- the fingerprinted spec and the training.

Cost on this book's 2-core CPU (one torch thread, batch 512, the full world;
measured with 25-step runs while another one-thread training shared the
machine), seconds per step, parameters, and the float16 checkpoint:

=========  ==========  =========  =============
size       parameters  s / step   float16 (MB)
=========  ==========  =========  =============
h32_l1         25,418  0.03-0.05           0.05
h64_l2        129,738  0.15                0.26
h128_l2       472,458  0.41                0.94
h192_l2     1,028,170  1.22                2.06
h256_l2     1,796,874  2.14                3.59
h256_l4     3,378,442  3.42                6.76
=========  ==========  =========  =============

The full recipe (600 steps of 512, about 1.6 passes over the 196,000 training
questions) therefore costs about 1.8 s per step summed over the four sizes,
some 20 minutes per seed with the validation passes and about an hour for
the whole sweep, and its twelve checkpoints take about 10 MB. The two
hidden-256 sizes of the table are left out: 256 x 2 in place of 192 x 2
would have made the sweep half as long again and, with three seeds of it,
pushed the checkpoints past 12 MB; hidden 192 is the largest size that fits
both. The
small recipe (400 steps of 128) costs 0.02, 0.05, 0.19 and 0.39 s per step
for the four sizes, about 15 minutes for the sweep on one thread.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from fusionlib.checkpoints import recipe_rank
from fusionlib.experiments import fusion
from fusionlib.experiments.world import BookWorld
from fusionlib.models import VQAConfig
from fusionlib.train import _RESULT_FIELDS, TrainConfig

__all__ = [
    "LIGHT_BUDGET",
    "LIGHT_SEEDS",
    "LIGHT_SIZES",
    "LightSize",
    "light_config",
    "light_name",
    "light_runs",
    "light_spec",
    "light_train_config",
    "train_light_model",
]


@dataclasses.dataclass(frozen=True)
class LightSize:
    """One size of the sweep: the cross-attention model's hidden width and number of fusion layers.

    Heads are 32 wide (``hidden // 32`` of them), the feed-forward block and the
    answer MLP are ``2 * hidden`` wide, as in chapter 3's model; so
    ``LightSize(128, 2)`` *is* chapter 3's full-recipe cross-attention model.
    """

    hidden: int
    layers: int

    def __post_init__(self) -> None:
        if self.hidden <= 0 or self.hidden % 32 or self.layers <= 0:
            raise ValueError(
                f"hidden must be a positive multiple of 32 and layers positive, got {self}"
            )

    @property
    def label(self) -> str:
        """The size as checkpoint names and tables write it, ``"h64_l2"``."""
        return f"h{self.hidden}_l{self.layers}"


# Smallest first: train_book.py trains the cheapest checkpoints first.
LIGHT_SIZES: tuple[LightSize, ...] = (
    LightSize(32, 1),
    LightSize(64, 2),
    LightSize(128, 2),
    LightSize(192, 2),
)
LIGHT_SEEDS: tuple[int, ...] = (0, 1, 2)

# recipe -> (steps, warm-up steps, validate every): the same for every size. The warm-up is ~6% of the
# steps, as in chapter 3's recipes; smoke is chapter 3's smoke schedule. The batch is chapter 3's
# (fusion.BATCH_SIZE: 32, 128, 512).
LIGHT_BUDGET = {"smoke": (30, 5, 15), "small": (400, 25, 100), "full": (600, 40, 100)}


def light_config(size: LightSize, vocab_size: int, num_answers: int, region_dim: int) -> VQAConfig:
    """The :class:`~fusionlib.models.VQAConfig` of ``size``: chapter 3's full cross-attention config, resized.

    Every recipe uses the same sizes (they are the experiment); the recipes
    differ only in the budget (:func:`light_train_config`). Questions are
    mean-pooled with no text layer, no dropout (chapter 3, section 3.4).
    """
    _, base = fusion.fusion_setups("full", vocab_size, num_answers, region_dim)["cross_attention"]
    return dataclasses.replace(
        base,
        hidden_size=size.hidden,
        num_layers=size.layers,
        num_heads=size.hidden // 32,
        ffn_size=2 * size.hidden,
        classifier_hidden=2 * size.hidden,
    )


def light_train_config(recipe: str, seed: int = 0) -> TrainConfig:
    """Chapter 3's optimiser and schedule shape over :data:`LIGHT_BUDGET`'s steps, for ``seed``.

    :func:`~fusionlib.experiments.fusion.fusion_train_config` of the same
    recipe: AdamW at chapter 3's peak learning rate, weight decay and
    clipping, a linear warm-up, then cosine decay to zero, fp32; only the
    number of steps, the warm-up and how often the validation split is scored
    change.
    """
    recipe_rank(recipe)  # a clear error for an unknown recipe
    steps, warmup, eval_every = LIGHT_BUDGET[recipe]
    return dataclasses.replace(
        fusion.fusion_train_config(recipe, seed),
        steps=steps,
        warmup_steps=warmup,
        eval_every=eval_every,
    )


def light_name(size: LightSize, seed: int) -> str:
    """The checkpoint name of ``size`` trained with ``seed``: ``"ch07/light_h64_l2_seed1"``."""
    return f"ch07/light_{size.label}_seed{seed}"


def light_runs() -> list[tuple[LightSize, int, str]]:
    """``[(size, seed, checkpoint name), ...]`` for the whole sweep, smallest size first, then by seed."""
    return [(size, seed, light_name(size, seed)) for size in LIGHT_SIZES for seed in LIGHT_SEEDS]


def light_spec(size: LightSize, seed: int, book: BookWorld, recipe: str) -> dict[str, Any]:
    """Everything one model of the sweep depends on: its fingerprint's input (:mod:`fusionlib.checkpoints`)."""
    config = light_config(size, len(book.tokenizer), len(book.answers), book.region_dim)
    train_config = light_train_config(recipe, seed)
    return {
        "model": "cross_attention",
        "model_config": config.to_dict(),
        "data": book.data_spec(),
        "train": {k: train_config.to_dict()[k] for k in _RESULT_FIELDS + ("eval_every",)},
        "batch_size": fusion.BATCH_SIZE[recipe],
        "val_images": fusion.VAL_IMAGES[recipe],
        "step": "answer_loss",
        "standardise": "train z-score, region_loc5 x location_scale",
    }


def train_light_model(
    size: LightSize,
    seed: int,
    book: BookWorld,
    data: fusion.VQAData,
    recipe: str,
    device: torch.device | str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], float]:
    """Train one model of the sweep on chapter 3's data; ``(model, history dict, wall seconds)``.

    ``data`` is :func:`~fusionlib.experiments.fusion.vqa_data` for ``recipe``,
    shared by every size: its location scale, measured on chapter 3's model,
    is the same for every size of the sweep (a fresh ``nn.Linear``'s output
    spread does not depend on its output width; the tests check it).
    """
    return fusion.train_vqa_model(
        "cross_attention",
        light_config(size, len(book.tokenizer), len(book.answers), book.region_dim),
        light_train_config(recipe, seed),
        fusion.BATCH_SIZE[recipe],
        data,
        recipe,
        seed=seed,
        device=device,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
