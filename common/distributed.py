"""Processes, devices and precision: one process per GPU (or per CPU share) under torchrun.

`setup_distributed` reads torchrun's environment and joins the process group; `wrap_model` puts
the DDP (and torch.compile) wrappers around a model, `unwrap` takes them off; `autocast` is the
mixed-precision context of `--amp`; `all_finite` is the check every rank must agree on before a
backward pass (DDP hangs if one rank skips a step that another takes).
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.layers import sync_batchnorm


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


def setup_warnings(rank: int) -> None:
    """Warnings from rank 0 only (every rank builds the same model and reads the same data, so
    another rank's warnings repeat rank 0's), each on one line: "warning: MESSAGE"."""
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    if rank > 0:
        warnings.simplefilter("ignore")


def wrap_model(raw: torch.nn.Module, device: torch.device, world: int, compile: bool):
    """(the model, the module the loop calls, its DDP wrapper or None). One process per device: DDP
    averages the gradients of all ranks during backward, so every rank takes the same optimiser
    step on the global batch. torch.compile goes outermost, so that it compiles what the loop
    calls. On CUDA, BatchNorm statistics are synchronised over the global batch (MaIL Sec. 4.1):
    the conversion may replace the model's top module, so the model is returned too."""
    model, ddp = raw, None
    if world > 1:
        if device.type == "cuda":
            raw = sync_batchnorm(raw)
        model = ddp = DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return raw, model, ddp


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def memory_format(channels_last: bool) -> torch.memory_format:
    """What `Module.to(memory_format=...)` takes for --channels-last (preserve: leave as built)."""
    return torch.channels_last if channels_last else torch.preserve_format


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp none: fp32


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (every rank must skip the same step, or DDP
    would hang)."""
    finite = torch.isfinite(loss.detach()).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() == 1


def all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """Numbers summed over ranks (every rank calls it)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_agree(flag: bool, device: torch.device, world: int) -> bool:
    """True when `flag` holds on every rank (every rank calls it)."""
    if world == 1:
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def pick_device(requested: str | None, rank_device: torch.device, world: int) -> torch.device:
    """--device, or the process's own device (setup_distributed: its GPU,
    else the CPU). Under torchrun each process keeps its own device, whose type must be the
    requested one."""
    if requested is None:
        return rank_device
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: no CUDA device is available here")
    if world > 1:
        if device.type != rank_device.type:
            raise ValueError(f"--device {requested} under torchrun: each process uses "
                             f"{rank_device.type} (its own GPU when there is one); hide the GPUs "
                             "(CUDA_VISIBLE_DEVICES=) to evaluate on CPUs")
        return rank_device
    return device
