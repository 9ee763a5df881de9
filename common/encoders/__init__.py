"""Pretrained encoders, built offline, one file per family.

    loading.py  reading and checking weight files, random-weight notices (shared by all)
    sam.py      SAM image encoder (MARIS)
    clip.py     CLIP text and image towers (MMNet; MARIS's text)
    vilt.py     ViLT transformer (MaIL)
    darknet.py  Darknet-53 (M3Dec, CNN setting)
    glove.py    GloVe word embeddings + bi-directional GRU (M3Dec, CNN setting)
    swin.py     Swin-B (M3Dec, transformer setting)
    bert.py     BERT (M3Dec, transformer setting)

Every builder takes `weights`: a local file (or folder) to load, or None for random weights.
No code path downloads. Each image encoder declares the input statistics its weights expect as
`pixel_mean`, `pixel_std` (0-1 scale).
"""

from common.encoders.bert import BERT_ARCHS, BertTextEncoder, bert_and_tokenizer
from common.encoders.clip import CLIPImageEncoder, CLIPTextEncoder, clip_config, resize_pos_embed
from common.encoders.darknet import DARKNET_ARCHS, Darknet53
from common.encoders.glove import GRUTextEncoder, gru_and_tokenizer, load_glove
from common.encoders.loading import quiet_random_init, sine_init_, warn_random
from common.encoders.sam import SAM_ARCHS, SAMImageEncoder
from common.encoders.swin import SWIN_ARCHS, SwinImageEncoder
from common.encoders.vilt import VILT_ARCHS, ViLTEncoder

__all__ = [
    "BERT_ARCHS", "DARKNET_ARCHS", "SAM_ARCHS", "SWIN_ARCHS", "VILT_ARCHS",
    "BertTextEncoder", "CLIPImageEncoder", "CLIPTextEncoder", "Darknet53", "GRUTextEncoder",
    "SAMImageEncoder", "SwinImageEncoder", "ViLTEncoder",
    "bert_and_tokenizer", "clip_config", "gru_and_tokenizer", "load_glove", "quiet_random_init",
    "resize_pos_embed", "sine_init_", "warn_random",
]
