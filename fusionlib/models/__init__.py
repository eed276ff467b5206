"""The models of the book, built from config dataclasses and saved as safetensors + JSON.

``build_model(name, config)`` makes a fresh model by its registered name
(``available_models()`` lists them); ``model.save_pretrained(directory)`` and
``load_pretrained(directory)`` round-trip any of them (:mod:`fusionlib.models.io`).

Chapter 3's fusion baselines live in :mod:`fusionlib.models.baselines`.
"""

from fusionlib.models.io import (
    ModelConfig,
    PretrainedModel,
    available_models,
    build_model,
    load_pretrained,
    register_model,
)
from fusionlib.models.baselines import (  # noqa: E402  (registers the chapter-3 models)
    CrossAttentionFusion,
    ImageOnly,
    LateFusion,
    QuestionOnly,
    RelationNetwork,
    VQAConfig,
)

__all__ = [
    "ModelConfig",
    "PretrainedModel",
    "available_models",
    "build_model",
    "load_pretrained",
    "register_model",
    "VQAConfig",
    "QuestionOnly",
    "ImageOnly",
    "LateFusion",
    "RelationNetwork",
    "CrossAttentionFusion",
]
from fusionlib.models.uniter import UniterConfig, UniterForPretraining, UniterForVQA, UniterModel  # noqa: E402
from fusionlib.models.vilbert import ViLBERT, ViLBERTConfig, ViLBERTForPretraining, ViLBERTForVQA  # noqa: E402

__all__ += [
    "ViLBERTConfig",
    "ViLBERT",
    "ViLBERTForPretraining",
    "ViLBERTForVQA",
    "UniterConfig",
    "UniterModel",
    "UniterForPretraining",
    "UniterForVQA",
]
