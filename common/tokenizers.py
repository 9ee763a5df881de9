"""Tokenizers, and where a model's vocabulary comes from. Each tokenizer is a callable
`sentence -> (ids, truncated)`, with `pad_id` and `max_len`.

All work offline: open_clip ships its BPE vocabulary; WordPiece needs an explicit local
`vocab.txt` and whole words a vocabulary built from the training split (a missing one is an
error, never a tokenizer that maps every word to [UNK]).
"""

from __future__ import annotations

import os
import unicodedata
from functools import cached_property


def clean_sentence(sentence: str) -> str:
    """Normalise whitespace; an empty or whitespace-only sentence is an error."""
    if not isinstance(sentence, str):
        raise TypeError(f"a sentence must be a str, got {type(sentence).__name__}")
    text = " ".join(unicodedata.normalize("NFC", sentence).split())
    if not text:
        raise ValueError(f"empty sentence {sentence!r}: a referring expression needs words")
    return text


class ClipTokenizer:
    """CLIP's byte-pair encoding with start/end-of-text tokens (Radford et al. 2021).

    Sentences longer than `max_len` tokens (SOT and EOT included) are cut and keep their EOT,
    as open_clip does; `truncated` tells the caller so that it can count them.
    """

    pad_id = 0

    def __init__(self, max_len: int):
        from open_clip.tokenizer import SimpleTokenizer

        if max_len < 3:
            raise ValueError(f"max_len={max_len}: CLIP needs SOT, at least one token and EOT")
        self.max_len = max_len
        self._bpe = SimpleTokenizer(context_length=max_len)
        self.sot_id, self.eot_id = self._bpe.sot_token_id, self._bpe.eot_token_id
        self.vocab_size = self._bpe.vocab_size

    def __call__(self, sentence: str) -> tuple[list[int], bool]:
        ids = self._bpe.encode(clean_sentence(sentence))
        if not ids:  # e.g. only characters the BPE drops
            raise ValueError(f"sentence {sentence!r} has no tokens after CLIP's text cleaning")
        truncated = len(ids) > self.max_len - 2
        ids = [self.sot_id] + ids[: self.max_len - 2] + [self.eot_id]
        return ids, truncated


class WordPieceTokenizer:
    """BERT-uncased WordPiece from a local `vocab.txt` (or a folder holding one), with
    [CLS]/[SEP].
    """

    def __init__(self, vocab: str, max_len: int, lowercase: bool = True):
        from transformers import BertTokenizerFast

        path = os.path.join(vocab, "vocab.txt") if os.path.isdir(vocab) else vocab
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"WordPiece vocabulary not found at {path!r}: give a BERT vocab.txt, or the folder "
                "of a local Hugging Face BERT/ViLT checkpoint that contains one"
            )
        # transformers 5 reads `vocab` (and ignores vocab_file: 5 special tokens), 4.x vocab_file
        self._tok = BertTokenizerFast(vocab_file=path, vocab=path, do_lower_case=lowercase)
        if self._tok.vocab_size < 100:
            raise ValueError(f"{path!r} holds only {self._tok.vocab_size} tokens: not a BERT vocab")
        self.vocab_path = path
        self.max_len = max_len
        self.pad_id = self._tok.pad_token_id
        self.vocab_size = self._tok.vocab_size

    @cached_property
    def token_names(self) -> list[str]:
        """The token of each id: vocab.txt's lines (read when first asked for)."""
        with open(self.vocab_path, encoding="utf-8") as f:
            return f.read().splitlines()

    def __call__(self, sentence: str) -> tuple[list[int], bool]:
        ids = self._tok(clean_sentence(sentence), add_special_tokens=True)["input_ids"]
        truncated = len(ids) > self.max_len
        if truncated:
            ids = ids[: self.max_len - 1] + [self._tok.sep_token_id]
        return ids, truncated


# ---------------------------------------------------------------------------------------------
# Whole words in a vocabulary built from the training split (GRU text encoders: M3Dec)
# ---------------------------------------------------------------------------------------------

PAD_WORD, UNK_WORD = "<pad>", "<unk>"

# The words of the built-in synthetic shapes data (build_word_vocab over its training sentences),
# so that a tiny config builds without a training split; train.py rebuilds it anyway.
SHAPES_VOCAB = ("<pad>", "<unk>", "above", "at", "below", "big", "blue", "bottom", "circle",
                "diamond", "green", "left", "leftmost", "of", "on", "purple", "red", "right",
                "rightmost", "shape", "small", "square", "the", "top", "topmost", "triangle",
                "yellow")


def split_words(sentence: str) -> list[str]:
    """Lower-cased runs of letters and digits: "The man's hat!" -> [the, man, s, hat]."""
    text = clean_sentence(sentence).lower()
    return "".join(ch if ch.isalnum() else " " for ch in text).split()


def build_word_vocab(sentences, min_count: int = 1) -> tuple[str, ...]:
    """("<pad>", "<unk>", then every word seen at least `min_count` times, sorted).

    Rarer words are left out so that they map to "<unk>", which is then seen in training too.
    """
    counts: dict[str, int] = {}
    for sentence in sentences:
        for word in split_words(sentence):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_count)
    if not words:
        raise ValueError("no words to build a vocabulary from (no training sentences?)")
    return (PAD_WORD, UNK_WORD, *words)


class WordTokenizer:
    """Whole words looked up in a fixed vocabulary (MCN, VLT and M3Dec feed GloVe vectors of
    words to a GRU); words outside it map to "<unk>". No start or end tokens.

    The vocabulary comes from `build_word_vocab` on the training split and is saved with the
    model (M3Dec keeps it in its config), so that evaluation and prediction read sentences
    exactly as training did. A missing vocabulary is an error.
    """

    pad_id = 0

    def __init__(self, vocab, max_len: int):
        vocab = list(vocab or ())
        if not vocab:
            raise ValueError("no word vocabulary: build one from the training sentences with "
                             "common.tokenizers.build_word_vocab")
        if vocab[0] != PAD_WORD or UNK_WORD not in vocab or len(set(vocab)) != len(vocab):
            raise ValueError(f"a word vocabulary starts with {PAD_WORD!r}, holds {UNK_WORD!r} "
                             "and has no duplicates")
        self.words = self.token_names = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.unk_id = self.index[UNK_WORD]
        self.max_len = max_len
        self.vocab_size = len(vocab)

    def __call__(self, sentence: str) -> tuple[list[int], bool]:
        words = split_words(sentence)
        if not words:
            raise ValueError(f"sentence {sentence!r} has no words (letters or digits)")
        ids = [self.index.get(w, self.unk_id) for w in words]
        return ids[: self.max_len], len(ids) > self.max_len


# ---------------------------------------------------------------------------------------------
# Resolving a model's vocabulary: where it is, and what stands in when there is none
# ---------------------------------------------------------------------------------------------


def find_wordpiece_vocab(given: str | None, weights_folder: str | None = None) -> str | None:
    """Where a WordPiece vocabulary is: `given` (a vocab.txt or a folder holding one), else the
    vocab.txt of a pretrained model's `weights_folder`, whose word embeddings are indexed by it
    (a folder without one is an error), else None: the caller decides what no vocabulary means."""
    if given:
        return given
    if weights_folder:
        path = os.path.join(weights_folder, "vocab.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the weights folder {weights_folder!r} has no vocab.txt: its "
                                    "word embeddings need their vocabulary (--text-weights)")
        return path
    return None


class MissingVocabulary:
    """Stands in for a tokenizer whose vocabulary was not given: the model builds (shape checks,
    loading a checkpoint's weights), but tokenising a sentence is an error that says `hint`.
    `words` stands in for WordTokenizer's: a word embedding's <pad> and <unk> rows."""

    pad_id = 0
    token_names = None
    words = (PAD_WORD, UNK_WORD)

    def __init__(self, max_len: int, hint: str):
        self.max_len, self.hint = max_len, hint

    def __call__(self, sentence: str):
        raise FileNotFoundError(f"no vocabulary to tokenise {sentence!r}: {self.hint}")


def word_tokenizer(words, max_len: int, hint: str) -> WordTokenizer | MissingVocabulary:
    """WordTokenizer over `words`, or, when there are none, a MissingVocabulary saying `hint`."""
    return WordTokenizer(words, max_len) if words else MissingVocabulary(max_len, hint)


def wordpiece_tokenizer(vocab: str | None, max_len: int, hint: str
                        ) -> WordPieceTokenizer | MissingVocabulary:
    """WordPieceTokenizer from `vocab`, or, when it is None, a MissingVocabulary saying `hint`."""
    return WordPieceTokenizer(vocab, max_len) if vocab else MissingVocabulary(max_len, hint)
