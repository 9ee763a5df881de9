"""Vocabularies: whole words built from training sentences (GRU text encoders), the synthetic
data's words, where a WordPiece vocab.txt is found, and the stand-in for a missing vocabulary.
The tokenizers' use inside each model is tested in that model's file."""

import pytest
from weights import write_vocab

import data
from common.shapes import COLOURS, EXTREMES, KINDS, RELATIONS, SIZES
from common.tokenizers import (
    SHAPES_VOCAB,
    MissingVocabulary,
    WordPieceTokenizer,
    WordTokenizer,
    build_word_vocab,
    find_wordpiece_vocab,
    split_words,
    word_tokenizer,
    wordpiece_tokenizer,
)


def test_word_tokenizer_and_vocabulary():
    vocab = build_word_vocab(["The red ball.", "a red cube", "the cube", "ball, ball"], min_count=2)
    assert vocab == ("<pad>", "<unk>", "ball", "cube", "red", "the")  # "a" is seen once
    tok = WordTokenizer(vocab, max_len=3)
    assert tok("A  RED ball!") == ([1, 4, 2], False)
    assert tok("the red cube ball") == ([5, 4, 3], True)
    assert tok.token_names[4] == "red"
    with pytest.raises(ValueError):
        WordTokenizer((), max_len=3)
    with pytest.raises(ValueError):
        WordTokenizer(("red", "<unk>"), max_len=3)  # "<pad>" must be id 0
    with pytest.raises(ValueError):
        tok("?!")
    assert split_words("the man's hat") == ["the", "man", "s", "hat"]


def test_shapes_vocabulary_covers_the_synthetic_sentences():
    words = {"the", "shape", *COLOURS, *KINDS, *SIZES}
    for _, _, phrases in EXTREMES:
        words.update(w for p in phrases for w in p.split())
    words.update(w for rel in RELATIONS for w in rel.split())
    assert set(SHAPES_VOCAB) == {"<pad>", "<unk>"} | words
    ds = data.ShapesDataset("train", 60, 64, 0)
    tok = WordTokenizer(SHAPES_VOCAB, 15)
    assert all(tok.unk_id not in tok(ds[i]["sentence"])[0] for i in range(len(ds)))


def test_wordpiece_vocabulary_is_found_in_order(tmp_path):
    """The given vocabulary first, then the weights folder's vocab.txt (an error when it has
    none: its word embeddings are indexed by it), else None."""
    weights = tmp_path / "vilt"
    weights.mkdir()
    write_vocab(str(weights), 120, ("red", "circle"))
    given = str(tmp_path / "my_vocab.txt")
    assert find_wordpiece_vocab(given, str(weights)) == given
    assert find_wordpiece_vocab(None, str(weights)) == str(weights / "vocab.txt")
    assert find_wordpiece_vocab(None, None) is None
    (weights / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        find_wordpiece_vocab(None, str(weights))


def test_a_missing_vocabulary_builds_but_cannot_tokenise(tmp_path):
    """word_tokenizer and wordpiece_tokenizer without a vocabulary give a stand-in that has a
    pad id (a model builds and loads weights) and says, when asked to read, how to get one."""
    for tok in (word_tokenizer((), 15, "build it with prepare_config"),
                wordpiece_tokenizer(None, 15, "build it with prepare_config")):
        assert isinstance(tok, MissingVocabulary)
        assert tok.pad_id == 0 and tok.max_len == 15 and tok.token_names is None
        with pytest.raises(FileNotFoundError, match="'the red circle'.*prepare_config"):
            tok("the red circle")
    assert isinstance(word_tokenizer(SHAPES_VOCAB, 15, "unused"), WordTokenizer)
    write_vocab(str(tmp_path), 120, ("red", "circle"))
    tok = wordpiece_tokenizer(str(tmp_path), 15, "unused")
    assert isinstance(tok, WordPieceTokenizer)
    ids, _ = tok("Red circle")
    assert [tok.token_names[i] for i in ids] == ["[CLS]", "red", "circle", "[SEP]"]
