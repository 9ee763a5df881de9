"""The rooms shared by the four models and by the scripts, each named by what it holds.

Model side (what mail.py, mmnet.py, m3dec.py and maris.py import): model.py (the contract every
model follows), layers.py, blocks.py, masks.py, losses.py, optim.py, tokenizers.py, encoders/
(SAM, CLIP, Swin, Darknet, BERT, GloVe, ViLT with their weight loaders).

Run side (what data.py, eval.py and train.py import): distributed.py (processes, devices,
precision), runconfig.py (model registry, config, batch plan), checkpoint.py, resume.py,
runfolder.py, cli.py (flag types, user errors),
samplers.py, cache.py (frozen encoders' features), logs.py, metrics.py, report.py and
visualise.py (eval's tables and pictures); the data sources images.py, refer.py, shapes.py,
candidates.py and proposals.py (MaIL's simulated detector).

Command-line tools (`python -m common.NAME`; nothing imports them): benchmark, ablations,
detector, cache_error. tests/test_imports.py checks that imports go this one way.

Importing `common` switches the Hugging Face libraries to offline mode: nothing in this library
ever downloads; weights and vocabularies come from explicit local paths.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
