"""Train any of the four models with one plain loop.

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
uses depend only on the global batch (rank r takes every world-th index of one shuffled order),
so with an equal global batch the run continues mid-epoch exactly whatever world size x batch x
accumulation make it; with another global batch the current epoch restarts from its beginning
(its first samples are seen twice).

Checkpoints hold the trained parameters and every buffer; a frozen encoder whose weights come
from a file is stored as that file's path and sha256 (`frozen_references`), unless
`--self-contained-checkpoints`. Only `last.pt` holds the optimiser state.

Logs: log.jsonl (loss terms, lr, grad_norm, samples_per_s, data_wait, memory_mb, validation),
TensorBoard under RUN/tb when `torch.utils.tensorboard` imports (`--tensorboard` to insist,
`--no-tensorboard` to skip); `plot_log(RUN, PNG)` draws the curves.
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


class TrainSampler(Sampler):
    """Shuffles with (seed, epoch), gives rank r the r-th of every `world` indices (dropping the
    remainder so that ranks take equal steps) and can start part-way into an epoch (resume).

    Yields (epoch, index) keys for `EpochKeyed`: the epoch travels with each index, so that
    persistent loader workers, which never see `set_epoch` on their copy of the dataset, still
    augment each epoch differently."""

    def __init__(self, n: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        mine = perm[: len(self) * self.world][self.rank :: self.world]
        return iter([(self.epoch, i) for i in mine[self.start :]])

    def __len__(self) -> int:
        return self.n // self.world


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


def flush_denormals() -> None:
    """Compute with denormal floats as zero in CPU operations (x86 FTZ/DAZ; GPU kernels are not
    affected; a no-op on CPUs without it). Softmax and GELU tails make them while training, and
    each operation on one is many times slower: MARIS tiny under `torchrun --nproc_per_node=2`,
    150 steps in 79.6 s instead of 92.2 s. Values below 1.2e-38 carry nothing a model could use."""
    torch.set_flush_denormal(True)


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    flush_denormals()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
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


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
            feats = cache.features(raw, batch) if cache is not None else {}
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


def candidate_source(args, model_cls) -> str | None:
    """Where a model that takes candidate masks (MaIL) gets them (data.candidate_source), or
    None for a model that takes none (then no instance mask is decoded)."""
    if "cand_masks" not in model_cls.input_names:
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


def loader_options(workers: int, cuda: bool) -> dict:
    """Worker settings: on CUDA with workers, pinned host memory (asynchronous copies) and
    workers kept across epochs (no re-fork and re-import each epoch)."""
    return dict(num_workers=workers, pin_memory=cuda and workers > 0,
                persistent_workers=cuda and workers > 0)


def make_eval_loader(args, split: str, model, rank: int, world: int, batch_size: int):
    """A loader over one evaluation split, sharded across ranks without repeats. Its collate
    function is a functools.partial, which pickles: workers can start under spawn/forkserver."""
    base = data.build_dataset(args.dataset, split,
                              **dataset_kwargs(args, split, candidate_source(args, model),
                                                getattr(model, "cfg", None)))
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names, keep_original=True)
    ds = data.PreparedDataset(base, prep, seed=args.seed)
    cuda = next(model.parameters()).device.type == "cuda"
    return DataLoader(ds, batch_size=batch_size, sampler=data.ShardSampler(len(ds), rank, world),
                      collate_fn=functools.partial(data.collate, pad_id=model.tokenizer.pad_id),
                      **loader_options(args.workers, cuda))


def make_train_loader(train_set: data.PreparedDataset, sampler: TrainSampler, batch_size: int,
                      pad_id: int, workers: int, cuda: bool, seed: int) -> DataLoader:
    return DataLoader(EpochKeyed(train_set), batch_size=batch_size, sampler=sampler,
                      drop_last=True, collate_fn=functools.partial(data.collate, pad_id=pad_id),
                      generator=torch.Generator().manual_seed(seed),
                      **loader_options(workers, cuda))


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
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    return p.parse_args(argv)


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
# Resume: the same run, or explicit overrides
# ---------------------------------------------------------------------------------------------


def run_settings(args, cfg, plan: BatchPlan, candidates: str | None) -> dict:
    """The settings that define a run's arithmetic, as this command line resolves them; a
    checkpoint records them and a resumed run must match them (see `check_resume`)."""
    return dict(config=args.config, lr=args.lr or cfg.lr, epochs=args.epochs or cfg.epochs,
                max_steps=args.max_steps, batch_size=plan.per_process, accum_steps=plan.accum,
                world_size=plan.world,
                clip_grad=args.clip_grad if args.clip_grad is not None else cfg.clip_grad,
                augment=cfg.hflip and not args.no_augment, amp=args.amp, seed=args.seed,
                dataset=args.dataset, split_by=args.split_by,
                shapes_train_size=args.shapes_train_size,
                shapes_image_size=args.shapes_image_size, data_seed=args.data_seed,
                candidates=data.candidate_label(candidates) if candidates else None)


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


def check_run_folder(out: str, resuming: bool) -> None:
    """A fresh run must not overwrite another run's checkpoints nor append to its log."""
    found = [f for f in ("last.pt", "log.jsonl") if os.path.exists(os.path.join(out, f))]
    if found and not resuming:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): continue it with "
                              "--resume auto, or choose a new --out")


# ---------------------------------------------------------------------------------------------
# One optimiser step from N micro-batches
# ---------------------------------------------------------------------------------------------


def forward_loss(model, raw, batch: dict, device, amp: str, cache=None) -> tuple[dict, dict]:
    """Move a batch to the device (data.to_device: every tensor, uint8 images normalised there)
    and run the model with its target: (batch on the device, outputs with "loss")."""
    batch = data.to_device(batch, device, raw.input_spec)
    with autocast(device, amp):
        feats = cache.features(raw, batch) if cache is not None else {}
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
# Logs: log.jsonl, TensorBoard, plots
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
# The run
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


def paper_batch_note(cfg, plan: BatchPlan) -> str | None:
    """A warning when the run's global batch is not the config's (the paper's)."""
    if plan.global_batch == cfg.batch_size:
        return None
    return (f"the global batch is {plan.global_batch} ({plan.world} process(es) x batch "
            f"{plan.per_process} x {plan.accum} accumulation step(s)), not the config's "
            f"{cfg.batch_size}; --global-batch {cfg.batch_size} asks for it exactly")


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    is_main = rank == 0
    if args.workers is None:
        args.workers = 0 if device.type == "cpu" and (os.cpu_count() or 1) <= 2 * world else 2
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.config}-{args.dataset}")
    os.makedirs(args.out, exist_ok=True)
    if is_main:  # a run killed while writing a checkpoint leaves its temporary file behind
        for name in os.listdir(args.out):
            if ".pt.tmp." in name:
                os.remove(os.path.join(args.out, name))

    # what this command line asks for; a resumed run must be the same run (check_resume)
    module = load_model_module(args.model)
    ckpt, resume_path = find_resume(args)
    check_run_folder(args.out, resuming=ckpt is not None or args.resume == "auto")
    asked = build_config(module, args)
    if ckpt is None:
        check_paper_weights(module, args, asked)
    plan = plan_batches(asked.batch_size, world, args.batch_size, args.accum_steps,
                        args.global_batch)
    candidates = candidate_source(args, module.MODEL)
    run = run_settings(args, asked, plan, candidates)
    epochs, lr, clip, augment = run["epochs"], run["lr"], run["clip_grad"], run["augment"]
    overrides: set[str] = set()
    if ckpt is not None:
        wanted = {f.strip() for f in (args.resume_override or "").split(",") if f.strip()}
        overrides = check_resume(ckpt, run, config_differences(ckpt, module, args), wanted,
                                 resume_path)
        new_fields = {k.removeprefix("config."): getattr(asked, k.removeprefix("config."))
                      for k in overrides if k.startswith("config.")}
        ckpt = dict(ckpt, config=ckpt["config"] | new_fields)
    limits_cfg = (config_from_dict(next(iter(module.CONFIGS.values())), ckpt["config"])
                  if ckpt is not None else asked)  # bounds K (MaIL's max_candidates)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    base = data.build_dataset(args.dataset, "train",
                              **dataset_kwargs(args, "train", candidates, limits_cfg))

    # model, from a checkpoint when resuming; built right after seeding (same on every rank, and
    # rebuildable by build_model_from_checkpoint from its "init_seed")
    if ckpt is not None:  # --image-weights / --text-weights: where referenced files now live
        moved = {f: getattr(args, f) for f in WEIGHT_FLAGS if getattr(args, f, None)}
        model, module, cfg = build_model_from_checkpoint(ckpt, weights=moved)
    else:
        cfg = new_config(module, args, base)
        torch.manual_seed(args.seed)
        model = module.MODEL(cfg)
        cfg = model.cfg  # as the model completed it
    seed_rank(args.seed, rank)
    model.to(device)
    raw = model
    frozen_modules = [n for n, m in raw.named_modules() if getattr(m, "frozen", False)]
    refs = {} if args.self_contained_checkpoints else frozen_references(raw, cfg)

    # data
    prep = data.Preprocess(raw.input_spec, raw.tokenizer, augment=augment,
                           candidates="cand_masks" in raw.input_names)
    train_set = data.PreparedDataset(base, prep, seed=args.seed, skip_bad=True)
    sampler = TrainSampler(len(train_set), rank, world, args.seed)
    loader = make_train_loader(train_set, sampler, plan.per_process, raw.tokenizer.pad_id,
                               args.workers, device.type == "cuda", args.seed)
    steps_per_epoch = len(sampler) // plan.per_process // plan.accum  # optimiser steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples give no full step of "
                         f"{plan.accum} x {plan.per_process} samples on each of {world} processes")
    micro_per_epoch = steps_per_epoch * plan.accum  # a last incomplete step is dropped
    total_steps = epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    val_loader = None
    if not args.no_val:
        val_loader = make_eval_loader(args, "val", raw, rank, world,
                                      args.eval_batch_size or plan.per_process)

    cache = None
    if args.cache_features:
        if augment:
            raise ValueError("--cache-features: training augmentation (random flips) changes the "
                             "images every epoch, so cached features would be stale; "
                             "add --no-augment")
        from common.cache import FeatureCache

        cache = FeatureCache(args.cache_features, raw)
        if is_main:
            print(f"feature cache for the frozen {' and '.join(cache.parts)} encoder(s): "
                  f"{', '.join(cache.dirs.values())}", flush=True)

    # optimisation: the paper's optimiser and schedule, declared by the model
    optimizer, scheduler = raw.configure_optimizers(lr, total_steps)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, epoch, start_batch, best = 0, 0, 0, -1.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, best = ckpt["step"], ckpt["epoch"], ckpt["best"]
        if overrides:
            fast_forward_schedule(optimizer, scheduler, fresh_groups, step)
        else:
            scheduler.load_state_dict(ckpt["scheduler"])
        start_batch, restarted = resume_position(ckpt, plan)
        if restarted and is_main:
            warnings.warn(f"the global batch changed: epoch {epoch} restarts from its beginning",
                          stacklevel=1)
        restore_rng(ckpt["rng"], rank, world, args.seed, step)
    ddp = None
    if world > 1:
        if device.type == "cuda":  # BN statistics over the global batch (MaIL Sec. 4.1 asks so)
            raw = sync_batchnorm(raw)
        model = ddp = DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    total, trainable = count_parameters(raw)
    log_path = os.path.join(args.out, "log.jsonl")
    label = run["candidates"]
    writer = open_tensorboard(args.tensorboard, args.out) if is_main else None
    if is_main:
        print(f"{args.model}/{args.config}: {total / 1e6:.2f}M parameters "
              f"({trainable / 1e6:.2f}M trained); "
              f"{args.dataset}: {len(train_set)} train samples"
              + (f", candidates: {label}" + (" (upper bound)" if label == "oracle" else "")
                 if label else "")
              + f"; global batch {plan.global_batch} = {world} process(es) x batch "
              f"{plan.per_process} x {plan.accum} accumulation (config: {cfg.batch_size}); "
              f"{total_steps} steps; amp={args.amp}; clip_grad={clip}; augment={augment}; "
              f"device={device}" + (f"; resumed at step {step}" if ckpt else ""), flush=True)
        note = paper_batch_note(cfg, plan)
        if note:
            warnings.warn(note, stacklevel=1)
        if getattr(base, "skipped_refs", 0):
            print(f"{base.skipped_refs} refs without sentences skipped", flush=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world, "global_batch": plan.global_batch,
                                    "accum_steps": plan.accum, "candidates": label,
                                    "candidates_file": args.candidates}, f, indent=1)

    def log(record: dict) -> None:
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tensorboard_scalars(writer, record, record["step"])

    def checkpoint(name: str, batch_in_epoch: int, at_epoch: int) -> None:
        """Every rank calls it (their random states are gathered); rank 0 writes. Only called
        between optimiser steps, so no accumulated gradient is ever lost."""
        rng = gather_rng(world)
        if not is_main:
            return
        state = dict(model_name=args.model, config=dataclasses.asdict(cfg),
                     model=model_state(raw, refs), frozen=refs, frozen_modules=frozen_modules,
                     init_seed=args.seed, step=step, epoch=at_epoch,
                     batch_in_epoch=batch_in_epoch,
                     samples_in_epoch=batch_in_epoch * plan.per_process * world, best=best,
                     rng=rng, args=vars(args), run=run)
        if name == "last.pt":  # the optimiser state is for resuming, which reads last.pt
            state |= dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                          scaler=scaler.state_dict())
        save_checkpoint(state, os.path.join(args.out, name))

    from tqdm import tqdm

    metrics: dict = {}
    bad_steps, truncated, skipped, t0 = 0, 0, 0, time.time()
    meter = Throughput()
    model.train()
    while step < total_steps and epoch < epochs:
        sampler.set_epoch(epoch, start_batch * plan.per_process)
        bar = tqdm(total=steps_per_epoch, initial=start_batch // plan.accum, desc=f"epoch {epoch}",
                   disable=not is_main or not sys.stderr.isatty(), leave=False,
                   file=sys.stderr)
        next_batch = start_batch  # index in the epoch of the next micro-batch to train on
        batches = iter(loader)
        micro, good, parts = 0, True, {}  # micro-batches of this step, all finite, loss sums
        while next_batch < micro_per_epoch:
            waited = time.perf_counter()
            batch = next(batches, None)
            meter.wait += time.perf_counter() - waited
            if batch is None:
                break
            next_batch += 1
            micro += 1
            truncated += batch["truncated"]
            skipped += batch["skipped"]
            if micro == 1:
                optimizer.zero_grad(set_to_none=True)
            with sync_context(ddp, micro == plan.accum):
                batch, out = forward_loss(model, raw, batch, device, args.amp, cache)
                finite = all_finite(out["loss"], world)
                if finite:
                    backward(out["loss"], scaler, plan.accum)
            good = good and finite
            for k, v in out.items():
                if k.startswith("loss"):
                    parts[k] = parts.get(k, 0.0) + v.detach().float() / plan.accum
            meter.samples += plan.per_process * world
            if micro < plan.accum:
                continue
            micro = 0
            if not good:
                good, parts = True, {}
                bad_steps += 1
                warnings.warn(f"non-finite loss at step {step}: step skipped "
                              f"({bad_steps}/{args.max_bad_steps} in a row)", stacklevel=1)
                if bad_steps >= args.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_steps} consecutive non-finite losses at step {step}: stopping. "
                        f"The last good checkpoint is {os.path.join(args.out, 'last.pt')}; try a "
                        "lower --lr or --amp none.")
                continue
            bad_steps = 0
            grad_norm = optimizer_step(raw, optimizer, scheduler, scaler, clip)
            step += 1
            bar.update(1)
            if is_main and (step % args.log_every == 0 or step == 1):
                rec = dict(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0],
                           time=round(time.time() - t0, 1), truncated_sentences=truncated,
                           skipped_images=skipped,
                           **{k: round(v.item(), 5) for k, v in parts.items()},
                           grad_norm=round(grad_norm.item(), 5), **meter.read(),
                           memory_mb=memory_mb(device))
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if not sys.stderr.isatty():
                    print(json.dumps(rec), flush=True)
            parts = {}
            if step >= total_steps:
                break
            if args.ckpt_every and step % args.ckpt_every == 0:
                checkpoint("last.pt", next_batch, epoch)
        bar.close()
        if next_batch >= micro_per_epoch:  # the epoch is complete
            epoch, next_batch = epoch + 1, 0
        start_batch = next_batch  # always at an optimiser-step boundary (micro == 0)
        if val_loader is not None:
            metrics = evaluate(raw, val_loader, device, args.amp, cache=cache)
            log(dict(step=step, epoch=epoch, time=round(time.time() - t0, 1), val=metrics,
                     candidates=label))
            if is_main:
                print(f"epoch {epoch} step {step} ({time.time() - t0:.0f}s): val "
                      + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                 if k not in ("n", "by_type"))
                      + f" (n={metrics['n']})"
                      + "".join(f"; {t} mIoU={m['mIoU']:.4f} (n={m['n']})"
                                for t, m in metrics.get("by_type", {}).items()), flush=True)
            if metrics["mIoU"] > best:
                best = metrics["mIoU"]
                checkpoint("best.pt", start_batch, epoch)
            meter.read()  # validation time is not training throughput
        checkpoint("last.pt", start_batch, epoch)
    if writer is not None:
        writer.close()
    if world > 1:  # counts over all ranks for the summary
        counts = torch.tensor([truncated, skipped], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        truncated, skipped = int(counts[0]), int(counts[1])
    if is_main:
        print(f"done: {step} steps in {time.time() - t0:.0f}s; {truncated} sentences truncated "
              f"to the model's limit; {skipped} undecodable images skipped; checkpoints in "
              f"{args.out}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
