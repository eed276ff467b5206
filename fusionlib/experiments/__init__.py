"""The book's experiments, defined once: data, model presets, training, evaluation and checkpoints.

Chapters, ``scripts/train_book.py`` and the golden tests all call these, so a
number in one chapter and the same number in another come from the same
code. Each function's docstring names the chapter that explains it.

- :mod:`fusionlib.experiments.world` -- the world, detector, features, tokenizer and answers as one bundle;
- :mod:`fusionlib.experiments.fusion` -- chapter 3's six VQA models;
- :mod:`fusionlib.experiments.light` -- chapter 7's size sweep of chapter 3's cross-attention model;
- :mod:`fusionlib.experiments.pretrain` -- chapters 5 and 6's pretraining of ViLBERT and UNITER, and its probes;
- :mod:`fusionlib.experiments.ablation` -- chapter 6b's ablation of UNITER's pretraining tasks, and its records;
- :mod:`fusionlib.experiments.book` -- every checkpoint the book uses, and :func:`obtain` (train or load).
"""

from fusionlib.experiments.book import (
    BOOK_EXPERIMENTS,
    BookExperiment,
    chapter_recipe,
    experiment,
    obtain,
)
from fusionlib.experiments.world import (
    BookWorld,
    book_world_configs,
    load_book_world,
    tokenizer_digest,
)

__all__ = [
    "BOOK_EXPERIMENTS",
    "BookExperiment",
    "BookWorld",
    "book_world_configs",
    "chapter_recipe",
    "experiment",
    "load_book_world",
    "obtain",
    "tokenizer_digest",
]
