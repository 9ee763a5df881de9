"""Checkpoints: what a run writes, and how a model is rebuilt from one.

A checkpoint is a dict saved with torch.save: `model_name`, `config` (the dataclass as a dict),
`model` (the state dict), `frozen` (frozen encoders stored by reference to their weight file, see
`frozen_references`), `frozen_modules`, `init_seed`, the training run's `args` and `run` settings,
its position (`step`, `epoch`, `batch_in_epoch`, `samples_in_epoch`, `best`) and every rank's
random state (`rng`); `last.pt` adds `optimizer`, `scheduler` and `scaler`. Files are written
atomically (`save_checkpoint`). `export_checkpoint` writes a self-contained, weights-only copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings

import torch

from common.encoders import quiet_random_init
from common.encoders.loading import file_sha256
from common.model import config_from_dict, freeze
from common.runconfig import WEIGHT_FLAGS, load_model_module

# A frozen module is stored by reference to its weight file when it is (or is inside) the
# model's `image_encoder` / `text_encoder` attribute: the four models name their encoders so, and
# build them from cfg.image_weights / cfg.text_weights. Any other frozen module (MaIL's ViLT,
# an encoder frozen with random weights) is stored in full.
FROZEN_SOURCES = {"image_encoder": "image_weights", "text_encoder": "text_weights"}




def weights_sha256(path: str) -> str:
    """sha256 of a weight file, or of a weight folder (a Hugging Face folder: every file's
    relative path and bytes, in sorted order). Cached per (path, size, mtime)."""
    if os.path.isfile(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            digest.update(weights_sha256(full).encode())
    return digest.hexdigest()


def tensors_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters (names, dtypes, shapes, bytes): proves that a module
    rebuilt from its weight file holds exactly what the run trained with (a loader may fill
    what the file lacks, e.g. GloVe's unknown words, at random)."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, not a copy of them
    return digest.hexdigest()


def frozen_references(model: torch.nn.Module, cfg) -> dict[str, dict]:
    """{module name: {"field", "path", "sha256", "tensors"}} for each frozen encoder built from
    a weight file (see FROZEN_SOURCES); the outermost frozen module of an encoder stands for it."""
    refs: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not getattr(module, "frozen", False) or any(name.startswith(r + ".") for r in refs):
            continue
        field = FROZEN_SOURCES.get(name.split(".")[0])
        path = getattr(cfg, field, None) if field else None
        if not path or not os.path.exists(path):
            continue  # frozen with random weights: nothing to rebuild it from
        if any(p.requires_grad for p in module.parameters()):
            continue
        refs[name] = dict(field=field, path=os.path.abspath(path), sha256=weights_sha256(path),
                          tensors=tensors_sha256(module))
    return refs


def model_state(model: torch.nn.Module, refs: dict[str, dict]) -> dict:
    """The state dict without the parameters of referenced frozen modules (buffers all kept)."""
    skip = tuple(f"{name}." for name in refs)
    params = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in model.state_dict().items() if not (k in params and k.startswith(skip))}


def check_reference(name: str, ref: dict, path: str) -> None:
    flag = WEIGHT_FLAGS.get(ref["field"], ref["field"])
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"the checkpoint stores the frozen {name} by reference to {path!r} (the training "
            f"run's {flag}), and that file is missing: put it back, give its new location "
            f"(train.py or eval.py {flag} PATH; Predictor.from_checkpoint(..., weights=...)), "
            "or use a self-contained checkpoint (train.py --self-contained-checkpoints, or "
            "eval.py --export with the file in place)")
    if weights_sha256(path) != ref["sha256"]:
        raise ValueError(
            f"{path!r} ({flag}) is not the file the frozen {name} was trained with: sha256 "
            f"{weights_sha256(path)[:16]}..., the checkpoint expects {ref['sha256'][:16]}...")


def build_model_from_checkpoint(ckpt: dict, device="cpu", weights: dict | None = None):
    """Rebuild a model from a checkpoint's name and config.

    A self-contained checkpoint holds every weight: encoder files are neither needed nor read.
    One that stores frozen encoders by reference (ckpt["frozen"], see `frozen_references`) is
    rebuilt from those files, each checked against its sha256 first; `weights` ({"image_weights":
    path, ...}) says where a file now lives. Modules frozen in training are frozen again."""
    module = load_model_module(ckpt["model_name"])
    refs = ckpt.get("frozen", {})
    cfg = config_from_dict(next(iter(module.CONFIGS.values())), ckpt["config"])
    files = {field: None for field in WEIGHT_FLAGS}
    for name, ref in refs.items():
        path = (weights or {}).get(ref["field"]) or ref["path"]
        check_reference(name, ref, path)
        files[ref["field"]] = path
    cfg = dataclasses.replace(cfg, **files)
    # the same seed as the training run's build: parts a loader fills at random come out equal
    with (quiet_random_init(), warnings.catch_warnings(),
          torch.random.fork_rng(devices=[])):
        warnings.simplefilter("ignore")
        torch.manual_seed(ckpt.get("init_seed", 0))
        model = module.MODEL(cfg)
    for name in ckpt.get("frozen_modules", []):
        freeze(model.get_submodule(name))
    own = model.state_dict()
    by_ref = set(model_state(model, refs)) ^ set(own)  # parameters the files provide
    missing = [k for k in own if k not in ckpt["model"] and k not in by_ref]
    unexpected = [k for k in ckpt["model"] if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k, v in ckpt["model"].items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the checkpoint's weights do not fit {ckpt['model_name']} built from its "
                         f"config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {shapes[:5]}")
    model.load_state_dict(ckpt["model"], strict=not refs)
    for name, ref in refs.items():
        if tensors_sha256(model.get_submodule(name)) != ref["tensors"]:
            raise ValueError(f"the frozen {name} rebuilt from {files[ref['field']]!r} does not "
                             "hold the weights the run trained with (its loader or this library "
                             "changed); use a self-contained checkpoint")
    return model.to(device), module, cfg


def export_checkpoint(src_path: str, dst_path: str, weights: dict | None = None) -> None:
    """Write a self-contained, weights-only copy of a checkpoint (model_name, config, every
    weight, and the training run's args, which eval.py reads for its data defaults): no
    optimiser state, no weight files needed to load it (build_model_from_checkpoint)."""
    ckpt = load_checkpoint(src_path)
    model, _, cfg = build_model_from_checkpoint(ckpt, weights=weights)
    state = dict(model_name=ckpt["model_name"], config=dataclasses.asdict(cfg),
                 model=model.state_dict(), args=ckpt.get("args", {}),
                 frozen_modules=ckpt.get("frozen_modules", []))
    save_checkpoint(state, dst_path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's message advises weights_only=False: never relay that
        raise ValueError(f"cannot read checkpoint {path!r}: truncated, corrupt, or not a "
                         f"checkpoint ({type(err).__name__})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise ValueError(f"{path!r} is not a checkpoint written by train.py")
    if "payload_sha256" in ckpt and payload_sha256(ckpt) != ckpt["payload_sha256"]:
        raise ValueError(f"{path!r} is damaged: its tensors do not hash to the sha256 written "
                         "with them (a flipped bit on disk or in transfer); use another copy "
                         "or an earlier checkpoint")
    return ckpt


def payload_sha256(state: dict) -> str:
    """sha256 of every tensor of a checkpoint (model, optimiser, random states), with its place
    in the dict: a bit flipped in a weight would otherwise load as a silently wrong number."""
    digest = hashlib.sha256()

    def walk(obj, where: str) -> None:
        if torch.is_tensor(obj):
            t = obj.detach().cpu().contiguous()
            digest.update(f"{where}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                if k != "payload_sha256":
                    walk(obj[k], f"{where}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}/{i}")

    walk(state, "")
    return digest.hexdigest()


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.
    A run killed mid-write leaves the previous checkpoint intact; a failed write (a full disk)
    also removes its partial file. The tensors' sha256 goes with them (`payload_sha256`)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    state = dict(state, payload_sha256=payload_sha256(state))  # checked by load_checkpoint
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
