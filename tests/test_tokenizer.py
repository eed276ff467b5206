"""Tests for the WordPiece tokenizer of the world (fusionlib.data.tokenizer, chapter 2)."""

from __future__ import annotations

import os

import pytest
import torch

from fusionlib.data import shapes as S
from fusionlib.data import tokenizer as T

WORLD = S.WorldConfig(num_train=50, num_val=10, num_test=10, seed=1)


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(T.world_texts(WORLD, "train"))


@pytest.fixture(scope="module")
def val_texts():
    return T.world_texts(WORLD, "val")


def test_special_tokens_have_fixed_ids(tok):
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        0,
        1,
        2,
        3,
        4,
    ]
    ids = (
        tok.pad_token_id,
        tok.unk_token_id,
        tok.cls_token_id,
        tok.sep_token_id,
        tok.mask_token_id,
    )
    assert ids == (0, 1, 2, 3, 4)
    assert 60 < len(tok) <= 512


def test_round_trip_on_unseen_captions_and_questions(tok, val_texts):
    assert len(val_texts) == 10 * (WORLD.num_captions + WORLD.num_questions)
    for text in val_texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids, text  # the world's words are all in the vocabulary
        assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.lower().split())


def test_normalizer_lowercases_and_splits_punctuation(tok):
    a = tok("What SHAPE is the Red object?")["input_ids"]
    b = tok("what shape is the red object ?")["input_ids"]
    assert a == b
    assert tok.convert_ids_to_tokens(a)[-2:] == ["?", "[SEP]"]


def test_unknown_characters_map_to_unk(tok):
    tokens = tok.convert_ids_to_tokens(tok("is the ζ object left of the red circle?")["input_ids"])
    assert tokens[3] == "[UNK]" and tokens.count("[UNK]") == 1
    assert "red" in tokens and "circle" in tokens
    # "zebra": no "z" anywhere in the world's text, so the whole word is unknown
    assert "z" not in "".join(T.world_texts(WORLD, "train"))
    assert tok.tokenize("zebra") == ["[UNK]"]


def test_unseen_word_of_seen_letters_is_split_into_pieces(tok):
    pieces = tok.tokenize("greenest")
    assert (
        pieces[0] == "green"
        and all(p.startswith("##") for p in pieces[1:])
        and "[UNK]" not in pieces
    )
    assert tok.convert_tokens_to_string(pieces) == "greenest"


def test_pairs_get_segments_and_padding_gets_a_mask(tok):
    batch = tok(
        ["what shape is the red object?", "is it left?"],
        ["there is a red circle", "a"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert ids.shape == mask.shape == types.shape and ids.dtype == torch.long
    lengths = mask.sum(1)
    for row in range(2):
        n = int(lengths[row])
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all()
        assert (ids[row, n:] == tok.pad_token_id).all()
        seps = (ids[row, :n] == tok.sep_token_id).nonzero().flatten().tolist()
        assert len(seps) == 2 and seps[1] == n - 1
        assert (types[row, : seps[0] + 1] == 0).all() and (types[row, seps[0] + 1 : n] == 1).all()
    assert int(lengths[0]) > int(lengths[1])


def test_save_and_load_give_identical_encodings(tok, val_texts, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path / "tok")
    loaded = [
        T.load_tokenizer(tmp_path / "tok"),
        PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"),
        AutoTokenizer.from_pretrained(tmp_path / "tok"),
    ]
    pairs = list(zip(val_texts[::2], val_texts[1::2]))
    want = tok(val_texts, padding=True)
    want_pairs = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True)
    for other in loaded:
        assert other.get_vocab() == tok.get_vocab()
        assert other(val_texts, padding=True) == want
        assert other([a for a, _ in pairs], [b for _, b in pairs], padding=True) == want_pairs
        assert other.mask_token_id == 4 and other.model_max_length == T.MODEL_MAX_LENGTH


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        T.load_tokenizer(tmp_path / "nothing-here")


def test_bad_training_input():
    with pytest.raises(TypeError, match="single string"):
        T.train_tokenizer("what shape is the red object?")
    with pytest.raises(ValueError, match="vocab_size"):
        T.train_tokenizer(["a b"], vocab_size=3)
    with pytest.raises(ValueError, match="min_frequency"):
        T.train_tokenizer(["a b"], min_frequency=0)
    with pytest.raises(ValueError, match="texts"):
        T.train_tokenizer(["", "  "])
    with pytest.raises(TypeError, match="strings"):
        T.train_tokenizer(["a", 3])


def test_world_tokenizer_is_cached_atomically_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    first = T.world_tokenizer(WORLD)
    path = tmp_path / f"tokenizer-{WORLD.key()}"
    assert (path / "tokenizer.json").is_file()
    assert sorted(os.listdir(tmp_path)) == [path.name], "no temporary folder left behind"

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(T, "train_tokenizer", no_training)
    text = "what shape is the object closest to the red object?"
    assert T.world_tokenizer(WORLD)(text) == first(text)
    monkeypatch.undo()
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))

    (path / "tokenizer.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = T.world_tokenizer(WORLD)
    assert rebuilt(text) == first(text)
    assert T.load_tokenizer(path)(text) == first(text)

    other = S.WorldConfig(num_train=20, num_val=0, num_test=0, seed=2)
    T.world_tokenizer(other)
    assert (tmp_path / f"tokenizer-{other.key()}").is_dir(), "another world gets its own cache"
    assert T.world_tokenizer(WORLD, cache=False)(text) == first(text)


def test_the_default_world_reads_the_committed_tokenizer(tmp_path, monkeypatch):
    """The book's checkpoints embed token ids of one vocabulary: a fresh cache must not retrain it."""
    import os

    from fusionlib import runtime
    from fusionlib.data.shapes import WorldConfig
    from fusionlib.data.tokenizer import load_tokenizer, world_tokenizer

    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    committed = os.path.join(runtime.checkpoint_root(), "world", f"tokenizer-{WorldConfig().key()}")
    tok = world_tokenizer(WorldConfig())
    assert tok.get_vocab() == load_tokenizer(committed).get_vocab()
    assert os.listdir(tmp_path) == []  # nothing trained, nothing cached
