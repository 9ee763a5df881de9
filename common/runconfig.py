"""A run's configuration: the model registry, the config a command line builds (named config,
weight files, `--set` overrides), the defaults that depend on the machine, the batch plan
(world size x per-process batch x accumulation) and the settings a checkpoint records.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os

import torch

from common.candidates import candidate_label
from common.encoders.loading import file_sha256

MODELS = ("mail", "mmnet", "m3dec", "maris")


def load_model_module(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return importlib.import_module(name)


def parse_value(text: str, default):
    """Parse a --set value with the type of the field's default (finite numbers only)."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(parse_value(v, default[0]) if default else v for v in text.split(","))
    if isinstance(default, (int, float)):
        try:
            value = type(default)(text)
        except ValueError:
            raise ValueError(f"expected {type(default).__name__}, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    return text


def named_config(module, config: str):
    """module.CONFIGS[config], or a ValueError naming the configs there are."""
    if config not in module.CONFIGS:
        raise ValueError(f"{module.__name__} has configs {sorted(module.CONFIGS)}, not {config!r}")
    return module.CONFIGS[config]


def build_config(module, args):
    """The named config with the weight paths, --freeze-encoders and --set overrides applied."""
    cfg = named_config(module, args.config)
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
        try:
            changes[key] = parse_value(value, fields[key])
        except ValueError as err:
            raise ValueError(f"--set {key}={value}: {err}") from None
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


def fill_defaults(args, device: torch.device, world: int) -> None:
    """The defaults that depend on the machine: loader workers, precision, run folder."""
    # Loader workers help only when there are spare cores: on a small CPU machine every core
    # already runs a rank's matmuls, and a worker would take its time.
    if args.workers is None:
        cores = os.cpu_count() or 1
        args.workers = 0 if device.type == "cpu" and cores <= 2 * world else 2
    # bf16 autocast is fast on GPUs, hundreds of times slower than fp32 on CPUs without bf16
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if args.out is None and args.resume not in (None, "auto"):  # a run continues in its folder
        args.out = os.path.dirname(os.path.abspath(args.resume))
    args.out = args.out or os.path.join("runs", f"{args.model}-{args.config}-{args.dataset}")


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
                candidates=candidate_label(candidates) if candidates else None,
                candidates_sha256=(file_sha256(candidates) if candidates
                                   and os.path.isfile(candidates) else None),
                feature_cache=args.cache_storage if args.cache_features else None)
