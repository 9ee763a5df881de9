"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding"), transformers' BertModel.

Upstream: a bidirectional transformer over WordPiece tokens, pretrained with masked language
modelling and next-sentence prediction.

Used by: M3Dec's transformer setting: the per-token features F_t and the [CLS] token's feature
as the sentence feature F_t'.

Weights: a local Hugging Face BERT folder (config.json, weights and vocab.txt, e.g. a download of
bert-base-uncased); its pretraining heads and pooler are not read. `bert_and_tokenizer` pairs
BERT with the WordPiece tokenizer its word embeddings are indexed by.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from common.encoders.loading import load_hf_folder, warn_random
from common.tokenizers import MissingVocabulary, WordPieceTokenizer, wordpiece_tokenizer

# bert-base(-uncased)'s architecture, and this library's CPU-sized variant
BERT_ARCHS = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072),
              "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128)}
BERT_VOCAB_SIZE = 30522  # bert-base-uncased's WordPiece vocabulary


class BertTextEncoder(nn.Module):
    """BERT from transformers: per-token features and the [CLS] feature.

    Arguments:
      arch: "bert-base" | "tiny"; a weights folder must hold that architecture.
      weights: a local Hugging Face BERT folder (config.json, weights, vocab.txt; e.g. a download
        of bert-base-uncased), read with local_files_only; None = random.
      vocab_size: rows of the word-embedding table (the tokenizer's vocabulary).
    Returns (forward): words (B, L, dim), sentence (B, dim) the [CLS] token's, text_mask (B, L).
    """

    def __init__(self, arch: str = "bert-base", weights: str | None = None,
                 vocab_size: int = BERT_VOCAB_SIZE):
        super().__init__()
        from transformers import BertConfig, BertModel

        if arch not in BERT_ARCHS:
            raise ValueError(f"unknown BERT arch {arch!r}; choose from {sorted(BERT_ARCHS)}")
        spec = BERT_ARCHS[arch]
        if weights is None:
            config = BertConfig(vocab_size=vocab_size, **spec)
            self.bert = BertModel(config, add_pooling_layer=False)
            warn_random(f"BERT {arch}", "pass a local Hugging Face BERT folder")
        else:
            if not os.path.isdir(weights):
                raise FileNotFoundError(f"BERT weights must be a local Hugging Face folder "
                                        f"(config.json + weights + vocab.txt), not {weights!r}")
            self.bert = load_hf_folder(BertModel, weights, f"BERT {arch}",
                                       add_pooling_layer=False)
            got = {k: getattr(self.bert.config, k) for k in spec} | dict(
                vocab_size=self.bert.config.vocab_size)
            if got != spec | dict(vocab_size=vocab_size):
                raise ValueError(f"{weights!r} holds a BERT with {got}, not the {arch!r} "
                                 f"architecture {spec} with the tokenizer's {vocab_size} words")
        self.dim = self.bert.config.hidden_size

    def forward(self, ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # a 4-D boolean mask (True: attend) is used as given; from a 2-D one transformers would
        # inspect the mask's values, which fails on the meta device
        mask = text_mask[:, None, None, :]  # (B, 1, 1, L)
        words = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return words, words[:, 0], text_mask


def bert_and_tokenizer(arch: str, weights: str | None, vocab: str | None, max_len: int, hint: str
                       ) -> tuple[WordPieceTokenizer | MissingVocabulary, BertTextEncoder]:
    """(tokenizer, BertTextEncoder): WordPiece over `vocab` (a vocab.txt or a folder holding one),
    else over the weights folder's; without either, a MissingVocabulary saying `hint` and
    bert-base-uncased's BERT_VOCAB_SIZE embedding rows (the model still builds)."""
    tokenizer = wordpiece_tokenizer(vocab or weights, max_len, hint)
    return tokenizer, BertTextEncoder(arch, weights, getattr(tokenizer, "vocab_size",
                                                             BERT_VOCAB_SIZE))
