"""Loading helpers shared by every encoder: read a weight file, load it or fail saying why, and
announce random weights.

A load prints one line (file, tensors loaded / expected, into what) and fails with a ValueError
naming every missing or unexpected tensor beyond a stated allowance: the parts of the file the
encoder does not build (`load_checked` for state dicts, `load_hf_folder` for Hugging Face
folders; Darknet's binary format has its own reader in `darknet.py`). Random weights are
announced once per encoder kind (`warn_random`), unless a checkpoint will replace them
(`quiet_random_init`); an encoder about to load a file skips its random draw (`skip_init`).
Learned position tables trained from scratch start as the 2-D sine encoding (`sine_init_`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
import zipfile

import torch
from torch import Tensor, nn

from common.layers import sine_pos_2d

_warned: set[str] = set()
_quiet = False


def warn_random(kind: str, hint: str) -> None:
    """Say once per process that an encoder has random weights."""
    if _quiet or kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(f"{kind}: no weights given, using random initialisation ({hint})", stacklevel=3)


@contextlib.contextmanager
def quiet_random_init():
    """Silence `warn_random`, e.g. when a checkpoint's state dict will replace the weights."""
    global _quiet
    old, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = old


@contextlib.contextmanager
def skip_init(skip: bool = True):
    """Build modules without drawing their initial weights (`skip` False: an ordinary build).

    For an encoder whose every tensor is loaded from a file right after it is built
    (`load_checked` refuses a file that lacks one), the random draw is wasted time: 300M numbers
    for CLIP ViT-L, 632M for SAM ViT-H, seconds on a CPU. Meanwhile torch.nn.init's in-place
    initialisers return their tensor untouched (transformers' `no_init_weights` does the same);
    tensors made any other way (buffers, masks, a `torch.randn` in a constructor) are unaffected.
    Parameters stay as allocated, arbitrary values: use it only where a complete load follows."""
    if not skip:
        yield
        return
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


@torch.no_grad()
def sine_init_(table: Tensor) -> Tensor:
    """Fill a learned position table of a square patch grid, (g*g, C) in row-major order (any
    view of one), with the fixed 2-D sine encoding, in place. Used when an encoder is trained
    from scratch: its position embedding then starts out spatially ordered, as MAE's fixed one
    is, instead of as noise to be sorted out first."""
    n, c = table.shape
    g = round(n**0.5)
    if g * g != n:
        raise ValueError(f"a position table of {n} rows is not a square grid")
    return table.copy_(sine_pos_2d(g, g, c))


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (how OpenAI publishes CLIP) is a zip holding constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())


# Published weight files whose sha256 their publisher states, by file name: (source, sha256 or
# its first hex digits). OpenAI's CLIP URLs hold the file's sha256 (openai/CLIP's clip.py and
# open_clip's pretrained.py check it on download); torchvision's file names end with the first
# 8 hex digits of theirs (torch.hub's check_hash). Files not listed (SAM, Darknet, GloVe, ViLT,
# BERT) have no published digest: the run records each file's sha256 in its checkpoint instead.
KNOWN_FILES = {
    "RN50.pt": ("https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123a"
                "ca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
                "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    "RN101.pt": ("https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e45"
                 "38c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
                 "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"),
    "ViT-B-16.pt": ("https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eab"
                    "d078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
                    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L-14.pt": ("https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf1"
                    "7d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
                    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "swin_b-68c6b09e.pth": ("https://download.pytorch.org/models/swin_b-68c6b09e.pth", "68c6b09e"),
    "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth": (
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "bf2d0c1e"),
    "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth": (
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
        "73cbd019"),
}
def file_sha256(path: str) -> str:
    """sha256 of a file, read once per process per (path, size, modification time): weight
    files are hashed where a loader checks them and where a checkpoint records them."""
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_known_file(path: str) -> None:
    """A file named as a published one (KNOWN_FILES) must be that file: a truncated download
    or another file under its name would load wrong weights, or fail far from the cause."""
    known = KNOWN_FILES.get(os.path.basename(path))
    if known is None:
        return
    source, expected = known
    digest = file_sha256(path)
    if not digest.startswith(expected):
        raise ValueError(f"{path!r} is named as the published {os.path.basename(path)} but its "
                         f"sha256 is {digest[:16]}..., not {expected[:16]}... ({source}): "
                         "a truncated or different file; download it again")


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read a weight file safely: a torch.save'd state dict (`weights_only=True`; also nested
    under "state_dict"/"model"/"module", names with DDP's "module."), a .safetensors file, or a
    TorchScript archive (OpenAI CLIP; only its state dict is used, its forward never runs).
    Returns the tensors by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path!r}")
    check_known_file(path)
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
                obj = torch.jit.load(path, map_location="cpu").state_dict()
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message advises weights_only=False: never relay it
        raise ValueError(f"cannot read weights from {path!r}: a truncated or corrupt file, or "
                         f"not a weight file ({type(err).__name__})") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def _names(names: list[str], most: int = 12) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"{names[:most]}{more}"


def load_checked(module: nn.Module, state: dict[str, Tensor], source: str, what: str,
                 prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Load `state[prefix + name]` into every tensor `name` of `module`, or fail naming why.

    The allowance: file tensors whose names start with one of `skip` (parts of the file the
    encoder does not build, e.g. SAM's mask decoder, CLIP's other tower) are not used, and
    BatchNorm's `num_batches_tracked` counters (which never change an output) are neither
    required nor counted. Any other missing or unused tensor is a ValueError that lists them;
    so is a shape mismatch. Prints one line: the file, tensors loaded / expected, into what.
    """
    counter = "num_batches_tracked"
    own = {k: v for k, v in module.state_dict().items() if not k.endswith(counter)}
    used = {k: v for k, v in state.items() if not k.startswith(skip) and not k.endswith(counter)}
    sub = {k[len(prefix):]: v for k, v in used.items() if k.startswith(prefix)}
    missing = [prefix + k for k in own if k not in sub]
    unexpected = [k for k in used if not k.startswith(prefix) or k[len(prefix):] not in own]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold the {what}: {len(missing)} tensors missing "
            f"{_names(missing)}, {len(unexpected)} unexpected {_names(unexpected)}"
            + (f" (besides those under {list(skip)}, which it does not use)" if skip else ""))
    bad = [(k, tuple(sub[k].shape), tuple(v.shape)) for k, v in own.items()
           if sub[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch (name, file, model): {bad[:4]}")
    counters = {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith(counter)}
    module.load_state_dict(sub | {k[len(prefix):]: v for k, v in counters.items()}, strict=False)
    unused = sum(k.startswith(skip) for k in state)
    note = f" ({unused} tensors of parts it does not build left out)" if unused else ""
    print(f"loaded {source}: {len(own)}/{len(own)} tensors into {what}{note}")


def load_hf_folder(model_cls, folder: str, what: str, **kwargs) -> nn.Module:
    """`model_cls.from_pretrained` on a local Hugging Face folder, with the same allowance and
    one line as `load_checked`: task heads (names outside the base model, e.g. BERT's "cls.",
    ViLT's "mlm_score.") and the pooler are not used; anything else missing or unused fails."""
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} weights must be a local Hugging Face folder "
                                f"(config.json + weights), not {folder!r}")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report and progress bars: we print one line
    hf_logging.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(folder, local_files_only=True,
                                                output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    base = {k.split(".")[0] for k in model.state_dict()} | {model.base_model_prefix}
    inside = lambda k: k.split(".")[0] in base and "pooler." not in k
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if inside(k))
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(
            f"{folder} does not hold the {what}: {len(missing)} tensors missing "
            f"{_names(missing)}, {len(unexpected)} unexpected {_names(unexpected)}, "
            f"shape mismatches {_names(sorted(info['mismatched_keys']))}")
    n = len(model.state_dict())
    print(f"loaded {folder}: {n}/{n} tensors into {what}")
    return model
