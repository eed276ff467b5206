"""A WordPiece tokenizer for the world's captions and questions (chapter 2; used from chapter 3 on).

BERT, ViLBERT and UNITER all read text through WordPiece: words are split
into pieces from a learned vocabulary ("farthest" -> "far", "##thest"), so a
small vocabulary covers every word and a word made of unseen characters
becomes ``[UNK]``. We train one with the ``tokenizers`` library, the same
pipeline as ``bert-base-uncased``:

- normalizer: ``BertNormalizer`` (lowercase, clean control characters);
- pre-tokenizer: ``BertPreTokenizer`` (split on whitespace and punctuation);
- model: ``WordPiece`` trained on the train split's captions and questions;
- post-processor: ``[CLS] A [SEP]`` for one text, ``[CLS] A [SEP] B [SEP]``
  for a pair (token type 0 for A, 1 for B);
- decoder: WordPiece (joins ``##`` pieces back into words).

It is returned as a ``transformers.PreTrainedTokenizerFast`` so the usual
``tokenizer(texts, padding=True, return_tensors="pt")`` call, ``decode``,
``save_pretrained`` and ``from_pretrained`` all work. Special tokens have
fixed ids: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``. The tokenizer's
``attention_mask`` is int (1 = real token); the models convert it to the
boolean "True = attend" convention at their edge.

``tokenizers`` and ``transformers`` are imported inside the functions, so
``import fusionlib.data`` stays fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Iterable

from .shapes import WorldConfig, iter_split

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # their ids are 0..4, in this order
MODEL_MAX_LENGTH = 128  # world texts are ~15 tokens; a caption + question pair ~30
WORLD_VOCAB_SIZE = 512  # the world uses ~60 words: the vocabulary never fills up


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1
) -> "PreTrainedTokenizerFast":
    """Train a BERT-style uncased WordPiece tokenizer on ``texts``.

    ``vocab_size`` is an upper bound (special tokens included); a small corpus
    yields fewer tokens. Pieces seen fewer than ``min_frequency`` times are
    not merged into the vocabulary.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if isinstance(texts, (str, bytes)):
        raise TypeError(
            "texts must be an iterable of strings, got a single string (wrap it in a list)"
        )
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or vocab_size <= len(SPECIAL_TOKENS)
    ):
        raise ValueError(
            f"vocab_size must be an int > {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must hold strings, found {type(bad).__name__}: {bad!r}")
    if not any(t.strip() for t in texts):
        raise ValueError(
            f"texts must contain some words to learn a vocabulary from, got {len(texts)} empty texts"
        )

    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(
        range(len(SPECIAL_TOKENS))
    ):  # the trainer puts special tokens first; check, never assume
        raise RuntimeError(
            f"special tokens {SPECIAL_TOKENS} got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}"
        )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return _wrap(tok)


def _wrap(tok: "Tokenizer") -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        # token_type_ids mark segment A (0) and B (1) of a pair, as in BERT.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def load_tokenizer(path: str | os.PathLike) -> "PreTrainedTokenizerFast":
    """Load a tokenizer saved with ``save_pretrained`` and check its special-token ids."""
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"no tokenizer saved at {path!r} (expected {path}/tokenizer.json from save_pretrained)"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(
            f"tokenizer at {path!r} has special-token ids {ids} for {SPECIAL_TOKENS}, expected 0..4"
        )
    return tok


def world_texts(config: WorldConfig, split: str = "train") -> list[str]:
    """Every caption and question of ``split``, in scene order (what the tokenizer is trained on)."""
    texts: list[str] = []
    for scene in iter_split(config, split):
        texts += scene.captions
        texts += [q.text for q in scene.questions]
    return texts


def world_tokenizer(
    config: WorldConfig | None = None, cache: bool = True
) -> "PreTrainedTokenizerFast":
    """The tokenizer of a world, trained on its train split, cached on disk.

    A tokenizer committed with the book's checkpoints
    (``checkpoints/world/tokenizer-<config.key()>``) is used as it is: the
    checkpoints' embedding rows belong to its ids. Otherwise the cache lives
    in ``fusionlib.runtime.cache_dir()/tokenizer-<config.key()>``
    (the key hashes every config field, so a changed world gets its own
    tokenizer). It is written to a temporary folder and renamed into place,
    so a crash never leaves half a tokenizer; a cache that fails to load is
    rebuilt with a warning.
    """
    from .. import runtime

    config = WorldConfig() if config is None else config
    if not isinstance(config, WorldConfig):
        raise TypeError(f"config must be a WorldConfig, got {type(config).__name__}")
    # The book's checkpoints read text through one exact vocabulary, committed with them: WordPiece
    # training breaks ties between equally frequent pieces differently from run to run.
    committed = os.path.join(runtime.checkpoint_root(), "world", f"tokenizer-{config.key()}")
    if os.path.isfile(os.path.join(committed, "tokenizer.json")):
        return load_tokenizer(committed)
    root = runtime.cache_dir()
    path = os.path.join(root, f"tokenizer-{config.key()}")
    if cache and os.path.isdir(path):
        try:
            return load_tokenizer(path)
        except Exception as err:  # a truncated or foreign file: rebuild rather than fail
            warnings.warn(
                f"tokenizer cache {path!r} could not be loaded ({err!r}); rebuilding it",
                stacklevel=2,
            )
            shutil.rmtree(path, ignore_errors=True)
    tok = train_tokenizer(world_texts(config, "train"), vocab_size=WORLD_VOCAB_SIZE)
    if cache:
        # Not fileio.replace_dir: ranks of a DDP run may build this cache at once and would share its
        # fixed "<target>.tmp"; a unique folder each, and the first rename wins.
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tokenizer-{config.key()}-", dir=root)
        try:
            tok.save_pretrained(tmp)
            os.rename(tmp, path)
        except OSError:
            # Another process renamed its copy first (same config, same result): keep theirs.
            if not os.path.isdir(path):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok
