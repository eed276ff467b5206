"""Chapter 3's experiments: six ways to fuse a question with regions, trained on the world's VQA.

Defined once here and used by the chapter, by ``scripts/train_book.py`` and
by the golden tests:

* :func:`fusion_setups` -- the models (question-only, image-only, late fusion,
  relation network, cross-attention, cross-attention with the geometry-biased
  region layer) and their :class:`~fusionlib.models.VQAConfig` per recipe;
* :func:`fusion_train_config` and :data:`BATCH_SIZE` -- how long and how big;
* :func:`vqa_data` -- the question datasets, on the device, standardised the
  way section 3.3 derives;
* :func:`answer_loss` -- the training step: cross-entropy on the answer;
* :func:`train_fusion_model` and :func:`fusion_spec` -- train one model, and the
  spec that fingerprints it for :mod:`fusionlib.checkpoints`;
* :func:`train_vqa_model` -- the training loop itself, for any VQA model on this
  data (chapter 7's size sweep, :mod:`fusionlib.experiments.light`, uses it too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlib import embeddings, runtime
from fusionlib.checkpoints import recipe_rank
from fusionlib.data.datasets import QuestionDataset, TensorBatches, make_tensor_loader
from fusionlib.experiments.world import BookWorld
from fusionlib.metrics import evaluate_vqa
from fusionlib.models import VQAConfig, build_model
from fusionlib.train import _RESULT_FIELDS, TrainConfig, train

__all__ = [
    "SETUP_NAMES",
    "SETUP_LABELS",
    "BATCH_SIZE",
    "VAL_IMAGES",
    "EVAL_BATCH",
    "fusion_setups",
    "fusion_train_config",
    "location_scale",
    "VQAData",
    "vqa_data",
    "answer_loss",
    "fusion_spec",
    "train_vqa_model",
    "train_fusion_model",
    "evaluate_fusion_model",
]

# Results key -> the label the chapter's tables print.
SETUP_LABELS = {
    "question_only": "question-only",
    "image_only": "image-only",
    "late_fusion": "late fusion",
    "relation_network": "relation network",
    "cross_attention": "cross-attention",
    "cross_attention_geometry": "cross-attention + geometry",
}
SETUP_NAMES = tuple(SETUP_LABELS)
BATCH_SIZE = {"smoke": 32, "small": 128, "full": 512}
VAL_IMAGES = {
    "smoke": 50,
    "small": 150,
    "full": 500,
}  # validation curves on part of the split: cheaper on a CPU
EVAL_BATCH = {"smoke": 256, "small": 1000, "full": 5000}


def fusion_setups(
    recipe: str, vocab_size: int, num_answers: int, region_dim: int
) -> dict[str, tuple[str, VQAConfig]]:
    """``{setup: (registered model name, config)}`` for chapter 3's six models under ``recipe``.

    Text is mean-pooled with no text self-attention layer (``text_layers=0,
    text_pooling="mean"``) and no dropout: the questions are short and the
    models limited by training time, not overfitting (section 3.4). The
    geometry setup adds one region self-attention layer whose scores get a
    learned bias from box geometry, started near the identity (section 3.2).
    """
    recipe_rank(recipe)  # a clear error for an unknown recipe
    base = dict(vocab_size=vocab_size, num_answers=num_answers, region_dim=region_dim)
    config = {
        "smoke": VQAConfig(
            **base,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            ffn_size=64,
            text_layers=0,
            text_pooling="mean",
            classifier_hidden=32,
            rn_hidden=32,
            rn_g_layers=2,
            dropout=0.0,
        ),
        "small": VQAConfig(
            **base,
            text_layers=0,
            ffn_size=256,
            text_pooling="mean",
            rn_hidden=64,
            rn_g_layers=3,
            dropout=0.0,
        ),
        "full": VQAConfig(**base, text_layers=0, ffn_size=256, text_pooling="mean", dropout=0.0),
    }[recipe]
    geometry = dataclasses.replace(
        config,
        region_layers=1,
        geometry_bias=True,
        geometry_self_logit=4.0,
        geometry_init="identity",
    )
    return {
        "question_only": ("question_only", config),
        "image_only": ("image_only", config),
        "late_fusion": ("late_fusion", config),
        "relation_network": ("relation_network", config),
        "cross_attention": ("cross_attention", config),
        "cross_attention_geometry": ("cross_attention", geometry),
    }


def fusion_train_config(recipe: str, seed: int = 0) -> TrainConfig:
    """AdamW with warm-up and cosine decay; fp32 (bf16 autocast adds cast kernels and does not pay at this size)."""
    recipe_rank(recipe)  # a clear error for an unknown recipe
    config = {
        "smoke": TrainConfig(
            steps=30, lr=2e-3, warmup_steps=5, eval_every=15, seed=seed, amp=False
        ),
        "small": TrainConfig(
            steps=1600, lr=1e-3, warmup_steps=100, eval_every=400, seed=seed, amp=False
        ),
        "full": TrainConfig(
            steps=2500, lr=1e-3, warmup_steps=150, eval_every=500, seed=seed, amp=False
        ),
    }
    return config[recipe]


def location_scale(config: VQAConfig, seed: int = 0) -> tuple[float, float, float]:
    """``(feature part, location part, scale)``: how far unit-variance inputs move a fresh region embedding.

    At initialisation a region's 64 feature dimensions move its embedding far
    more than its 5 location numbers do, so the locations are standardised to
    a larger spread, ``scale`` = feature part / location part rounded to 0.1
    (section 3.3). Measured on the cross-attention model built with ``seed``.
    """
    return embeddings.location_scale(
        lambda: build_model("cross_attention", config).regions.embeddings, seed
    )


@dataclasses.dataclass
class VQAData:
    """Question datasets of a world and their on-device, standardised tensors."""

    datasets: dict[str, QuestionDataset]  # train / val (first VAL_IMAGES images) / test
    tensors: dict[str, TensorBatches]
    statistics: dict[
        str, tuple[Tensor, Tensor]
    ]  # the train split's standardisation, applied to every split
    location_scale: float


def vqa_data(book: BookWorld, recipe: str, device: torch.device | str | None = None) -> VQAData:
    """Chapter 3's data: questions of every split, on ``device``, z-scored with the train split's statistics."""
    recipe_rank(recipe)  # a clear error for an unknown recipe
    device = runtime.device() if device is None else torch.device(device)
    val_scenes = book.scenes["val"][: VAL_IMAGES[recipe]]
    tok, answers = book.tokenizer, book.answers
    datasets = {
        "train": QuestionDataset(book.scenes["train"], book.features["train"], tok, answers),
        "val": QuestionDataset(val_scenes, book.features["val"], tok, answers),
        "test": QuestionDataset(book.scenes["test"], book.features["test"], tok, answers),
    }
    tensors = {split: TensorBatches(ds, device=device) for split, ds in datasets.items()}
    _, config = fusion_setups(recipe, len(tok), len(answers), book.region_dim)["cross_attention"]
    scale = location_scale(config)[2]
    statistics = tensors["train"].standardise(scale={"region_loc5": scale})
    for split in ("val", "test"):
        tensors[split].standardise(statistics)
    return VQAData(datasets, tensors, statistics, scale)


def answer_loss(
    model: nn.Module, batch: dict[str, Tensor], task: str, accuracy: bool = True
) -> dict[str, Tensor]:
    """The VQA training step as a classification: cross-entropy over the answer vocabulary (section 3.4).

    ``accuracy=False`` leaves out the logged batch accuracy, whose read-back
    each step chapter 7 keeps out of its timings.
    """
    logits = model(batch)  # (B, num_answers)
    out = {"loss": F.cross_entropy(logits, batch["answer"])}
    if accuracy:
        out["accuracy"] = (logits.argmax(dim=-1) == batch["answer"]).float().mean()
    return out


def fusion_spec(setup: str, book: BookWorld, recipe: str, seed: int = 0) -> dict[str, Any]:
    """Everything a trained chapter-3 model depends on: its fingerprint's input (:mod:`fusionlib.checkpoints`)."""
    if setup not in SETUP_LABELS:
        raise ValueError(f"setup must be one of {SETUP_NAMES}, got {setup!r}")
    kind, config = fusion_setups(recipe, len(book.tokenizer), len(book.answers), book.region_dim)[
        setup
    ]
    train_config = fusion_train_config(recipe, seed)
    return {
        "model": kind,
        "model_config": config.to_dict(),
        "data": book.data_spec(),
        "train": {k: train_config.to_dict()[k] for k in _RESULT_FIELDS + ("eval_every",)},
        "batch_size": BATCH_SIZE[recipe],
        "val_images": VAL_IMAGES[recipe],
        "step": "answer_loss",
        "standardise": "train z-score, region_loc5 x location_scale",
    }


def evaluate_fusion_model(
    model: nn.Module,
    data: VQAData,
    recipe: str,
    split: str = "test",
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Accuracy overall, relational, non-relational and per question family on ``split``."""
    loader = make_tensor_loader(data.tensors[split], EVAL_BATCH[recipe], shuffle=False)
    return evaluate_vqa(model, loader, device=device)


def train_vqa_model(
    kind: str,
    config: VQAConfig,
    train_config: TrainConfig,
    batch_size: int,
    data: VQAData,
    recipe: str,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], float]:
    """Train one VQA model on chapter 3's data with :func:`answer_loss`; ``(model, history dict, wall seconds)``.

    The loop behind :func:`train_fusion_model` (chapter 3) and chapter 7's
    size sweep (:mod:`fusionlib.experiments.light`): the model is built right
    after ``torch.manual_seed(seed)``, the batches are shuffled with ``seed``,
    and the validation split (:data:`VAL_IMAGES`) is scored every
    ``train_config.eval_every`` steps. With ``checkpoint_dir`` the run saves as
    it goes and resumes from there (``scripts/train_book.py``); the seconds
    are then summed over resumptions.
    """
    train_config = dataclasses.replace(train_config, checkpoint_dir=checkpoint_dir)
    device = runtime.device() if device is None else torch.device(device)
    if (
        device.type == "cuda"
    ):  # fp32 with TF32 matmuls: at this size bf16's cast kernels cost more than they save
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    model = build_model(kind, config)
    train_loader = make_tensor_loader(data.tensors["train"], batch_size, seed=seed)
    val_loader = make_tensor_loader(data.tensors["val"], EVAL_BATCH[recipe], shuffle=False)
    history = train(
        model,
        train_loader,
        train_config,
        answer_loss,
        eval_fn=lambda m: evaluate_vqa(m, val_loader, prefix="val_"),
        device=device,
        progress=progress,
        resume=checkpoint_dir is not None,
    )
    return model.eval(), history.to_dict(), history.seconds


def train_fusion_model(
    setup: str,
    book: BookWorld,
    data: VQAData,
    recipe: str,
    seed: int = 0,
    device: torch.device | str | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], float]:
    """Train one of chapter 3's models; ``(model, history dict, wall seconds)``.

    With ``checkpoint_dir`` the run saves as it goes and resumes from there
    (``scripts/train_book.py``); the seconds are then summed over resumptions.
    """
    kind, config = fusion_setups(recipe, len(book.tokenizer), len(book.answers), book.region_dim)[
        setup
    ]
    return train_vqa_model(
        kind,
        config,
        fusion_train_config(recipe, seed),
        BATCH_SIZE[recipe],
        data,
        recipe,
        seed=seed,
        device=device,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
