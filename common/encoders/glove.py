"""Word embeddings (GloVe, Pennington et al. 2014) and a bi-directional GRU over them: the
language encoder of MCN, VLT and M3Dec's CNN setting.

Upstream: GloVe's pretrained word vectors; the GRU has no pretrained weights (it trains with the
model).

Used by: M3Dec's CNN setting: the per-word features F_t and the sentence feature F_t'.

Weights: a GloVe text file (glove.840B.300d.txt) for the rows of the vocabulary's words
(`load_glove`); words it lacks start random. `gru_and_tokenizer` pairs the GRU with the word
tokenizer whose words its embedding rows are.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from common.encoders.loading import warn_random
from common.tokenizers import MissingVocabulary, WordTokenizer, word_tokenizer


def load_glove(weight: Tensor, vocab, path: str) -> int:
    """Copy the GloVe vector of every vocabulary word found in a GloVe text file ("word v1 ...
    vD" per line) into its row of `weight` (V, D); returns how many were found."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GloVe file not found: {path!r}")
    index = {w: i for i, w in enumerate(vocab) if i > 0}  # row 0 is padding
    dim, found = weight.shape[1], 0
    with open(path, encoding="utf-8", errors="replace") as f, torch.no_grad():
        for line in f:
            word, *values = line.rstrip().rsplit(" ", dim)  # some GloVe words contain spaces
            if word in index:
                if len(values) != dim:
                    raise ValueError(f"{path!r}: {word!r} has {len(values)} values, but the "
                                     f"embeddings are {dim}-d")
                weight[index[word]] = torch.tensor([float(v) for v in values])
                found += 1
    if not found:
        raise ValueError(f"{path!r}: no word of the vocabulary found; not a GloVe text file?")
    print(f"loaded {path}: {found}/{len(index)} vocabulary words (the others start random)")
    return found


class GRUTextEncoder(nn.Module):
    """Word embeddings and a bi-directional GRU (the language encoder of MCN, VLT and M3Dec's
    CNN setting): per-word features and a sentence feature.

    Both directions are summed, as VLT does. Padding never reaches a real word: the backward GRU
    reads each sentence reversed within its own length, so padding only ever follows real words.

    Arguments:
      vocab: the word list of common.tokenizers.WordTokenizer ("<pad>" first).
      dim: hidden size of each direction (the model width C).
      word_dim: embedding size (300 for GloVe).
      weights: a GloVe text file (glove.840B.300d.txt); words it lacks, or all words when None,
        start random.
    Returns (forward): words (B, L, dim), zero on padding; sentence (B, dim), the final states of
      both directions summed; text_mask (B, L).
    """

    def __init__(self, vocab, dim: int, word_dim: int = 300, weights: str | None = None):
        super().__init__()
        self.embed = nn.Embedding(len(vocab), word_dim, padding_idx=0)
        self.fwd = nn.GRU(word_dim, dim, batch_first=True)
        self.bwd = nn.GRU(word_dim, dim, batch_first=True)
        self.dim = dim
        if weights is None:
            warn_random("word embeddings", "pass a GloVe text file such as glove.840B.300d.txt")
        else:
            load_glove(self.embed.weight, vocab, weights)

    def forward(self, ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L = ids.shape
        lengths = text_mask.long().sum(1, keepdim=True)  # (B, 1)
        pos = torch.arange(L, device=ids.device)[None]  # (1, L)
        rev = torch.where(pos < lengths, lengths - 1 - pos, pos)  # reverses the real words only
        x = self.embed(ids)  # (B, L, word_dim)
        fwd, _ = self.fwd(x)  # (B, L, dim)
        bwd, _ = self.bwd(x.gather(1, rev[..., None].expand_as(x)))
        bwd = bwd.gather(1, rev[..., None].expand_as(fwd))  # back to word order
        words = (fwd + bwd) * text_mask[..., None]
        last = (lengths - 1).clamp(min=0)[..., None].expand(B, 1, self.dim)
        # the forward GRU ends at the last real word, the backward one at the first word
        sentence = fwd.gather(1, last)[:, 0] + bwd[:, 0]
        return words, sentence, text_mask


def gru_and_tokenizer(vocab, max_len: int, dim: int, word_dim: int, weights: str | None,
                      hint: str) -> tuple[WordTokenizer | MissingVocabulary, GRUTextEncoder]:
    """(tokenizer, GRUTextEncoder) over the words `vocab`; without words, a MissingVocabulary
    saying `hint` and embedding rows for its <pad> and <unk> only (the model still builds)."""
    tokenizer = word_tokenizer(vocab, max_len, hint)
    return tokenizer, GRUTextEncoder(tokenizer.words, dim, word_dim, weights)
