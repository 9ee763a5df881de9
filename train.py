"""Train any of the four models with one plain loop.

Read `main` (at the end) first: it calls the steps of a `Run` in the order they happen (set-up,
settings, model, data, optimiser, then epochs of training and validation). The sections above it
hold the helpers those steps use, in the order the steps meet them.

  python train.py --model maris                                  # CPU, built-in shapes data
  torchrun --nproc_per_node=2 train.py --model maris             # DDP (gloo on CPU, nccl on GPU)
  torchrun --nproc_per_node=8 train.py --model maris --config paper --dataset refcoco \
      --data-root /data/refer --image-weights sam_vit_h_4b8939.pth --text-weights ViT-B-16.pt

Each epoch ends with a validation and with `last.pt` and `best.pt` written atomically in the run
folder; `--resume auto` continues from `last.pt` exactly where it stopped (also mid-epoch, from
`--ckpt-every` checkpoints). Nothing here is model-specific: models follow common.model.

Batch: the config's `batch_size` is the paper's global batch. A run's global batch is
world size x --batch-size (per process) x --accum-steps (micro-batches whose gradients are summed
before one optimiser step, each loss scaled by 1/N, DDP synchronising only the last one);
`--global-batch B` picks the split (see `plan_batches`). It is printed at start, with a warning
when it is not the paper's.

Resume is strict: a resumed run computes its settings from its own command line exactly as a
fresh run does, and every setting that differs from the checkpoint's (see `run_settings`) stops
it with the list of differences, unless `--resume-override FIELD[,FIELD]` names them. Applied
overrides: the optimiser keeps its moments, its hyper-parameters and the learning-rate schedule
become those a fresh run with the new settings would have (`configure_optimizers(new lr, new
total steps)`), continued at the checkpoint's step. Position in the epoch: the samples a step
uses depend only on the global batch (ranks split one shuffled order, see `TrainSampler`),
so with an equal global batch the run continues mid-epoch exactly whatever world size x batch x
accumulation make it; with another global batch the current epoch restarts from its beginning
(its first samples are seen twice).

Checkpoints hold the trained parameters and every buffer; a frozen encoder whose weights come
from a file is stored as that file's path and sha256 (`frozen_references`), unless
`--self-contained-checkpoints`. Only `last.pt` holds the optimiser state.

Logs: log.jsonl (loss terms, lr, grad_norm, samples_per_s, data_wait, memory_mb, fp16's
loss_scale, validation), TensorBoard under RUN/tb when `torch.utils.tensorboard` imports
(`--tensorboard` to insist, `--no-tensorboard` to skip); `plot_log(RUN, PNG)` draws the curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

import data
from common.encoders import quiet_random_init
from common.layers import sync_batchnorm
from common.metrics import IoUAccumulator, intersection_union
from common.model import config_from_dict, count_parameters, freeze

# ---------------------------------------------------------------------------------------------
# Command line: the flags, in the groups --help shows
# ---------------------------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shapes",
                   help="shapes (built in) | refcoco | refcoco+ | refcocog")
    g.add_argument("--split-by", default=None, help="unc | umd | google (default: unc, G-Ref umd)")
    g.add_argument("--data-root", default=None,
                   help="folder with refcoco/, refcoco+/, refcocog/, images/")
    g.add_argument("--image-dir", default=None,
                   help="COCO train2014 images (default DATA_ROOT/images/train2014)")
    g.add_argument("--shapes-train-size", type=int, default=4000, help="synthetic training samples")
    g.add_argument("--shapes-eval-size", type=int, default=500, help="synthetic val/test samples")
    g.add_argument("--shapes-image-size", type=int, default=128, help="synthetic image side")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes per rank")
    g.add_argument("--candidates", default=None, metavar="JSON",
                   help="MaIL: candidate masks from this proposals file (data.CANDIDATES_FORMAT); "
                        "default: the synthetic data's simulated detector; eval.py: default the "
                        "training run's")
    g.add_argument("--oracle-candidates", action="store_true",
                   help="MaIL: the annotated instances as candidates. They contain the answer: "
                        "an upper bound, labelled oracle")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="maris", choices=MODELS)
    p.add_argument("--config", default="tiny",
                   help="a key of the model's CONFIGS (tiny, paper, ...)")
    add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--image-weights", default=None, help="local image-encoder weights (see README)")
    g.add_argument("--text-weights", default=None, help="local text-encoder weights / vocabulary")
    g.add_argument("--freeze-encoders", action="store_true",
                   help="freeze encoders even without weights")
    g.add_argument("--random-init", action="store_true",
                   help="allow a paper config without the encoder files its paper starts from")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default: the config's")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    g.add_argument("--batch-size", type=int, default=None,
                   help="per process (default: the config's global batch / world / accum)")
    g.add_argument("--accum-steps", type=int, default=None,
                   help="micro-batches per optimiser step (gradient accumulation; default 1)")
    g.add_argument("--global-batch", type=int, default=None,
                   help="world x batch x accum, exactly (see plan_batches)")
    g.add_argument("--sentences-per-image", type=int, default=1, metavar="K",
                   help="form batches of K sentences of each image (default 1: any sentences, "
                        "the papers' sampling); a frozen image encoder then runs once per image "
                        "of a batch (see TrainSampler)")
    g.add_argument("--lr", type=float, default=None, help="default: the config's")
    g.add_argument("--clip-grad", type=float, default=None,
                   help="max gradient norm, 0: off (default: the config's clip_grad)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="mixed precision (default bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many consecutive non-finite losses")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/MODEL-CONFIG-DATASET)")
    g.add_argument("--resume", default=None,
                   help="auto (OUT/last.pt if present) or a checkpoint path")
    g.add_argument("--resume-override", default=None, metavar="FIELD[,FIELD]",
                   help="resume with these settings changed (see the module docstring)")
    g.add_argument("--ckpt-every", type=int, default=0,
                   help="also write last.pt every N optimiser steps")
    g.add_argument("--self-contained-checkpoints", action="store_true",
                   help="store frozen encoders' weights in checkpoints, not their file references")
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard logs in OUT/tb (default: on when it is installed)")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--no-val", action="store_true", help="skip per-epoch validation")
    g.add_argument("--no-augment", action="store_true",
                   help="no training augmentation (the config's hflip)")
    g.add_argument("--cache-features", default=None, metavar="DIR",
                   help="keep frozen encoders' features on disk and train from them (see README)")
    g.add_argument("--cache-storage", choices=("fp16", "bf16", "int8"), default="fp16",
                   help="how cached features are stored (int8: per-channel scales, half the "
                        "disk; see README)")
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    add_layout_arg(g)
    return p.parse_args(argv)


def add_layout_arg(g) -> None:
    """--channels-last, shared by train.py and eval.py (evaluation and the benchmark)."""
    g.add_argument("--channels-last", action="store_true",
                   help="keep 4-D weights, and so the convolutions' activations, channels-last "
                        "(NHWC): faster convolutions and upsampling on CPU (oneDNN) and CUDA; "
                        "the same model, other rounding (see README, Speed)")


def memory_format(channels_last: bool) -> torch.memory_format:
    """What `Module.to(memory_format=...)` takes for --channels-last (preserve: leave as built)."""
    return torch.channels_last if channels_last else torch.preserve_format

# ---------------------------------------------------------------------------------------------
# Processes and devices: one process per GPU (or per CPU share) under torchrun
# ---------------------------------------------------------------------------------------------

def flush_denormals() -> None:
    """Compute with denormal floats as zero in CPU operations (x86 FTZ/DAZ; GPU kernels are not
    affected; a no-op on CPUs without it). Softmax and GELU tails make them while training, and
    each operation on one is many times slower (README, "Speed"). Values below 1.2e-38 carry
    nothing a model could use."""
    torch.set_flush_denormal(True)


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of the process with this LOCAL_RANK: its own index where a node's processes see
    all its GPUs (torchrun), 0 where each sees one (e.g. SLURM --gpus-per-task=1)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but {visible} GPUs are visible: start at "
                           "most one process per GPU (torchrun --nproc_per_node)")
    return local_rank


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    flush_denormals()
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torchrun the agent's store outlives a restart (--max-restarts): the keys of
            # the dead attempt are still there, and a restarted rank may read a peer's old
            # address ("Connection refused", or a hang). Keys are scoped by attempt instead.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  world, is_master=False)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend,
                                    store=dist.PrefixStore(f"ris_attempt_{attempt}", store),
                                    rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    return rank, world, device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp none: fp32


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

# ---------------------------------------------------------------------------------------------
# The model and its config: a named config, weight files, --set overrides
# ---------------------------------------------------------------------------------------------

MODELS = ("mail", "mmnet", "m3dec", "maris")


def load_model_module(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return importlib.import_module(name)


def parse_value(text: str, default):
    """Parse a --set value with the type of the field's default."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(type(default[0])(v) if default else v for v in text.split(","))
    if isinstance(default, (int, float)):
        return type(default)(text)
    return text


def build_config(module, args):
    """The named config with the weight paths, --freeze-encoders and --set overrides applied."""
    if args.config not in module.CONFIGS:
        raise ValueError(f"{args.model} has configs {sorted(module.CONFIGS)}, not {args.config!r}")
    cfg = module.CONFIGS[args.config]
    changes = {}
    for field, value in (("image_weights", args.image_weights),
                         ("text_weights", args.text_weights)):
        if value is not None:
            changes[field] = value
    if args.freeze_encoders:
        changes["freeze_encoders"] = True
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"--set {key}: {type(cfg).__name__} has no field {key!r}; "
                             f"fields: {sorted(fields)}")
        changes[key] = parse_value(value, fields[key])
    return dataclasses.replace(cfg, **changes)


WEIGHT_FLAGS = {"image_weights": "--image-weights", "text_weights": "--text-weights"}


def check_paper_weights(module, args, cfg) -> None:
    """A paper config starts from the encoder files its paper starts from (the module's
    PAPER_WEIGHTS): without them "paper" would silently mean "from scratch". `--random-init`
    says so explicitly; configs not in PAPER_WEIGHTS (tiny) need no file."""
    needed = getattr(module, "PAPER_WEIGHTS", {}).get(args.config, {})
    missing = {field: what for field, what in needed.items() if getattr(cfg, field, None) is None}
    if missing and not args.random_init:
        lines = "\n".join(f"  {WEIGHT_FLAGS.get(f, f)} {what}" for f, what in missing.items())
        raise ValueError(f"{args.model} --config {args.config} starts from the paper's encoder "
                         f"weights, and these are missing:\n{lines}\nPass them (see the README's "
                         "weights table), or --random-init to train from random weights "
                         "(not the paper).")


def new_config(module, args, train_set) -> object:
    """The config of a new run; a model whose config depends on the training data (M3Dec's word
    vocabulary) fills it in through its module's `prepare_config(cfg, sentences)`."""
    cfg = build_config(module, args)
    if hasattr(module, "prepare_config"):
        cfg = module.prepare_config(cfg, data.sentences(train_set))
    return cfg

# ---------------------------------------------------------------------------------------------
# The batch split: world size x per-process batch x accumulation
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """per_process samples per forward pass, `accum` forward passes per optimiser step, on
    `world` processes."""

    per_process: int
    accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.per_process * self.accum * self.world


def plan_batches(paper_batch: int, world: int, batch_size: int | None = None,
                 accum_steps: int | None = None, global_batch: int | None = None) -> BatchPlan:
    """The batch split of a run.

    Without --global-batch: --batch-size per process (default: the paper's global batch divided
    by world x accumulation, at least 1) and --accum-steps (default 1).
    With --global-batch B: exact or refused. Given --batch-size b (and no --accum-steps), the
    accumulation is B / (world x b); otherwise the batch is B / (world x accum), accum =
    --accum-steps or 1; given both, world x b x accum must be B.
    """
    for flag, value in (("--batch-size", batch_size), ("--accum-steps", accum_steps),
                        ("--global-batch", global_batch)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if global_batch is None:
        accum = accum_steps or 1
        return BatchPlan(batch_size or max(1, paper_batch // (world * accum)), accum, world)
    if batch_size is not None and accum_steps is None:
        accum, rest = divmod(global_batch, world * batch_size)
        per = batch_size
    else:
        accum = accum_steps or 1
        per, rest = divmod(global_batch, world * accum)
        if batch_size is not None and batch_size != per:
            rest = 1
    if rest or not accum or not per:
        raise ValueError(
            f"--global-batch {global_batch} is not {world} process(es) x --batch-size "
            f"{batch_size or '?'} x --accum-steps {accum_steps or '?'}: choose a per-process "
            f"batch and an accumulation whose product with the world size ({world}) is "
            f"{global_batch}")
    return BatchPlan(per, accum, world)


def paper_batch_note(cfg, plan: BatchPlan) -> str | None:
    """A warning when the run's global batch is not the config's (the paper's)."""
    if plan.global_batch == cfg.batch_size:
        return None
    return (f"the global batch is {plan.global_batch} ({plan.world} process(es) x batch "
            f"{plan.per_process} x {plan.accum} accumulation step(s)), not the config's "
            f"{cfg.batch_size}; --global-batch {cfg.batch_size} asks for it exactly")

# ---------------------------------------------------------------------------------------------
# Resume: the same run, or explicit overrides
# ---------------------------------------------------------------------------------------------

def find_resume(args) -> tuple[dict | None, str | None]:
    """The checkpoint to resume from: --resume PATH, or --resume auto's OUT/last.pt if any."""
    path = None
    if args.resume == "auto":
        candidate = os.path.join(args.out, "last.pt")
        path = candidate if os.path.isfile(candidate) else None
    elif args.resume:
        path = args.resume
    if args.resume_override and path is None:
        raise ValueError("--resume-override applies to a resumed run: add --resume")
    ckpt = load_checkpoint(path) if path else None
    if ckpt is not None and "optimizer" not in ckpt:
        raise ValueError(f"{path} holds no optimiser state (best.pt and exported files do not): "
                         "resume from a last.pt")
    if ckpt is not None and ckpt["model_name"] != args.model:
        raise ValueError(f"{path} holds a {ckpt['model_name']} model, not {args.model}")
    return ckpt, path


def check_run_folder(out: str, resuming: bool) -> None:
    """A fresh run must not overwrite another run's checkpoints nor append to its log."""
    found = [f for f in ("last.pt", "log.jsonl") if os.path.exists(os.path.join(out, f))]
    if found and not resuming:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): continue it with "
                              "--resume auto, or choose a new --out")


def run_settings(args, cfg, plan: BatchPlan, candidates: str | None) -> dict:
    """The settings that define a run's arithmetic, as this command line resolves them; a
    checkpoint records them and a resumed run must match them (see `check_resume`)."""
    return dict(config=args.config, lr=args.lr or cfg.lr, epochs=args.epochs or cfg.epochs,
                max_steps=args.max_steps, batch_size=plan.per_process, accum_steps=plan.accum,
                world_size=plan.world, sentences_per_image=args.sentences_per_image,
                clip_grad=args.clip_grad if args.clip_grad is not None else cfg.clip_grad,
                augment=cfg.hflip and not args.no_augment, amp=args.amp, seed=args.seed,
                dataset=args.dataset, split_by=args.split_by,
                shapes_train_size=args.shapes_train_size,
                shapes_image_size=args.shapes_image_size, data_seed=args.data_seed,
                candidates=data.candidate_label(candidates) if candidates else None,
                feature_cache=args.cache_storage if args.cache_features else None)


def config_differences(ckpt: dict, module, args) -> dict:
    """Config fields this command line sets (--set, --freeze-encoders, weights aside) to values
    other than the checkpoint's, as {"config.FIELD": (checkpoint, asked)}."""
    declared = (dataclasses.asdict(module.CONFIGS[args.config])
                if args.config in module.CONFIGS else {})
    asked = {k: v for k, v in dataclasses.asdict(build_config(module, args)).items()
             if v != declared.get(k) and k not in WEIGHT_FLAGS}
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # tuples may come back as lists
    return {f"config.{k}": (ckpt["config"].get(k), v) for k, v in asked.items()
            if as_list(ckpt["config"].get(k)) != as_list(v)}


def check_resume(ckpt: dict, run: dict, config_diff: dict, overrides: set[str],
                 path: str) -> set[str]:
    """The differences this run overrides, or a ValueError listing those it does not.
    Settings a checkpoint does not record (older checkpoints) are not compared."""
    saved = ckpt.get("run", {})
    differ = {k: (saved[k], v) for k, v in run.items() if k in saved and saved[k] != v}
    differ |= config_diff
    known = set(run) | {f"config.{k}" for k in ckpt["config"]}
    unknown = sorted(overrides - known)
    if unknown:
        raise ValueError(f"--resume-override {','.join(unknown)}: not a run setting; "
                         f"settings: {sorted(known)}")
    refused = {k: v for k, v in differ.items() if k not in overrides}
    if refused:
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in
                          refused.items())
        raise ValueError(f"{path} was trained with other settings:\n{lines}\nResume with the "
                         "same flags, or apply the new values explicitly with --resume-override "
                         f"{','.join(refused)}")
    return set(differ)


def resume_position(ckpt: dict, plan: BatchPlan) -> tuple[int, bool]:
    """(micro-batches of this epoch already done per rank, whether the epoch restarts).
    A step's samples depend only on the global batch (module docstring): with an equal global
    batch the run continues exactly; with another one the epoch restarts from its beginning."""
    saved = ckpt.get("run", {})
    old = saved.get("batch_size", plan.per_process) * saved.get("accum_steps", plan.accum) * \
        saved.get("world_size", plan.world)
    if old != plan.global_batch:
        return 0, ckpt["batch_in_epoch"] > 0
    done = ckpt.get("samples_in_epoch", ckpt["batch_in_epoch"] * plan.per_process * plan.world)
    return done // (plan.per_process * plan.world), False


def fast_forward_schedule(optimizer, scheduler, fresh_groups: list[dict], step: int) -> None:
    """After loading an optimiser's state under overridden settings: its hyper-parameters become
    the new run's (`fresh_groups`), and the new schedule is advanced to `step`."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore")
        for _ in range(step):
            scheduler.step()

# ---------------------------------------------------------------------------------------------
# Checkpoints: trained weights, frozen encoders by reference
# ---------------------------------------------------------------------------------------------

# A frozen module is stored by reference to its weight file when it is (or is inside) the
# model's `image_encoder` / `text_encoder` attribute: the four models name their encoders so, and
# build them from cfg.image_weights / cfg.text_weights. Any other frozen module (MaIL's ViLT,
# an encoder frozen with random weights) is stored in full.
FROZEN_SOURCES = {"image_encoder": "image_weights", "text_encoder": "text_weights"}
HASH_CHUNK = 1 << 24  # bytes read at a time while hashing a weight file


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: str) -> str:
    """sha256 of a weight file, or of a weight folder (a Hugging Face folder: every file's
    relative path and bytes, in sorted order). Cached per (path, size, mtime)."""
    if os.path.isfile(path):
        st = os.stat(path)
        return _sha256(os.path.abspath(path), st.st_size, st.st_mtime)
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
            f"run's {flag}), and that file is missing: put it back, pass its new location, or "
            "use a self-contained checkpoint (train.py --self-contained-checkpoints, or "
            "train.export_checkpoint on a machine that has the file)")
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


def export_checkpoint(src_path: str, dst_path: str) -> None:
    """Write a self-contained, weights-only copy of a checkpoint (model_name, config, every
    weight, and the training run's args, which eval.py reads for its data defaults): no
    optimiser state, no weight files needed to load it (build_model_from_checkpoint)."""
    ckpt = load_checkpoint(src_path)
    model, _, cfg = build_model_from_checkpoint(ckpt)
    state = dict(model_name=ckpt["model_name"], config=dataclasses.asdict(cfg),
                 model=model.state_dict(), args=ckpt.get("args", {}),
                 frozen_modules=ckpt.get("frozen_modules", []))
    save_checkpoint(state, dst_path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path!r} (truncated or not a checkpoint): "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise ValueError(f"{path!r} is not a checkpoint written by train.py")
    return ckpt


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.
    A run killed mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

# ---------------------------------------------------------------------------------------------
# Random state: per rank, saved by every rank
# ---------------------------------------------------------------------------------------------

def seed_rank(seed: int, rank: int) -> None:
    """Dropout and other in-model randomness must differ between ranks (identical masks on every
    rank would be one mask for the global batch). Rank 0 keeps the stream that built the model,
    so a one-process run is unchanged; rank r > 0 restarts from seed + r. Augmentation needs
    nothing: it is drawn per (seed, epoch, sample index) and ranks take different samples; the
    sampler's shuffle keeps the shared seed so that ranks split one order."""
    if rank > 0:
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)


def rng_state() -> dict:
    """This process's random state; CUDA: only its own device's generator."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def gather_rng(world: int) -> list[dict]:
    """Every rank's random state, in rank order (a collective: every rank calls it)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # older checkpoints: one state per device of the writing machine
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def restore_rng(saved, rank: int, world: int, seed: int, step: int) -> None:
    """Rank r takes rank r's saved state. With another world size no state belongs to it: it
    is seeded from (seed, rank, step), so that ranks still differ and the run is repeatable."""
    if isinstance(saved, dict):  # older checkpoints: rank 0's state, for every rank
        set_rng_state(saved)
    elif len(saved) == world:
        set_rng_state(saved[rank])
    else:
        fresh = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
        torch.manual_seed(fresh)
        random.seed(fresh)

# ---------------------------------------------------------------------------------------------
# Data: datasets, a sampler that shards and resumes an epoch, loaders
# ---------------------------------------------------------------------------------------------

def candidate_source(args, input_names: tuple[str, ...]) -> str | None:
    """Where a model whose forward takes `input_names` gets candidate masks: MaIL's from
    data.candidate_source; None for a model (or an ablation row: MaIL without the mask
    modality) that takes none: then no instance mask is decoded, no proposals file asked for."""
    if "cand_masks" not in input_names:
        if getattr(args, "candidates", None) or getattr(args, "oracle_candidates", False):
            warnings.warn(f"{args.model} with this config takes no candidate masks: "
                          "--candidates / --oracle-candidates are ignored", stacklevel=2)
        return None
    return data.candidate_source(args.dataset, getattr(args, "candidates", None),
                                 getattr(args, "oracle_candidates", False))


def dataset_kwargs(args, split: str, candidates: str | None, cfg) -> dict:
    """data.build_dataset's arguments for a split; K is bounded by the model's config."""
    size = args.shapes_train_size if split == "train" else args.shapes_eval_size
    return dict(data_root=args.data_root, split_by=args.split_by, image_dir=args.image_dir,
                shapes_size=size, shapes_image_size=args.shapes_image_size, seed=args.data_seed,
                candidates=candidates, max_candidates=getattr(cfg, "max_candidates", None),
                min_score=getattr(cfg, "min_score", 0.0))


class TrainSampler(Sampler):
    """Shuffles with (seed, epoch), splits the order across ranks (dropping the remainder so
    that ranks take equal steps) and can start part-way into an epoch (resume).

    Default (k = 1): one random permutation; rank r takes every world-th index of it.
    Grouped (k > 1, `image_keys` gives each sample's image): each image's sentences, shuffled,
    are cut into units of up to k; the units are shuffled and laid end to end, and rank r takes
    every world-th chunk of `batch` consecutive indices, so a micro-batch keeps its units
    together (b/k images of k sentences each where the data allows). A frozen image encoder
    then runs once per distinct image (`frozen_features`).

    Either way a global micro-batch (world x batch samples) is one contiguous window of the
    epoch's order, which depends on (seed, epoch, k) alone: a resumed run with the same global
    batch continues exactly, whatever world size x batch x accumulation make it.

    Yields (epoch, index) keys for `EpochKeyed`: the epoch travels with each index, so that
    persistent loader workers, which never see `set_epoch` on their copy of the dataset, still
    augment each epoch differently."""

    def __init__(self, n: int, rank: int, world: int, seed: int,
                 image_keys: list[str] | None = None, k: int = 1, batch: int = 1):
        if k < 1:
            raise ValueError(f"--sentences-per-image must be >= 1, got {k}")
        if k > 1 and image_keys is None:
            raise ValueError("--sentences-per-image needs each sample's image (image_key)")
        self.n, self.rank, self.world, self.seed, self.k = n, rank, world, seed, k
        self.chunk = batch if k > 1 else 1  # consecutive indices a rank takes at a time
        self.epoch, self.start = 0, 0
        self.by_image: list[list[int]] = []  # sample indices of each image, in dataset order
        if k > 1:
            first: dict[str, int] = {}
            for i, key in enumerate(image_keys):
                if key not in first:
                    first[key] = len(self.by_image)
                    self.by_image.append([])
                self.by_image[first[key]].append(i)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The epoch's order of every sample index."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.k == 1:
            return torch.randperm(self.n, generator=g).tolist()
        units = []
        for idx in self.by_image:
            shuffled = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            units += [shuffled[s : s + self.k] for s in range(0, len(shuffled), self.k)]
        return [i for u in torch.randperm(len(units), generator=g).tolist() for i in units[u]]

    def __iter__(self):
        order, c, w = self.order(), self.chunk, self.world
        mine = [order[j] for j in range(len(self) * w) if (j // c) % w == self.rank]
        return iter([(self.epoch, i) for i in mine[self.start :]])

    def __len__(self) -> int:
        return self.n // (self.world * self.chunk) * self.chunk


class EpochKeyed(Dataset):
    """A data.PreparedDataset indexed by TrainSampler's (epoch, index) keys."""

    def __init__(self, dataset: data.PreparedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        epoch, i = key
        self.dataset.set_epoch(epoch)
        return self.dataset[i]


def loader_options(workers: int, cuda: bool) -> dict:
    """Worker settings: on CUDA with workers, pinned host memory (asynchronous copies) and
    workers kept across epochs (no re-fork and re-import each epoch)."""
    return dict(num_workers=workers, pin_memory=cuda and workers > 0,
                persistent_workers=cuda and workers > 0)


def make_train_loader(train_set: data.PreparedDataset, sampler: TrainSampler, batch_size: int,
                      pad_id: int, workers: int, cuda: bool, seed: int) -> DataLoader:
    return DataLoader(EpochKeyed(train_set), batch_size=batch_size, sampler=sampler,
                      drop_last=True, collate_fn=functools.partial(data.collate, pad_id=pad_id),
                      generator=torch.Generator().manual_seed(seed),
                      **loader_options(workers, cuda))


def make_eval_loader(args, split: str, model, rank: int, world: int, batch_size: int,
                     images: bool = True):
    """A loader over one evaluation split, sharded across ranks without repeats (images=False:
    samples without their images, for a model whose image features all come from the cache).
    Its collate function is a functools.partial, which pickles: workers can start under
    spawn/forkserver."""
    source = candidate_source(args, model.input_names)
    base = data.build_dataset(args.dataset, split, images=images,
                              **dataset_kwargs(args, split, source, getattr(model, "cfg", None)))
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names, keep_original=True)
    ds = data.PreparedDataset(base, prep, seed=args.seed)
    cuda = next(model.parameters()).device.type == "cuda"
    return DataLoader(ds, batch_size=batch_size, sampler=data.ShardSampler(len(ds), rank, world),
                      collate_fn=functools.partial(data.collate, pad_id=model.tokenizer.pad_id),
                      **loader_options(args.workers, cuda))

# ---------------------------------------------------------------------------------------------
# One optimiser step from N micro-batches
# ---------------------------------------------------------------------------------------------

def frozen_features(raw, batch: dict, cache=None) -> dict:
    """Features of frozen encoders that the forward should not compute itself: from the feature
    cache (common.cache); else, when samples of the batch share an image (equal `image_key`, see
    TrainSampler's k), a frozen image encoder's, computed once per distinct image."""
    if cache is not None:
        return cache.features(raw, batch)
    keys = batch.get("image_key")
    if (batch.get("image") is None or not keys or len(set(keys)) == len(keys)
            or "image" not in getattr(raw, "frozen_parts", set)()):
        return {}
    return {"image_feats": raw.encode_distinct_images(batch["image"], keys)}


def forward_loss(model, raw, batch: dict, device, amp: str, cache=None) -> tuple[dict, dict]:
    """Move a batch to the device (data.to_device: every tensor, uint8 images normalised there)
    and run the model with its target: (batch on the device, outputs with "loss")."""
    batch = data.to_device(batch, device, raw.input_spec)
    with autocast(device, amp):
        feats = frozen_features(raw, batch, cache)
        out = model(**raw.inputs_from(batch), **feats, target=batch["mask"])
    return batch, out


def backward(loss: torch.Tensor, scaler, accum: int) -> None:
    """Accumulate d(loss / N)/dθ: N micro-batch gradients sum to the mean over their samples,
    as one batch N times larger would give (batch-mean losses, equal micro-batches)."""
    scaler.scale(loss / accum).backward()


def sync_context(ddp, sync: bool):
    """DDP all-reduces gradients in every backward unless told not to: only the last
    micro-batch of an optimiser step synchronises (`no_sync` before), the result is the same
    sum, communicated once."""
    return nullcontext() if ddp is None or sync else ddp.no_sync()


def optimizer_step(raw, optimizer, scheduler, scaler, clip: float) -> torch.Tensor:
    """Unscale (fp16), clip to `clip` (0: no clipping), step; returns the gradient norm before
    clipping (a tensor on the device: reading it synchronises, so only log steps do)."""
    scaler.unscale_(optimizer)
    params = [p for p in raw.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return norm


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (every rank must skip the same step, or DDP
    would hang)."""
    finite = torch.isfinite(loss.detach()).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() == 1

# ---------------------------------------------------------------------------------------------
# Validation: metrics at each image's original resolution, summed over ranks
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, device, amp: str = "none", on_batch=None, cache=None,
             progress: bool = True) -> dict:
    """Metrics of common.metrics over a loader, at each image's original resolution, summed
    across ranks. Where samples carry a sentence type (the synthetic data: data.SENTENCE_TYPES),
    "by_type" adds the same metrics for each type. `on_batch(batch, out, ious)` sees every batch
    (visualisations); `cache`, a common.cache.FeatureCache, supplies frozen encoders' features.

    The model runs under `amp`; the logits are cast to fp32 before resizing and thresholding, so
    the reported numbers do not depend on the autocast dtype's rounding near 0. Every tensor of
    the batch, the ground truth included, is on `device` (data.to_device). A progress bar shows
    on rank 0 when stderr is a terminal and `progress` is set."""
    from tqdm import tqdm

    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    acc = IoUAccumulator()
    by_type = {t: IoUAccumulator() for t in data.SENTENCE_TYPES}
    bar = tqdm(loader, desc="val", leave=False, file=sys.stderr,
               disable=not (progress and is_rank0() and sys.stderr.isatty()))
    for batch in bar:
        batch = data.to_device(batch, device, raw.input_spec)
        with autocast(device, amp):
            feats = frozen_features(raw, batch, cache)
            out = raw(**raw.inputs_from(batch), **feats)
        logits = out["mask_logits"].float()  # (B, 1, H, W), fp32 whatever the autocast dtype
        ious = []
        for i in range(len(batch["gt"])):
            pred = data.to_original(logits[i], batch["valid_hw"][i], batch["orig_hw"][i]) > 0
            inter, union = intersection_union(pred[None], batch["gt"][i][None])
            ious.append(acc.add(inter[0], union[0]))
            group = by_type.get(batch["sentence_type"][i])  # None: no type (RefCOCO)
            if group is not None:
                group.add(inter[0], union[0])
        if on_batch is not None:
            on_batch(batch, out, ious)
    raw.train(was_training)
    metrics = acc.all_reduce().compute()
    by_type = {t: a.all_reduce().compute() for t, a in by_type.items()}  # same calls on every rank
    if any(m["n"] for m in by_type.values()):
        metrics["by_type"] = {t: m for t, m in by_type.items() if m["n"]}
    return metrics

# ---------------------------------------------------------------------------------------------
# Logs: log.jsonl, TensorBoard, the remaining time, plots
# ---------------------------------------------------------------------------------------------

def memory_mb(device: torch.device) -> float | None:
    """Peak memory: CUDA's max allocated on a GPU, the process's peak RSS on CPU (None where
    the platform has no `resource` module)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Throughput:
    """Samples per second and the share of wall time spent waiting for the loader, over the
    steps since the last `read`."""

    def __init__(self):
        self.start, self.wait, self.samples = time.perf_counter(), 0.0, 0

    def read(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = dict(samples_per_s=round(self.samples / elapsed, 2),
                   data_wait=round(self.wait / elapsed, 4))
        self.start, self.wait, self.samples = time.perf_counter(), 0.0, 0
        return out


def open_tensorboard(flag: bool | None, out: str):
    """A SummaryWriter in OUT/tb, or None: on when `torch.utils.tensorboard` imports (it needs
    the optional `tensorboard` package), forced by --tensorboard, off with --no-tensorboard."""
    if flag is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        if flag:
            raise ImportError("--tensorboard needs the tensorboard package "
                              "(pip install tensorboard)") from err
        return None
    return SummaryWriter(os.path.join(out, "tb"))


def tensorboard_scalars(writer, record: dict, step: int) -> None:
    """Every number of a log record: train/... for step records, val/... for validations."""
    if writer is None:
        return
    if "val" in record:
        for k, v in record["val"].items():
            if k == "by_type":
                for stype, m in v.items():
                    writer.add_scalar(f"val/{stype}/mIoU", m["mIoU"], step)
            elif k != "n":
                writer.add_scalar(f"val/{k}", v, step)
    else:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch") and v is not None:
                writer.add_scalar(f"train/{k}", v, step)
    writer.flush()


def duration(seconds: float) -> str:
    """A duration as a person reads it: 42s, 3m05s, 1h02m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def time_left(elapsed: float, done: int, remaining: int) -> str:
    """"elapsed 3m05s, ETA 12m40s": the remaining steps at the mean time per step this process
    has taken so far, validations included (so later epochs' validations are counted too)."""
    eta = duration(elapsed / done * remaining) if done else "?"
    return f"elapsed {duration(elapsed)}, ETA {eta}"


def plot_log(run_dir: str, png_path: str) -> None:
    """Draw the training loss and the validation mIoU of RUN/log.jsonl against the step."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plot_log needs matplotlib (pip install matplotlib)") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training log at {path!r}")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val"]["mIoU"]) for r in records if "val" in r]
    if not train and not val:
        raise ValueError(f"{path!r} holds no loss or validation record")
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train))
    ax_loss.set(xlabel="step", ylabel="training loss", title=os.path.basename(run_dir.rstrip("/")))
    if val:
        ax_val.plot(*zip(*val), marker="o")
    ax_val.set(xlabel="step", ylabel="val mIoU")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The run: main, then its steps in the order they happen
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Train as the command line asks; returns the last validation's metrics ({} without)."""
    run = Run(parse_args(argv))  # processes, device, run folder
    run.resolve_settings()  # what this command line asks for; a resume must be the same run
    run.build_model()  # seeded, or rebuilt from the checkpoint
    run.build_data()  # loaders that prepare samples as this model expects
    run.build_optimiser()  # the paper's optimiser and schedule; restored when resuming
    run.announce()
    while run.step < run.total_steps and run.epoch < run.epochs:
        run.stop_reading_cached_images()  # once the feature cache holds every image
        run.train_epoch()
        run.validate_and_checkpoint()
    return run.finish()


class Run:
    """One training run's state, shared by the steps `main` calls in order. Between steps
    `step` (optimiser steps done), `epoch` and `start_batch` (the micro-batch of `epoch` to
    train next) say where the run stands; a checkpoint records them."""

    def __init__(self, args):
        """Set-up: this process's rank and device, the defaults that depend on them, the run
        folder."""
        self.args = args
        self.rank, self.world, self.device = setup_distributed()
        self.is_main = self.rank == 0  # rank 0 alone prints, logs and writes checkpoints
        # Loader workers help only when there are spare cores: on a small CPU machine every
        # core already runs a rank's matmuls, and a worker would take its time.
        if args.workers is None:
            cores = os.cpu_count() or 1
            args.workers = 0 if self.device.type == "cpu" and cores <= 2 * self.world else 2
        # bf16 autocast is fast on GPUs, hundreds of times slower than fp32 on CPUs without bf16
        args.amp = args.amp or ("bf16" if self.device.type == "cuda" else "none")
        args.out = args.out or os.path.join("runs", f"{args.model}-{args.config}-{args.dataset}")
        os.makedirs(args.out, exist_ok=True)
        if self.is_main:  # a run killed while writing a checkpoint leaves its temporary file
            for name in os.listdir(args.out):
                if ".pt.tmp." in name:
                    os.remove(os.path.join(args.out, name))

    def resolve_settings(self) -> None:
        """What this command line asks for (config, batch split, run settings), checked
        against the checkpoint when resuming; then the training samples."""
        args = self.args
        self.module = load_model_module(args.model)
        self.ckpt, resume_path = find_resume(args)
        check_run_folder(args.out, resuming=self.ckpt is not None or args.resume == "auto")
        asked = build_config(self.module, args)
        if self.ckpt is None:  # a resumed run already started from (or without) them
            check_paper_weights(self.module, args, asked)
        self.plan = plan_batches(asked.batch_size, self.world, args.batch_size,
                                 args.accum_steps, args.global_batch)
        self.candidates = candidate_source(args, self.module.MODEL.input_names_for(asked))
        # A resumed run computes its settings exactly as a fresh one does, then compares: a
        # silently changed lr or batch would make the two halves of a run different runs.
        self.settings = run_settings(args, asked, self.plan, self.candidates)
        self.epochs = self.settings["epochs"]
        self.overrides: set[str] = set()
        if self.ckpt is not None:
            wanted = {f.strip() for f in (args.resume_override or "").split(",") if f.strip()}
            self.overrides = check_resume(self.ckpt, self.settings,
                                          config_differences(self.ckpt, self.module, args),
                                          wanted, resume_path)
            new_fields = {k.removeprefix("config."): getattr(asked, k.removeprefix("config."))
                          for k in self.overrides if k.startswith("config.")}
            self.ckpt = dict(self.ckpt, config=self.ckpt["config"] | new_fields)
        limits_cfg = (config_from_dict(next(iter(self.module.CONFIGS.values())),
                                       self.ckpt["config"])
                      if self.ckpt is not None else asked)  # bounds K (MaIL's max_candidates)

        # The samples come before the model: M3Dec's word vocabulary is built from them.
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.base = data.build_dataset(args.dataset, "train",
                                       **dataset_kwargs(args, "train", self.candidates,
                                                        limits_cfg))

    def build_model(self) -> None:
        """The model, built right after seeding, so that it is the same on every rank and
        build_model_from_checkpoint can rebuild it from the checkpoint's "init_seed"."""
        args = self.args
        if self.ckpt is not None:  # --image-weights / --text-weights: where files now live
            moved = {f: getattr(args, f) for f in WEIGHT_FLAGS if getattr(args, f, None)}
            model, self.module, cfg = build_model_from_checkpoint(self.ckpt, weights=moved)
        else:
            cfg = new_config(self.module, args, self.base)
            torch.manual_seed(args.seed)
            model = self.module.MODEL(cfg)
            cfg = model.cfg  # as the model completed it
        self.cfg = cfg
        seed_rank(args.seed, self.rank)  # dropout differs between ranks from here on
        # `raw` is the model itself; `model` becomes its DDP / torch.compile wrapper, which
        # runs the forward, while checkpoints and evaluation read the raw model.
        # channels-last weights make each convolution return channels-last activations, so the
        # layout carries through the conv stacks (and their upsampling) without touching inputs
        self.model = self.raw = model.to(self.device,
                                         memory_format=memory_format(args.channels_last))
        self.frozen_modules = [n for n, m in model.named_modules() if getattr(m, "frozen", False)]
        # frozen encoders built from a weight file are stored as the file's path and hash
        self.refs = {} if args.self_contained_checkpoints else frozen_references(model, cfg)

    def build_data(self) -> None:
        """Loaders that prepare samples as the model expects (its input_spec and tokenizer),
        the number of steps, and the feature cache."""
        args, raw, plan = self.args, self.raw, self.plan
        self.augment = self.settings["augment"]
        self.prep = data.Preprocess(raw.input_spec, raw.tokenizer, augment=self.augment,
                                    candidates="cand_masks" in raw.input_names)
        # One shuffled order per epoch, split across ranks: a step's samples depend only on
        # the global batch, which is what lets a resumed run continue mid-epoch exactly.
        k = args.sentences_per_image
        keys = [self.base.image_key(i) for i in range(len(self.base))] if k > 1 else None
        self.sampler = TrainSampler(len(self.base), self.rank, self.world, args.seed,
                                    image_keys=keys, k=k, batch=plan.per_process)
        self.load_training_set(self.base)
        self.steps_per_epoch = len(self.sampler) // plan.per_process // plan.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training samples give no full step of "
                             f"{plan.accum} x {plan.per_process} samples on each of "
                             f"{self.world} processes")
        self.micro_per_epoch = self.steps_per_epoch * plan.accum  # a last partial step is dropped
        self.total_steps = self.epochs * self.steps_per_epoch
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.val_loader = None
        if not args.no_val:
            self.val_loader = make_eval_loader(args, "val", raw, self.rank, self.world,
                                               args.eval_batch_size or plan.per_process)
        self.cache = None
        if args.cache_features:  # frozen encoders run once per image, not once per epoch
            if self.augment:
                raise ValueError("--cache-features: training augmentation (random flips) "
                                 "changes the images every epoch, so cached features would be "
                                 "stale; add --no-augment")
            from common.cache import FeatureCache

            self.cache = FeatureCache(args.cache_features, raw, args.cache_storage)
            if self.is_main:
                print(f"feature cache for the frozen {' and '.join(self.cache.parts)} "
                      f"encoder(s): {', '.join(self.cache.dirs.values())}", flush=True)

    def load_training_set(self, base) -> None:
        """The training set over a raw dataset (prepared as the model expects) and its loader,
        which draws from `self.sampler`."""
        args = self.args
        self.train_set = data.PreparedDataset(base, self.prep, seed=args.seed, skip_bad=True)
        self.loader = make_train_loader(self.train_set, self.sampler, self.plan.per_process,
                                        self.raw.tokenizer.pad_id, args.workers,
                                        self.device.type == "cuda", args.seed)

    def stop_reading_cached_images(self) -> None:
        """With the feature cache, once it holds the frozen image encoder's features of every
        image of the training (or validation) split, that split's loader reads no more images:
        decoding and resizing a photo costs more than reading its cached features, and the
        features were what the model used anyway. Called before each epoch; every rank decides
        together (a rank without images cannot compute a missing entry)."""
        if self.cache is None or "image" not in self.cache.parts:
            return
        args, raw = self.args, self.raw
        splits = [("train", self.train_set.base)]
        if self.val_loader is not None:
            splits.append(("val", self.val_loader.dataset.base))
        for split, base in splits:
            if not getattr(base, "with_images", True):
                continue  # already reading without images
            held = self.cache.holds("image", {base.image_key(i) for i in range(len(base))})
            if self.world > 1:
                flag = torch.tensor(int(held), device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                held = bool(flag.item())
            if not held:
                continue
            if split == "train":
                base = data.build_dataset(args.dataset, "train", images=False,
                                          **dataset_kwargs(args, "train", self.candidates,
                                                           self.cfg))
                self.load_training_set(base)
            else:
                self.val_loader = make_eval_loader(args, "val", raw, self.rank, self.world,
                                                   self.val_loader.batch_size, images=False)
            if self.is_main:
                print(f"the feature cache holds every {split} image: reading the {split} split "
                      "without its images from now on", flush=True)

    def build_optimiser(self) -> None:
        """The paper's optimiser and schedule, as the model declares them; when resuming,
        their state and the position in the epoch; then the DDP and compile wrappers."""
        args, ckpt = self.args, self.ckpt
        self.optimizer, self.scheduler = self.raw.configure_optimizers(self.settings["lr"],
                                                                       self.total_steps)
        # the hyper-parameters a fresh run with these settings has: an override resumes with them
        fresh_groups = [{k: v for k, v in g.items() if k != "params"}
                        for g in self.optimizer.param_groups]
        # fp16 needs loss scaling (its small gradients underflow); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.step, self.epoch, self.start_batch, self.best = 0, 0, 0, -1.0  # any mIoU beats -1
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])  # Adam's moments carry on
            if ckpt["scaler"]:  # a bf16 or fp32 run saved none: an fp16 resume starts one
                self.scaler.load_state_dict(ckpt["scaler"])
            self.step, self.epoch, self.best = ckpt["step"], ckpt["epoch"], ckpt["best"]
            if self.overrides:  # new lr or length: the schedule a fresh run would have
                fast_forward_schedule(self.optimizer, self.scheduler, fresh_groups, self.step)
            else:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self.start_batch, restarted = resume_position(ckpt, self.plan)
            if restarted and self.is_main:
                warnings.warn(f"the global batch changed: epoch {self.epoch} restarts from its "
                              "beginning", stacklevel=1)
            # dropout continues as if the run had never stopped (same world size)
            restore_rng(ckpt["rng"], self.rank, self.world, args.seed, self.step)
        # One process per device: DDP averages the gradients of all ranks during backward, so
        # every rank takes the same optimiser step on the global batch.
        self.ddp = None
        if self.world > 1:
            if self.device.type == "cuda":  # BN statistics over the global batch (MaIL Sec. 4.1)
                self.raw = sync_batchnorm(self.raw)
            self.model = self.ddp = DistributedDataParallel(
                self.raw, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:  # outermost, so that it compiles what the loop calls
            self.model = torch.compile(self.model)

    def announce(self) -> None:
        """The logs open; rank 0 says what it trains and on what (one line), warns when the
        global batch is not the paper's, and writes args.json."""
        args = self.args
        self.log_path = os.path.join(args.out, "log.jsonl")
        self.writer = open_tensorboard(args.tensorboard, args.out) if self.is_main else None
        if self.is_main:
            self.print_header()
        self.metrics: dict = {}  # the last validation's
        self.bad_steps, self.truncated, self.skipped = 0, 0, 0  # skipped steps, data counts
        self.t0, self.first_step = time.time(), self.step  # for the remaining time
        self.meter = Throughput()

    def print_header(self) -> None:
        """Rank 0's account of the run, before its first step."""
        args, plan, cfg, settings = self.args, self.plan, self.cfg, self.settings
        total, trainable = count_parameters(self.raw)
        label = settings["candidates"]
        print(f"{args.model}/{args.config}: {total / 1e6:.2f}M parameters "
              f"({trainable / 1e6:.2f}M trained); "
              f"{args.dataset}: {len(self.train_set)} train samples"
              + (f", candidates: {label}" + (" (upper bound)" if label == "oracle" else "")
                 if label else "")
              + f"; global batch {plan.global_batch} = {self.world} process(es) x batch "
              f"{plan.per_process} x {plan.accum} accumulation (config: {cfg.batch_size}); "
              f"{self.total_steps} steps; amp={args.amp}; clip_grad={settings['clip_grad']}; "
              f"augment={self.augment}; device={self.device}"
              + (f"; {args.sentences_per_image} sentences per image"
                 if args.sentences_per_image > 1 else "")
              + (f"; resumed at step {self.step}" if self.ckpt else ""), flush=True)
        note = paper_batch_note(cfg, plan)
        if note:  # a smaller batch changes the optimisation, not only the speed
            warnings.warn(note, stacklevel=1)
        if getattr(self.base, "skipped_refs", 0):
            print(f"{self.base.skipped_refs} refs without sentences skipped", flush=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": self.world, "global_batch": plan.global_batch,
                                    "accum_steps": plan.accum, "candidates": label,
                                    "candidates_file": args.candidates}, f, indent=1)

    def train_epoch(self) -> None:
        """Optimiser steps from the current position until the epoch or the run ends. A step
        sums the gradients of `plan.accum` micro-batches (see `backward`)."""
        from tqdm import tqdm

        plan, raw = self.plan, self.raw
        # the epoch's shuffle; a resumed epoch starts after the samples it already trained on
        self.sampler.set_epoch(self.epoch, self.start_batch * plan.per_process)
        self.bar = tqdm(total=self.steps_per_epoch, initial=self.start_batch // plan.accum,
                        desc=f"epoch {self.epoch}", leave=False, file=sys.stderr,
                        disable=not self.is_main or not sys.stderr.isatty())
        self.model.train()
        self.next_batch = self.start_batch  # index in the epoch of the next micro-batch
        batches = iter(self.loader)
        micro, good, parts = 0, True, {}  # micro-batches of this step, all finite, loss sums
        while self.next_batch < self.micro_per_epoch:
            waited = time.perf_counter()
            batch = next(batches, None)
            self.meter.wait += time.perf_counter() - waited  # the loader kept us waiting
            if batch is None:
                break
            self.next_batch += 1
            micro += 1
            self.truncated += batch["truncated"]
            self.skipped += batch["skipped"]
            if micro == 1:  # a new step: gradients start from nothing, then sum over micro
                self.optimizer.zero_grad(set_to_none=True)
            # DDP all-reduces the gradients in the last micro-batch's backward only
            with sync_context(self.ddp, micro == plan.accum):
                batch, out = forward_loss(self.model, raw, batch, self.device, self.args.amp,
                                          self.cache)
                finite = all_finite(out["loss"], self.world)  # every rank agrees, or DDP hangs
                if finite:
                    backward(out["loss"], self.scaler, plan.accum)
            good = good and finite
            for k, v in out.items():  # the step's loss terms, as means over its samples
                if k.startswith("loss"):
                    parts[k] = parts.get(k, 0.0) + v.detach().float() / plan.accum
            self.meter.samples += plan.per_process * self.world
            if micro < plan.accum:  # more micro-batches to sum before this step
                continue
            micro = 0
            if self.finish_step(good, parts) and self.step >= self.total_steps:
                break
            good, parts = True, {}
        self.bar.close()

    def finish_step(self, good: bool, parts: dict) -> bool:
        """After a step's last micro-batch: skip the step when a loss was not finite (stop after
        --max-bad-steps in a row), else step the optimiser, log, and checkpoint every
        --ckpt-every steps. Returns whether the optimiser stepped."""
        args = self.args
        if not good:
            self.bad_steps += 1
            warnings.warn(f"non-finite loss at step {self.step}: step skipped "
                          f"({self.bad_steps}/{args.max_bad_steps} in a row)", stacklevel=1)
            if self.bad_steps >= args.max_bad_steps:
                raise FloatingPointError(
                    f"{self.bad_steps} consecutive non-finite losses at step {self.step}: "
                    f"stopping. The last good checkpoint is "
                    f"{os.path.join(args.out, 'last.pt')}; try a lower --lr or --amp none.")
            return False
        self.bad_steps = 0
        # unscale (fp16), clip the global gradient norm, step, and advance the schedule
        grad_norm = optimizer_step(self.raw, self.optimizer, self.scheduler, self.scaler,
                                   self.settings["clip_grad"])
        self.step += 1
        self.bar.update(1)
        # reading a loss or the gradient norm waits for the device: only logged steps do
        if self.is_main and (self.step % args.log_every == 0 or self.step == 1):
            rec = dict(step=self.step, epoch=self.epoch, lr=self.scheduler.get_last_lr()[0],
                       time=round(time.time() - self.t0, 1),
                       truncated_sentences=self.truncated, skipped_images=self.skipped,
                       **{k: round(v.item(), 5) for k, v in parts.items()},
                       grad_norm=round(grad_norm.item(), 5), **self.meter.read(),
                       memory_mb=memory_mb(self.device))
            if self.scaler.is_enabled():  # fp16: a step with inf gradients was skipped and
                rec["loss_scale"] = self.scaler.get_scale()  # halved the scale
            self.log(rec)
            self.bar.set_postfix_str(f"loss={rec['loss']:.4f}, {self.time_left()}")
            if not sys.stderr.isatty():  # no progress bar: the record is the progress
                print(json.dumps(rec), flush=True)
        # mid-epoch checkpoints let a killed run resume close to where it died (the run's
        # last step is followed by the end-of-epoch checkpoint anyway)
        if (self.step < self.total_steps and args.ckpt_every
                and self.step % args.ckpt_every == 0):
            self.checkpoint("last.pt", self.next_batch, self.epoch)
        return True

    def validate_and_checkpoint(self) -> None:
        """End of an epoch (or of the run): validate, keep the best model as best.pt, and write
        last.pt at the position the next epoch starts from."""
        # A run stopped by --max-steps ends mid-epoch: last.pt then says where to continue.
        if self.next_batch >= self.micro_per_epoch:  # the epoch is complete
            self.epoch, self.next_batch = self.epoch + 1, 0
        self.start_batch = self.next_batch  # always at an optimiser-step boundary
        results = ""
        if self.val_loader is not None:
            self.metrics = metrics = evaluate(self.raw, self.val_loader, self.device,
                                              self.args.amp, cache=self.cache)
            self.log(dict(step=self.step, epoch=self.epoch, time=round(time.time() - self.t0, 1),
                          val=metrics, candidates=self.settings["candidates"]))
            results = (": val " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                            if k not in ("n", "by_type"))
                       + f" (n={metrics['n']})"
                       + "".join(f"; {t} mIoU={m['mIoU']:.4f} (n={m['n']})"
                                 for t, m in metrics.get("by_type", {}).items()))
            if metrics["mIoU"] > self.best:  # the best validation so far is kept as best.pt
                self.best = metrics["mIoU"]
                self.checkpoint("best.pt", self.start_batch, self.epoch)
            self.meter.read()  # validation time is not training throughput
        if self.is_main:  # one line per epoch, with the time the run still needs
            print(f"epoch {self.epoch} step {self.step}/{self.total_steps} "
                  f"({self.time_left()}){results}", flush=True)
        self.checkpoint("last.pt", self.start_batch, self.epoch)

    def checkpoint(self, name: str, batch_in_epoch: int, at_epoch: int) -> None:
        """Every rank calls it (their random states are gathered); rank 0 writes. Only called
        between optimiser steps, so no accumulated gradient is ever lost."""
        rng = gather_rng(self.world)
        if not self.is_main:
            return
        args, plan = self.args, self.plan
        state = dict(model_name=args.model, config=dataclasses.asdict(self.cfg),
                     model=model_state(self.raw, self.refs), frozen=self.refs,
                     frozen_modules=self.frozen_modules, init_seed=args.seed, step=self.step,
                     epoch=at_epoch, batch_in_epoch=batch_in_epoch,
                     samples_in_epoch=batch_in_epoch * plan.per_process * self.world,
                     best=self.best, rng=rng, args=vars(args), run=self.settings)
        if name == "last.pt":  # the optimiser state is for resuming, which reads last.pt
            state |= dict(optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict())
        save_checkpoint(state, os.path.join(args.out, name))

    def log(self, record: dict) -> None:
        """One record to log.jsonl and TensorBoard (rank 0)."""
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tensorboard_scalars(self.writer, record, record["step"])

    def time_left(self) -> str:
        """Elapsed time and ETA of the steps this process has trained (a resumed run's too)."""
        return time_left(time.time() - self.t0, self.step - self.first_step,
                         self.total_steps - self.step)

    def finish(self) -> dict:
        """Close the logs, sum the data counts over ranks, say where the checkpoints are."""
        if self.writer is not None:
            self.writer.close()
        # how many sentences the tokenizer cut and images failed to decode: a data problem
        # shows here rather than as a slightly worse number
        truncated, skipped = self.truncated, self.skipped
        if self.world > 1:  # counts over all ranks for the summary
            counts = torch.tensor([truncated, skipped], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            truncated, skipped = int(counts[0]), int(counts[1])
        if self.is_main:
            print(f"done: {self.step} steps in {time.time() - self.t0:.0f}s; {truncated} "
                  f"sentences truncated to the model's limit; {skipped} undecodable images "
                  f"skipped; checkpoints in {self.args.out}", flush=True)
        if self.world > 1:  # no rank leaves while another still writes
            dist.barrier()
            dist.destroy_process_group()
        return self.metrics


if __name__ == "__main__":
    main()
