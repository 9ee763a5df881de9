"""Train any of the four models with one plain loop.

  python train.py --model maris                                  # CPU, built-in shapes data
  torchrun --nproc_per_node=2 train.py --model maris             # DDP (gloo on CPU, nccl on GPU)
  torchrun --nproc_per_node=8 train.py --model maris --config paper --dataset refcoco \
      --data-root /data/refer --image-weights sam_vit_h_4b8939.pth --text-weights ViT-B-16.pt
  torchrun --nproc_per_node=2 train.py --model maris --resume auto    # continue runs/maris-...

The shape is that of torchvision's reference scripts and MAE's `main_pretrain.py`: `main` sets up,
builds, resumes and runs the epochs (training, validation, checkpoints); `train_one_epoch` holds
the whole optimiser step in one place; `parse_args` is at the bottom. Nothing here is
model-specific: every model follows common.model's contract (`forward(..., target=)` returns
its loss terms, `configure_optimizers` the paper's optimiser and schedule).

Batch: the config's `batch_size` is the paper's global batch. A run's global batch is world size
x --batch-size (per process) x --accum-steps (micro-batches whose gradients are summed before one
optimiser step, each loss scaled by 1/N, DDP synchronising only the last one); --global-batch B
picks the split. It is printed at start, with a warning when it is not the paper's.

Each epoch ends with a validation and with `last.pt` and `best.pt` written atomically in the run
folder; --resume auto continues from `last.pt` exactly where it stopped (also mid-epoch, from
--ckpt-every checkpoints), and refuses a command line whose settings differ from the
checkpoint's unless --resume-override names them.

Where the machinery lives (common/):
  distributed.py  processes, devices, DDP and compile wrappers, autocast, the finite check
  runconfig.py    the model registry, the config a command line builds, the batch plan
  checkpoint.py   the checkpoint format, frozen encoders by reference, atomic writes, export
  resume.py       resume rules (settings, overrides, position in the epoch) and random state
  runfolder.py    a fresh run never overwrites another; one run per folder at a time
  samplers.py     the training sampler (one shuffled order split across ranks) and eval's
  cache.py        frozen encoders' features, cached on disk or computed once per image
  logs.py         console (progress bar or one line per interval), log.jsonl, TensorBoard
  cli.py          flag types, exit status 2 with one line for a user's mistake
and data.py (samples -> batches on the device, loaders), eval.py (`evaluate`, used here).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
import warnings
from contextlib import nullcontext

import torch

import data
from common import checkpoint, cli, distributed, resume, runconfig, runfolder
from common.cache import FeatureCache, frozen_features
from common.logs import RunLog, memory_mb, metrics_line, percent, print_header
from common.model import config_from_dict
from common.runconfig import BatchPlan
from common.samplers import TrainSampler
from eval import evaluate

cli.check_own_modules("data", "eval", "common")


@dataclasses.dataclass
class Progress:
    """Where a run stands between optimiser steps. A checkpoint records step, epoch, batch and
    best; the counts are this session's."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch being trained
    batch: int = 0  # micro-batches of that epoch already trained, on each rank
    best: float = -1.0  # the best validation mIoU so far (any beats -1)
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss
    truncated: int = 0  # sentences the tokenizer cut to the model's limit
    skipped: int = 0  # images that could not be decoded


def main(argv=None) -> dict:
    """Train as the command line asks; returns the last validation's metrics ({} without)."""
    args = parse_args(argv)
    rank, world, device = distributed.setup_distributed()
    is_main = rank == 0  # rank 0 alone prints, logs and writes checkpoints
    distributed.setup_warnings(rank)
    runconfig.fill_defaults(args, device, world)  # loader workers, --amp, --out

    # Settings: what this command line asks for. A resumed run computes them exactly as a fresh
    # one does, then compares: a silently changed lr or batch would make two halves of two runs.
    module = runconfig.load_model_module(args.model)
    ckpt, resume_path = resume.find_resume(args)
    # a resume continues its own run folder; with another --out it starts a new one there
    resuming = ckpt is not None and os.path.abspath(args.out) == os.path.dirname(
        os.path.abspath(resume_path))
    runfolder.check_run_folder(args.out, resuming)
    asked = runconfig.build_config(module, args)
    if ckpt is None:  # a resumed run already started from (or without) the encoder files
        runconfig.check_paper_weights(module, args, asked)
    plan = runconfig.plan_batches(asked.batch_size, world, args.batch_size, args.accum_steps,
                                  args.global_batch)
    candidates = data.model_candidates(args, module.MODEL.input_names_for(asked))
    settings = runconfig.run_settings(args, asked, plan, candidates)
    overrides: set[str] = set()
    if ckpt is not None:
        ckpt, overrides = resume.resume_settings(ckpt, module, args, asked, settings, resume_path)
    limits = (config_from_dict(next(iter(module.CONFIGS.values())), ckpt["config"])
              if ckpt is not None else asked)  # bounds MaIL's max_candidates

    # The samples come before the model: M3Dec's word vocabulary is built from them.
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    base = data.build_dataset(args.dataset, "train",
                              **data.dataset_kwargs(args, "train", candidates, limits))

    # The model, built right after seeding: the same on every rank, and rebuilt from a
    # checkpoint's "init_seed" by checkpoint.build_model_from_checkpoint.
    if ckpt is not None:  # --image-weights / --text-weights: where the files now live
        moved = {f: getattr(args, f) for f in runconfig.WEIGHT_FLAGS if getattr(args, f, None)}
        raw, module, cfg = checkpoint.build_model_from_checkpoint(ckpt, weights=moved)
    else:
        if hasattr(module, "prepare_config"):  # a config filled from the training sentences
            asked = module.prepare_config(asked, data.sentences(base))
        torch.manual_seed(args.seed)
        raw = module.MODEL(asked)
        cfg = raw.cfg  # as the model completed it
    resume.seed_rank(args.seed, rank)  # dropout differs between ranks from here on
    # channels-last weights make each convolution return channels-last activations
    raw = raw.to(device, memory_format=distributed.memory_format(args.channels_last))
    frozen_modules = [n for n, m in raw.named_modules() if getattr(m, "frozen", False)]
    # frozen encoders built from a weight file are stored as the file's path and sha256
    refs = {} if args.self_contained_checkpoints else checkpoint.frozen_references(raw, cfg)

    # Data: one shuffled order per epoch, split across ranks, prepared as the model expects.
    prep = data.Preprocess(raw.input_spec, raw.tokenizer, augment=settings["augment"],
                           candidates="cand_masks" in raw.input_names)
    k = args.sentences_per_image
    sampler = TrainSampler(len(base), rank, world, args.seed, k=k, batch=plan.per_process,
                           image_keys=[base.image_key(i) for i in range(len(base))] if k > 1
                           else None)

    def train_loader(base):
        ds = data.PreparedDataset(base, prep, seed=args.seed, skip_bad=True)
        return data.make_train_loader(ds, sampler, plan.per_process, raw.tokenizer.pad_id,
                                      args.workers, device.type == "cuda", args.seed)

    loader = train_loader(base)
    steps_per_epoch = len(sampler) // plan.per_process // plan.accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(base)} training samples give no full step of {plan.accum} x "
                         f"{plan.per_process} samples on each of {world} processes")
    micro_per_epoch = steps_per_epoch * plan.accum  # a last partial step is dropped
    epochs = settings["epochs"]
    total_steps = min(epochs * steps_per_epoch, args.max_steps or epochs * steps_per_epoch)
    val_loader = None if args.no_val else data.make_eval_loader(
        args, "val", raw, rank, world, args.eval_batch_size or plan.per_process)
    cache = None
    if args.cache_features:  # frozen encoders run once per image, not once per epoch
        if settings["augment"]:
            raise ValueError("--cache-features: training augmentation (random flips) changes "
                             "the images every epoch, so cached features would be stale; add "
                             "--no-augment")
        cache = FeatureCache(args.cache_features, raw, args.cache_storage)

    # The paper's optimiser and schedule; when resuming, their state and the position.
    optimizer, scheduler = raw.configure_optimizers(settings["lr"], total_steps)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"}
                    for g in optimizer.param_groups]  # what an override resumes with
    # fp16 needs loss scaling (its small gradients underflow); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    progress = Progress()
    if ckpt is not None:
        progress.step, progress.epoch, progress.batch, progress.best = resume.restore_training(
            ckpt, optimizer, scheduler, scaler, fresh_groups, overrides, plan, rank, world,
            args.seed)
    # `raw` is the model itself; `model`, its DDP / torch.compile wrapper, runs the forward
    raw, model, ddp = distributed.wrap_model(raw, device, world, args.compile)

    def save(name: str) -> None:
        """Every rank calls it (their random states are gathered); rank 0 writes. Only
        between optimiser steps, so no accumulated gradient is ever lost."""
        rng = resume.gather_rng(world)
        if not is_main:
            return
        state = dict(model_name=args.model, config=dataclasses.asdict(cfg),
                     model=checkpoint.model_state(raw, refs), frozen=refs,
                     frozen_modules=frozen_modules, init_seed=args.seed, step=progress.step,
                     epoch=progress.epoch, batch_in_epoch=progress.batch,
                     samples_in_epoch=progress.batch * plan.per_process * world,
                     best=progress.best, rng=rng, args=vars(args), run=settings)
        if name == "last.pt":  # the optimiser state is for resuming, which reads last.pt
            state |= dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                          scaler=scaler.state_dict())
        checkpoint.save_checkpoint(state, os.path.join(args.out, name))

    # nothing is written before this point: a run refused above leaves no folder behind
    runfolder.claim_run_folder(args.out, is_main)
    runfolder.check_run_folder(args.out, resuming)  # again, now that no other run can start here
    log = RunLog(args.out, is_main, args.tensorboard, total_steps, progress.step)
    if is_main:
        print_header(args, cfg, raw, plan, settings, len(base), total_steps, device, ckpt)
        if ckpt is not None and not resuming:
            log.say(f"continuing {resume_path} in {args.out}")
        if cache is not None:
            log.say(f"feature cache for the frozen {' and '.join(cache.parts)} encoder(s): "
                    f"{', '.join(cache.dirs.values())}")
        if getattr(base, "skipped_refs", 0):
            log.say(f"{base.skipped_refs} refs without sentences skipped")

    metrics: dict = {}
    while progress.step < total_steps and progress.epoch < epochs:
        # once the feature cache holds every image of a split, its loader reads none
        bases = {"train": loader.dataset.dataset.base}
        if val_loader is not None:
            bases["val"] = val_loader.dataset.base
        for split in data.cached_splits(cache, bases, device, world):
            without = data.build_dataset(args.dataset, split, images=False,
                                         **data.dataset_kwargs(args, split, candidates, cfg))
            if split == "train":
                loader = train_loader(without)
            else:
                val_loader = data.make_eval_loader(args, "val", raw, rank, world,
                                                   val_loader.batch_size, images=False)
            log.say(f"the feature cache holds every {split} image: reading the {split} split "
                    "without its images from now on")

        # the epoch's shuffle; a resumed epoch starts after the samples it already trained on
        sampler.set_epoch(progress.epoch, progress.batch * plan.per_process)
        log.start_epoch(progress.epoch, steps_per_epoch, progress.batch // plan.accum)
        train_one_epoch(model, raw, ddp, loader, optimizer, scheduler, scaler, progress, plan,
                        micro_per_epoch, total_steps, settings["clip_grad"], device, world,
                        cache, args, log, save)
        log.end_epoch()

        # End of an epoch, or of the run (--max-steps may stop it mid-epoch: last.pt then says
        # where to continue): validate, keep the best model as best.pt, write last.pt.
        if progress.batch >= micro_per_epoch:
            progress.epoch, progress.batch = progress.epoch + 1, 0
        results = ""
        if val_loader is not None:
            metrics = evaluate(raw, val_loader, device, args.amp, cache=cache)
            log.record(dict(step=progress.step, epoch=progress.epoch, time=log.elapsed(),
                            val=percent(metrics), candidates=settings["candidates"]))
            results = ": val " + metrics_line(percent(metrics))
            if metrics["mIoU"] > progress.best:
                progress.best = metrics["mIoU"]
                save("best.pt")
            log.meter.read()  # validation time is not training throughput
        log.say(f"epoch {progress.epoch} step {progress.step}/{total_steps} "
                f"({log.time_left(progress.step)}){results}")
        save("last.pt")

    # The data counts over all ranks: a data problem shows here, not as a slightly worse number.
    log.close()
    truncated, skipped = distributed.all_sum([progress.truncated, progress.skipped], device, world)
    log.say(f"done: {progress.step} steps in {log.elapsed():.0f}s; {int(truncated)} sentences "
            f"truncated to the model's limit; {int(skipped)} undecodable images skipped; "
            f"checkpoints in {args.out}")
    if world > 1:  # no rank leaves while another still writes
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    runfolder.release_run_folder(args.out)
    return metrics


def train_one_epoch(model, raw, ddp, loader, optimizer, scheduler, scaler, progress: Progress,
                    plan: BatchPlan, micro_per_epoch: int, total_steps: int, clip_grad: float,
                    device, world: int, cache, args, log: RunLog, save) -> None:
    """Optimiser steps from `progress` until the epoch or the run ends. A step sums the
    gradients of `plan.accum` micro-batches: each loss is scaled by 1/accum, so that the sum is
    the mean over the step's samples, as one batch `accum` times larger would give."""
    model.train()
    batches = iter(loader)
    micro, good, parts = 0, True, {}  # micro-batches of this step, all finite, loss sums
    while progress.batch < micro_per_epoch:
        waited = time.perf_counter()
        batch = next(batches, None)
        log.meter.wait += time.perf_counter() - waited  # the loader kept us waiting
        if batch is None:
            break
        progress.batch += 1
        progress.truncated += batch["truncated"]
        progress.skipped += batch["skipped"]
        micro += 1
        if micro == 1:  # a new step: gradients start from nothing, then sum over micro-batches
            optimizer.zero_grad(set_to_none=True)
        # DDP all-reduces the gradients in the last micro-batch's backward only (no_sync before)
        with nullcontext() if ddp is None or micro == plan.accum else ddp.no_sync():
            # to the device: every tensor, uint8 images normalised there
            batch = data.to_device(batch, device, raw.input_spec)
            with distributed.autocast(device, args.amp):  # forward with the target: the loss
                feats = frozen_features(raw, batch, cache)  # cached, or once per image
                out = model(**raw.inputs_from(batch), **feats, target=batch["mask"])
            finite = distributed.all_finite(out["loss"], world)  # all ranks agree, or DDP hangs
            if finite:
                scaler.scale(out["loss"] / plan.accum).backward()
        good = good and finite
        for k, v in out.items():  # the step's loss terms, as means over its samples
            if k.startswith("loss"):
                parts[k] = parts.get(k, 0.0) + v.detach().float() / plan.accum
        log.meter.samples += plan.per_process * world
        if micro < plan.accum:  # more micro-batches to sum before this step
            continue
        micro = 0
        if not good:  # skip the step; stop after --max-bad-steps in a row
            progress.bad_steps += 1
            warnings.warn(f"non-finite loss at step {progress.step}: step skipped "
                          f"({progress.bad_steps}/{args.max_bad_steps} in a row)", stacklevel=1)
            if progress.bad_steps >= args.max_bad_steps:
                raise FloatingPointError(
                    f"{progress.bad_steps} consecutive non-finite losses at step "
                    f"{progress.step}: stopping. The last good checkpoint is "
                    f"{os.path.join(args.out, 'last.pt')}; try a lower --lr or --amp none.")
            good, parts = True, {}
            continue
        progress.bad_steps = 0
        # unscale (fp16), clip the global gradient norm (0: off), step, advance the schedule
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in raw.parameters() if p.grad is not None],
            clip_grad if clip_grad > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.step += 1
        rec = None  # reading a loss or the gradient norm waits for the device: only log steps do
        if log.is_main and (progress.step % args.log_every == 0 or progress.step == 1):
            rec = dict(step=progress.step, epoch=progress.epoch, lr=scheduler.get_last_lr()[0],
                       time=log.elapsed(), truncated_sentences=progress.truncated,
                       skipped_images=progress.skipped,
                       **{k: round(v.item(), 5) for k, v in parts.items()},
                       grad_norm=round(grad_norm.item(), 5), **log.meter.read(),
                       memory_mb=memory_mb(device))
            if scaler.is_enabled():  # fp16: a step with inf gradients halved the scale
                rec["loss_scale"] = scaler.get_scale()
        log.step(progress.step, rec)
        if progress.step >= total_steps:  # the run's end; main writes the last checkpoint
            break
        if args.ckpt_every and progress.step % args.ckpt_every == 0:  # resume close to a crash
            save("last.pt")
        good, parts = True, {}


CONFIG_HELP = ("a key of the model's CONFIGS: maris: tiny, paper, paper-vit-b; mmnet: tiny, "
               "tiny-rn, paper, paper-rn50, paper-rn101, paper-vit-l; m3dec: tiny, paper "
               "(= paper-cnn), paper-swin; mail: tiny, paper, paper-416, paper-gref, "
               "paper-unimodal")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="maris", choices=runconfig.MODELS)
    p.add_argument("--config", default="tiny", help=CONFIG_HELP)
    data.add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--image-weights", default=None, help="local image-encoder weights (see README)")
    g.add_argument("--text-weights", default=None, help="local text-encoder weights / vocabulary")
    g.add_argument("--freeze-encoders", action="store_true",
                   help="freeze encoders even without weights")
    g.add_argument("--random-init", action="store_true",
                   help="allow a paper config without the encoder files its paper starts from")
    g.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=cli.at_least(1), default=None,
                   help="default: the config's")
    g.add_argument("--max-steps", type=cli.at_least(1), default=None,
                   help="stop after this many steps")
    g.add_argument("--batch-size", type=cli.at_least(1), default=None,
                   help="per process (default: the config's global batch / world / accum)")
    g.add_argument("--accum-steps", type=cli.at_least(1), default=None,
                   help="micro-batches per optimiser step (gradient accumulation; default 1)")
    g.add_argument("--global-batch", type=cli.at_least(1), default=None,
                   help="world x batch x accum, exactly (see common.runconfig.plan_batches)")
    g.add_argument("--sentences-per-image", type=cli.at_least(1), default=1, metavar="K",
                   help="form batches of K sentences of each image (default 1: any sentences, "
                        "the papers' sampling); a frozen image encoder then runs once per image "
                        "of a batch (see common.samplers.TrainSampler)")
    g.add_argument("--lr", type=cli.number(0.0), default=None, help="default: the config's")
    g.add_argument("--clip-grad", type=cli.number(0.0, strict=False), default=None,
                   help="max gradient norm, 0: off (default: the config's clip_grad)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="mixed precision (default bf16 on CUDA, none on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and "
                   "of the data order")
    g.add_argument("--max-bad-steps", type=cli.at_least(1), default=5,
                   help="stop after this many consecutive non-finite losses")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default runs/MODEL-CONFIG-DATASET)")
    g.add_argument("--resume", default=None,
                   help="auto (OUT/last.pt if present) or a checkpoint path")
    g.add_argument("--resume-override", default=None, metavar="FIELD[,FIELD]",
                   help="resume with these settings changed (see common.resume)")
    g.add_argument("--ckpt-every", type=cli.at_least(0), default=0,
                   help="also write last.pt every N optimiser steps")
    g.add_argument("--self-contained-checkpoints", action="store_true",
                   help="store frozen encoders' weights in checkpoints, not their file references")
    g.add_argument("--log-every", type=cli.at_least(1), default=20,
                   help="a log record (and a console line without a terminal) every N steps")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard logs in OUT/tb (default: on when it is installed)")
    g.add_argument("--eval-batch-size", type=cli.at_least(1), default=None,
                   help="validation batch per process (default: --batch-size)")
    g.add_argument("--no-val", action="store_true", help="skip per-epoch validation")
    g.add_argument("--no-augment", action="store_true",
                   help="no training augmentation (the config's hflip)")
    g.add_argument("--workers", type=cli.at_least(0), default=None,
                   help="data-loading processes per rank")
    g.add_argument("--cache-features", default=None, metavar="DIR",
                   help="keep frozen encoders' features on disk and train from them (README)")
    g.add_argument("--cache-storage", choices=("fp16", "bf16", "int8"), default="fp16",
                   help="how cached features are stored (int8: per-channel scales, half the "
                        "disk; see common.cache)")
    g.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    g.add_argument("--channels-last", action="store_true",
                   help="keep 4-D weights, and so the convolutions' activations, channels-last "
                        "(NHWC): faster convolutions and upsampling on CPU (oneDNN) and CUDA; "
                        "the same model, other rounding (docs/speed.md)")
    return p.parse_args(argv)


def run() -> None:
    """The command line: `python train.py`, `python -m train` or, installed, `ris-train`."""
    cli.run(main)


if __name__ == "__main__":
    run()
