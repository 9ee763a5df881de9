"""Resume: the same run continued exactly, or with settings changed explicitly.

A resumed run computes its settings from its own command line exactly as a fresh run does, and
every setting that differs from the checkpoint's (`common.runconfig.run_settings`, and config
fields set with --set) stops it with the list of differences, unless `--resume-override
FIELD[,FIELD]` names them. Applied overrides: the optimiser keeps its moments, its
hyper-parameters and the learning-rate schedule become those a fresh run with the new settings
would have, continued at the checkpoint's step. Position in the epoch: the samples a step uses
depend only on the global batch (ranks split one shuffled order, common.samplers.TrainSampler),
so with an equal global batch the run continues mid-epoch exactly whatever world size x batch x
accumulation make it; with another global batch the current epoch restarts from its beginning.

Random state: every rank's is saved (`gather_rng`) and restored (`restore_rng`), so dropout
continues as if the run had never stopped.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist

from common.checkpoint import load_checkpoint
from common.runconfig import WEIGHT_FLAGS, BatchPlan, build_config


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
    """The differences this run overrides, or a ValueError listing those it does not."""
    saved = ckpt["run"]
    differ = {k: (saved[k], v) for k, v in run.items() if saved[k] != v}
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


def resume_settings(ckpt: dict, module, args, asked, settings: dict,
                    path: str) -> tuple[dict, set[str]]:
    """The checkpoint with the config fields this run overrides applied, and the overridden
    settings; a ValueError when a setting differs without --resume-override naming it."""
    wanted = {f.strip() for f in (args.resume_override or "").split(",") if f.strip()}
    overrides = check_resume(ckpt, settings, config_differences(ckpt, module, args), wanted, path)
    new_fields = {k.removeprefix("config."): getattr(asked, k.removeprefix("config."))
                  for k in overrides if k.startswith("config.")}
    return dict(ckpt, config=ckpt["config"] | new_fields), overrides


def resume_position(ckpt: dict, plan: BatchPlan) -> tuple[int, bool]:
    """(micro-batches of this epoch already done per rank, whether the epoch restarts).
    A step's samples depend only on the global batch (module docstring): with an equal global
    batch the run continues exactly; with another one the epoch restarts from its beginning."""
    saved = ckpt["run"]
    if saved["batch_size"] * saved["accum_steps"] * saved["world_size"] != plan.global_batch:
        return 0, ckpt["batch_in_epoch"] > 0
    return ckpt["samples_in_epoch"] // (plan.per_process * plan.world), False


def fast_forward_schedule(optimizer, scheduler, fresh_groups: list[dict], step: int) -> None:
    """After loading an optimiser's state under overridden settings: its hyper-parameters become
    the new run's (`fresh_groups`), and the new schedule is advanced to `step`."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore")
        for _ in range(step):
            scheduler.step()


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
    if torch.cuda.is_available() and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])


def restore_rng(saved, rank: int, world: int, seed: int, step: int) -> None:
    """Rank r takes rank r's saved state. With another world size no state belongs to it: it
    is seeded from (seed, rank, step), so that ranks still differ and the run is repeatable."""
    if len(saved) == world:
        set_rng_state(saved[rank])
    else:
        fresh = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
        torch.manual_seed(fresh)
        random.seed(fresh)


def restore_training(ckpt: dict, optimizer, scheduler, scaler, fresh_groups: list[dict],
                     overrides: set[str], plan: BatchPlan, rank: int, world: int,
                     seed: int) -> tuple[int, int, int, float]:
    """Load the optimiser, schedule, loss scaler and random state of `ckpt` (last.pt); returns
    where the run stands: (step, epoch, micro-batch of the epoch to train next, best mIoU)."""
    optimizer.load_state_dict(ckpt["optimizer"])  # Adam's moments carry on
    if ckpt["scaler"]:  # a bf16 or fp32 run saved none: an fp16 resume starts one
        scaler.load_state_dict(ckpt["scaler"])
    if overrides:  # new lr or length: the schedule a fresh run would have
        fast_forward_schedule(optimizer, scheduler, fresh_groups, ckpt["step"])
    else:
        scheduler.load_state_dict(ckpt["scheduler"])
    start_batch, restarted = resume_position(ckpt, plan)
    if restarted and rank == 0:
        warnings.warn(f"the global batch changed: epoch {ckpt['epoch']} restarts from its "
                      "beginning", stacklevel=2)
    restore_rng(ckpt["rng"], rank, world, seed, ckpt["step"])
    return ckpt["step"], ckpt["epoch"], start_batch, ckpt["best"]
