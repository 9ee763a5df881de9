"""Train any of the four models with one plain loop.

  python train.py --model maris                                  # CPU, built-in shapes data
  torchrun --nproc_per_node=2 train.py --model maris             # DDP (gloo on CPU, nccl on GPU)
  torchrun --nproc_per_node=8 train.py --model maris --config paper --dataset refcoco \
      --data-root /data/refer --image-weights sam_vit_h_4b8939.pth --text-weights ViT-B-16.pt

Each epoch ends with a validation and with `last.pt` and `best.pt` written atomically in the run
folder; `--resume auto` continues from `last.pt` exactly where it stopped (also mid-epoch, from
`--ckpt-every` checkpoints). Nothing here is model-specific: models follow common.model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

import data
from common.encoders import quiet_random_init
from common.metrics import IoUAccumulator, intersection_union
from common.model import config_from_dict, count_parameters

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


def new_config(module, args, train_set) -> object:
    """The config of a new run; a model whose config depends on the training data (M3Dec's word
    vocabulary) fills it in through its module's `prepare_config(cfg, sentences)`."""
    cfg = build_config(module, args)
    if hasattr(module, "prepare_config"):
        cfg = module.prepare_config(cfg, data.sentences(train_set))
    return cfg


def build_model_from_checkpoint(ckpt: dict, device="cpu"):
    """Rebuild a model from a checkpoint's name and config; its state dict holds every weight,
    so encoder weight files are not needed (and not read)."""
    module = load_model_module(ckpt["model_name"])
    cfg = config_from_dict(next(iter(module.CONFIGS.values())), ckpt["config"])
    cfg = dataclasses.replace(cfg, image_weights=None, text_weights=None)
    with quiet_random_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.MODEL(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt["model"]]
    unexpected = [k for k in ckpt["model"] if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k, v in ckpt["model"].items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the checkpoint's weights do not fit {ckpt['model_name']} built from its "
                         f"config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {shapes[:5]}")
    model.load_state_dict(ckpt["model"])
    return model.to(device), module, cfg


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
    remainder so that ranks take equal steps) and can start part-way into an epoch (resume)."""

    def __init__(self, n: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        mine = perm[: len(self) * self.world][self.rank :: self.world]
        return iter(mine[self.start :])

    def __len__(self) -> int:
        return self.n // self.world


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


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, device, amp: str = "none", on_batch=None, cache=None) -> dict:
    """Metrics of common.metrics over a loader, at each image's original resolution, summed
    across ranks. Where samples carry a sentence type (the synthetic data: data.SENTENCE_TYPES),
    "by_type" adds the same metrics for each type. `on_batch(batch, out, ious)` sees every batch
    (visualisations); `cache`, a common.cache.FeatureCache, supplies frozen encoders' features."""
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    was_training = raw.training
    raw.eval()
    acc = IoUAccumulator()
    by_type = {t: IoUAccumulator() for t in data.SENTENCE_TYPES}
    for batch in loader:
        batch = move(batch, device)
        with autocast(device, amp):
            feats = cache.features(raw, batch) if cache is not None else {}
            out = raw(**raw.inputs_from(batch), **feats)
        ious = []
        for i in range(len(batch["gt"])):
            pred = data.to_original(out["mask_logits"][i], batch["valid_hw"][i],
                                    batch["orig_hw"][i]) > 0
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


_read_candidates = functools.lru_cache(maxsize=2)(data.load_candidates)


def load_candidates(args) -> dict | None:
    """The proposals of --candidates (read once per process), or None: annotated instances."""
    path = getattr(args, "candidates", None)
    return _read_candidates(path) if path else None


def make_eval_loader(args, split: str, model, rank: int, world: int, batch_size: int):
    base = data.build_dataset(args.dataset, split, data_root=args.data_root, split_by=args.split_by,
                              image_dir=args.image_dir, shapes_size=args.shapes_eval_size,
                              shapes_image_size=args.shapes_image_size, seed=args.data_seed,
                              candidates=load_candidates(args))
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names, keep_original=True)
    ds = data.PreparedDataset(base, prep, seed=args.seed)
    return DataLoader(ds, batch_size=batch_size, sampler=data.ShardSampler(len(ds), rank, world),
                      num_workers=args.workers,
                      collate_fn=lambda b: data.collate(b, model.tokenizer.pad_id))


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
                   help="MaIL: candidate masks from this proposals file (data.CANDIDATES_FORMAT) "
                        "instead of the annotated instances; eval.py: default the training run's")


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
    g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default: the config's")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    g.add_argument("--batch-size", type=int, default=None,
                   help="per process (default: config's global / world)")
    g.add_argument("--lr", type=float, default=None, help="default: the config's")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="mixed precision (default bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many consecutive non-finite losses")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/MODEL-CONFIG-DATASET)")
    g.add_argument("--resume", default=None,
                   help="auto (OUT/last.pt if present) or a checkpoint path")
    g.add_argument("--ckpt-every", type=int, default=0, help="also write last.pt every N steps")
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--no-val", action="store_true", help="skip per-epoch validation")
    g.add_argument("--no-augment", action="store_true", help="no training augmentation (flips)")
    g.add_argument("--cache-features", default=None, metavar="DIR",
                   help="keep frozen encoders' features on disk and train from them (see README)")
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    return p.parse_args(argv)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    base = data.build_dataset(args.dataset, "train", data_root=args.data_root,
                              split_by=args.split_by,
                              image_dir=args.image_dir, shapes_size=args.shapes_train_size,
                              shapes_image_size=args.shapes_image_size, seed=args.data_seed,
                              candidates=load_candidates(args))

    # model, from a checkpoint when resuming
    module = load_model_module(args.model)
    resume_path = None
    if args.resume == "auto":
        candidate = os.path.join(args.out, "last.pt")
        resume_path = candidate if os.path.isfile(candidate) else None
    elif args.resume:
        resume_path = args.resume
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        if ckpt["model_name"] != args.model:
            raise ValueError(f"{resume_path} holds a {ckpt['model_name']} model, not {args.model}")
        trained_config = ckpt.get("args", {}).get("config", args.config)
        declared = (dataclasses.asdict(module.CONFIGS[args.config])
                    if args.config in module.CONFIGS else {})
        asked = {k: v for k, v in dataclasses.asdict(build_config(module, args)).items()
                 if v != declared.get(k) and k not in ("image_weights", "text_weights")}
        differ = {k: (ckpt["config"].get(k), v) for k, v in asked.items()
                  if ckpt["config"].get(k) != v}
        if trained_config != args.config:
            differ["--config"] = (trained_config, args.config)
        if differ:
            raise ValueError(f"{resume_path} was trained with another config; field: (checkpoint, "
                             f"asked) = {differ}. Resume with the same --config/--set flags.")
        model, module, cfg = build_model_from_checkpoint(ckpt)
    else:
        model = module.MODEL(new_config(module, args, base))
        cfg = model.cfg  # as the model completed it
    model.to(device)
    raw = model

    # data
    epochs = args.epochs or cfg.epochs
    batch_size = args.batch_size or max(1, cfg.batch_size // world)
    lr = args.lr or cfg.lr
    prep = data.Preprocess(raw.input_spec, raw.tokenizer, augment=not args.no_augment,
                           candidates="cand_masks" in raw.input_names)
    train_set = data.PreparedDataset(base, prep, seed=args.seed, skip_bad=True)
    sampler = TrainSampler(len(train_set), rank, world, args.seed)
    collate = lambda b: data.collate(b, raw.tokenizer.pad_id)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.seed),
                        persistent_workers=False)
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples give no full batch of {batch_size} "
                         f"on each of {world} processes")
    total_steps = epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    val_loader = None
    if not args.no_val:
        val_split = "val"
        val_loader = make_eval_loader(args, val_split, raw, rank, world,
                                      args.eval_batch_size or batch_size)

    cache = None
    if args.cache_features:
        if not args.no_augment:
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
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, epoch, start_batch, best = 0, 0, 0, -1.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, start_batch, best = (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"],
                                          ckpt["best"])
        set_rng_state(ckpt["rng"])
    if world > 1:
        if device.type == "cuda":  # BN statistics over the global batch (MaIL Sec. 4.1 asks so)
            raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
        model = DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    total, trainable = count_parameters(raw)
    log_path = os.path.join(args.out, "log.jsonl")
    if is_main:
        print(f"{args.model}/{args.config}: {total / 1e6:.2f}M parameters "
              f"({trainable / 1e6:.2f}M trained); "
              f"{args.dataset}: {len(train_set)} train samples; "
              f"{world} process(es) x batch {batch_size}; "
              f"{total_steps} steps; amp={args.amp}; device={device}"
              + (f"; resumed at step {step}" if ckpt else ""), flush=True)
        if getattr(base, "skipped_refs", 0):
            print(f"{base.skipped_refs} refs without sentences skipped", flush=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args) | {"world_size": world}, f, indent=1)

    def log(record: dict) -> None:
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(name: str, batch_in_epoch: int, at_epoch: int) -> None:
        if not is_main:
            return
        state = dict(model_name=args.model, config=dataclasses.asdict(cfg), model=raw.state_dict(),
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), step=step, epoch=at_epoch,
                     batch_in_epoch=batch_in_epoch, best=best, rng=rng_state(),
                     args=vars(args))
        save_checkpoint(state, os.path.join(args.out, name))

    from tqdm import tqdm

    metrics: dict = {}
    bad_steps, truncated, skipped, t0 = 0, 0, 0, time.time()
    model.train()
    while step < total_steps and epoch < epochs:
        sampler.set_epoch(epoch, start_batch * batch_size)
        train_set.set_epoch(epoch)
        bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch}",
                   disable=not is_main or not sys.stderr.isatty(), leave=False,
                   file=sys.stderr)
        next_batch = start_batch  # index in the epoch of the next batch to train on
        for batch in loader:
            next_batch += 1
            truncated += batch["truncated"]
            skipped += batch["skipped"]
            batch = move(batch, device)
            with autocast(device, args.amp):
                feats = cache.features(raw, batch) if cache is not None else {}
                out = model(**raw.inputs_from(batch), **feats, target=batch["mask"])
            loss = out["loss"]
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:  # every rank must skip the same step, or DDP would hang
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
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
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            bar.update(1)
            if is_main and (step % args.log_every == 0 or step == 1):
                parts = {k: round(v.item(), 5) for k, v in out.items() if k.startswith("loss")}
                rec = dict(step=step, epoch=epoch, lr=scheduler.get_last_lr()[0],
                           time=round(time.time() - t0, 1), truncated_sentences=truncated,
                           skipped_images=skipped, **parts)
                log(rec)
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
                if not sys.stderr.isatty():
                    print(json.dumps(rec), flush=True)
            if step >= total_steps:
                break
            if args.ckpt_every and step % args.ckpt_every == 0:
                checkpoint("last.pt", next_batch, epoch)
        bar.close()
        if next_batch >= steps_per_epoch:  # the epoch is complete
            epoch, next_batch = epoch + 1, 0
        start_batch = next_batch
        if val_loader is not None:
            metrics = evaluate(raw, val_loader, device, args.amp, cache=cache)
            log(dict(step=step, epoch=epoch, time=round(time.time() - t0, 1), val=metrics))
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
        checkpoint("last.pt", start_batch, epoch)
    if world > 1:  # counts over all ranks for the summary
        counts = torch.tensor([truncated, skipped], dtype=torch.float64)
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
