"""What a run tells: the console, log.jsonl, TensorBoard, and plots of the log.

Rank 0 alone writes. The console shows a progress bar (tqdm) when stderr is a terminal and
otherwise one compact line per log interval (`step 40/250  loss 0.8123  lr 1.0e-04  45.2
samples/s  ETA 3m05s`); log.jsonl holds one JSON record per logged step (loss terms, lr,
grad_norm, samples_per_s, data_wait, memory_mb, fp16's loss_scale) and per validation.
IoU and precision are percentages (0-100) wherever printed or logged: the console, log.jsonl,
TensorBoard and eval.py's tables. Python functions (common.metrics, eval.evaluate) return
fractions (0-1).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

from common.model import count_parameters
from common.runconfig import paper_batch_note


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


def percent(metrics: dict) -> dict:
    """common.metrics' fractions as percentages (2 decimals), "n" and per-type entries kept."""
    return {k: (v if k == "n" else percent(v) if isinstance(v, dict) else round(100 * v, 2))
            for k, v in metrics.items()}


def metrics_line(m: dict) -> str:
    """Validation metrics (percentages) in one line, each sentence type's mIoU after them."""
    return (" ".join(f"{k} {v:.2f}" for k, v in m.items() if k not in ("n", "by_type"))
            + f" (n={m['n']})" + "".join(f"; {t} mIoU {s['mIoU']:.2f} (n={s['n']})"
                                         for t, s in m.get("by_type", {}).items()))


class RunLog:
    """Rank 0's console, log.jsonl and TensorBoard for one run (other ranks: silent)."""

    def __init__(self, out: str, is_main: bool, tensorboard: bool | None, total_steps: int,
                 first_step: int):
        self.is_main, self.total, self.first = is_main, total_steps, first_step
        self.path = os.path.join(out, "log.jsonl")
        self.writer = open_tensorboard(tensorboard, out) if is_main else None
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.bar = None
        self.meter = Throughput()  # samples/s and loader waits since the last log step

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def record(self, rec: dict) -> None:
        """One record to log.jsonl and TensorBoard."""
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            tensorboard_scalars(self.writer, rec, rec["step"])

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)

    def time_left(self, step: int) -> str:
        """Elapsed time and ETA of the steps this process has trained (a resumed run's too)."""
        return time_left(time.time() - self.t0, step - self.first, self.total - step)

    def start_epoch(self, epoch: int, steps: int, done: int) -> None:
        """A progress bar over the epoch's steps (rank 0, on a terminal)."""
        from tqdm import tqdm

        self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", leave=False,
                        file=sys.stderr, disable=not (self.is_main and self.tty))

    def step(self, step: int, rec: dict | None) -> None:
        """An optimiser step done; `rec`, on logged steps, is written and shown."""
        self.bar.update(1)
        if rec is None:
            return
        self.record(rec)
        if self.tty:
            self.bar.set_postfix_str(f"loss={rec['loss']:.4f}, {self.time_left(step)}")
        else:  # no progress bar: a compact line is the progress
            self.say(f"step {step}/{self.total}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                     f"{rec['samples_per_s']:.1f} samples/s  {self.time_left(step)}")

    def end_epoch(self) -> None:
        self.bar.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def print_header(args, cfg, raw, plan, settings: dict, n_train: int,
                 total_steps: int, device, ckpt) -> None:
    """Rank 0's account of the run, before its first step (and args.json beside it)."""
    total, trainable = count_parameters(raw)
    label = settings["candidates"]
    print(f"{args.model}/{args.config}: {total / 1e6:.2f}M parameters "
          f"({trainable / 1e6:.2f}M trained); {args.dataset}: {n_train} train samples"
          + (f", candidates: {label}" + (" (upper bound)" if label == "oracle" else "")
             if label else "")
          + f"; global batch {plan.global_batch} = {plan.world} process(es) x batch "
          f"{plan.per_process} x {plan.accum} accumulation (config: {cfg.batch_size}); "
          f"{total_steps} steps; amp={args.amp}; clip_grad={settings['clip_grad']}; "
          f"augment={settings['augment']}; device={device}"
          + (f"; {args.sentences_per_image} sentences per image"
             if args.sentences_per_image > 1 else "")
          + (f"; resumed at step {ckpt['step']}" if ckpt else ""), flush=True)
    note = paper_batch_note(cfg, plan)
    if note:  # a smaller batch changes the optimisation, not only the speed
        warnings.warn(note, stacklevel=1)
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump(vars(args) | {"world_size": plan.world, "global_batch": plan.global_batch,
                                "accum_steps": plan.accum, "candidates": label,
                                "candidates_file": args.candidates}, f, indent=1)


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
    ax_val.set(xlabel="step", ylabel="val mIoU (%)")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
