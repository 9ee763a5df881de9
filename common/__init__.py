"""Modules shared by two or more of the four models: encoders, tokenizers, losses, metrics,
small layers, optimiser schedules and the model contract (`common.model`).

Importing `common` switches the Hugging Face libraries to offline mode: nothing in this library
ever downloads; weights and vocabularies come from explicit local paths.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
