"""Chapter 6's UNITER experiments, shared by chapter 6 and its ablation (chapter 6b).

* :func:`uniter_config` -- the book's small UNITER for a world's vocabulary and detector;
* :func:`finetune_vqa` -- low-label VQA fine-tuning with UNITER's optimiser settings;
* :func:`retrieval_recall` -- image-text recall with a model's pair scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusionlib.data.datasets import TensorBatches, make_tensor_loader
from fusionlib.metrics import image_text_recall
from fusionlib.models.uniter import UniterConfig
from fusionlib.models.vl_base import pair_scores, vqa_step
from fusionlib.train import History, TrainConfig, train

__all__ = ["uniter_config", "finetune_vqa", "retrieval_recall"]


def uniter_config(vocab_size: int, region_classes: int, **changes: Any) -> UniterConfig:
    """The book's small UNITER (hidden 128, 4 layers, 4 heads), initialised with std 0.05 (section 6.4).

    ITM swaps in a random other image, as UNITER does (chapter 4 compares
    false and minimal-edit negatives); the VQA head pools the mean.
    ``changes`` override any field.
    """
    fields = {
        "initializer_range": 0.05,
        "vqa_pooling": "mean",
        "itm_negatives": "random",
        **changes,
    }
    return UniterConfig.small(vocab_size, region_classes, **fields)


def finetune_vqa(
    model: nn.Module,
    data: TensorBatches,
    steps: int,
    *,
    lr: float,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    step_fn: Callable[..., Mapping[str, Tensor]] = vqa_step,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int | None = None,
    checkpoint_dir: str | None = None,
) -> tuple[dict[str, float] | None, History]:
    """Fine-tune ``model`` on ``data`` for ``steps`` steps (chapters 5, 6); ``(evaluate(model) or None, history)``.

    UNITER's settings: AdamW with betas (0.9, 0.98), 10% warm-up, gradient
    clipping at 5, fp32; full batches only. ``eval_fn`` runs every
    ``eval_every`` steps (validation curves); with ``checkpoint_dir`` the run
    saves as it goes and resumes from there.
    """
    config = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=steps // 10,
        betas=(0.9, 0.98),
        grad_clip=5.0,
        eval_every=eval_every,
        seed=seed,
        amp=False,
        checkpoint_dir=checkpoint_dir,
    )
    loader = make_tensor_loader(data, batch_size, seed=seed, drop_last=True)
    history = train(
        model,
        loader,
        config,
        step_fn,
        eval_fn=eval_fn,
        device=device,
        progress=progress,
        resume=checkpoint_dir is not None,
    )
    return (evaluate(model) if evaluate is not None else None), history


def retrieval_recall(
    model: nn.Module,
    images: Mapping[str, Tensor],
    texts: Mapping[str, Tensor],
    text_image: Tensor,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 both ways, every (image, text) pair scored by the model's ITM head (chapter 6).

    UNITER's score is the match logit, ViLBERT's the ITM log-odds
    (``retrieval_score`` of each model); ``text_image[t]`` is text t's image.
    """
    model = model.to(device) if device is not None else model
    scores = pair_scores(model.eval(), images, texts, batch_size=batch_size)  # (N_images, N_texts)
    return image_text_recall(scores, text_image)
