"""Tokenizers. Each is a callable `sentence -> (ids, truncated)`, with `pad_id` and `max_len`.

All work offline: open_clip ships its BPE vocabulary; WordPiece needs an explicit local
`vocab.txt` (a missing one is an error, never a tokenizer that maps every word to [UNK]).
"""

from __future__ import annotations

import os
import unicodedata


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
    """BERT-uncased WordPiece from a local `vocab.txt` (or a folder holding one), with [CLS]/[SEP]."""

    def __init__(self, vocab: str, max_len: int, lowercase: bool = True):
        from transformers import BertTokenizerFast

        path = os.path.join(vocab, "vocab.txt") if os.path.isdir(vocab) else vocab
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"WordPiece vocabulary not found at {path!r}: give a BERT vocab.txt, or the folder "
                "of a local Hugging Face BERT/ViLT checkpoint that contains one"
            )
        self._tok = BertTokenizerFast(vocab_file=path, do_lower_case=lowercase)
        if self._tok.vocab_size < 100:
            raise ValueError(f"{path!r} holds only {self._tok.vocab_size} tokens: not a BERT vocab")
        self.vocab_path = path
        self.max_len = max_len
        self.pad_id = self._tok.pad_token_id
        self.vocab_size = self._tok.vocab_size

    def __call__(self, sentence: str) -> tuple[list[int], bool]:
        ids = self._tok(clean_sentence(sentence), add_special_tokens=True)["input_ids"]
        truncated = len(ids) > self.max_len
        if truncated:
            ids = ids[: self.max_len - 1] + [self._tok.sep_token_id]
        return ids, truncated
