"""Data for the book (chapter 2): the synthetic Sort-of-CLEVR world and its tokenizer.

Kept light on purpose: ``import fusionlib.data`` pulls in numpy and PIL only.
The tokenizer functions import ``tokenizers``/``transformers`` when called, and
the torch/HF datasets (``fusionlib.data.datasets``), the truth judge of the
world's texts (``fusionlib.data.truth``) and real corpora
(``fusionlib.data.hub``) are imported from their own modules.
"""

from .shapes import (
    COLORS,
    KNOWN_SHAPES,
    NON_RELATIONAL_FAMILIES,
    PALETTE,
    QUESTION_FAMILIES,
    RELATIONAL_FAMILIES,
    SHAPES,
    SPLITS,
    Question,
    Scene,
    SceneObject,
    WorldConfig,
    answer,
    answer_vocab,
    class_index,
    class_names,
    describe,
    generate_scene,
    generate_split,
    iter_split,
    render,
    scene_key,
    scene_to_dict,
    split_of,
)
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer, world_texts, world_tokenizer

__all__ = [
    "COLORS",
    "KNOWN_SHAPES",
    "NON_RELATIONAL_FAMILIES",
    "PALETTE",
    "QUESTION_FAMILIES",
    "RELATIONAL_FAMILIES",
    "SHAPES",
    "SPLITS",
    "Question",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "answer",
    "answer_vocab",
    "class_index",
    "class_names",
    "describe",
    "generate_scene",
    "generate_split",
    "iter_split",
    "render",
    "scene_key",
    "scene_to_dict",
    "split_of",
    "SPECIAL_TOKENS",
    "load_tokenizer",
    "train_tokenizer",
    "world_texts",
    "world_tokenizer",
]
