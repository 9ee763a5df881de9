"""Mixed precision: every model trains under bf16 and fp16 autocast (the CUDA default is bf16),
and M3Dec's token BatchNorm keeps fp32 statistics and synchronises them across processes.

CPU autocast runs the same dtype rules as CUDA's, so a dtype error a GPU run would hit first
(M3Dec's `running_mean.lerp_` on bf16 statistics) fails here. bf16 matmul is ~600x slower than
fp32 on this CPU: batches of two, tiny configs.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import MODEL_NAMES, build, make_batch

import data
import train
from common.checkpoint import load_checkpoint
from common.distributed import cuda_index
from common.layers import TokenBatchNorm, sync_batchnorm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def ready(model, n: int = 2) -> dict:
    batch = make_batch(model, n=n)
    return data.to_device(batch, "cpu", model.input_spec)  # a no-op if already normalised


@pytest.mark.slow
@pytest.mark.parametrize("amp", sorted(DTYPES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_two_training_steps_under_autocast_are_finite(name, amp):
    """Two optimiser steps as train.py takes them (autocast forward, GradScaler for fp16 only):
    the losses and the unscaled gradients of the steps taken are finite, both update the weights,
    and the autocast forward is close to the fp32 one (consistency of our code under autocast).
    fp16's GradScaler starts at a loss scale of 65536, whose scaled gradients may overflow: it
    then skips the step and halves the scale, as in train.py; that is allowed, bf16 overflow not."""
    model = build(name)
    batch = ready(model)
    inputs = model.inputs_from(batch)
    with torch.no_grad():
        ref = model.eval()(**inputs)["mask_logits"]
        with torch.autocast("cpu", dtype=DTYPES[amp]):
            low = model(**inputs)["mask_logits"].float()
    # sigmoid probabilities: bf16 keeps 8 bits of mantissa, so ~1e-2 of slack
    assert (low.sigmoid() - ref.sigmoid()).abs().max() < 2e-2

    model.train()
    opt, _ = model.configure_optimizers(1e-3, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    steps = tries = 0
    while steps < 2:
        tries += 1
        assert tries <= 6, "fp16: the loss scale never got small enough for finite gradients"
        before = [p.detach().clone() for p in model.trainable_parameters()]
        with torch.autocast("cpu", dtype=DTYPES[amp]):
            out = model(**inputs, target=batch["mask"])
        assert torch.isfinite(out["loss"]), out["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)
        grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
        finite = bool(grads) and all(torch.isfinite(g).all() for g in grads)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)  # GradScaler skips the step silently on inf/NaN
        scaler.update()
        after = list(model.trainable_parameters())
        if not finite:  # only fp16's loss scale may overflow: the step is skipped, the scale halved
            assert amp == "fp16" and scaler.get_scale() < scale
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            continue
        assert any(not torch.equal(a, b) for a, b in zip(after, before))
        steps += 1
        assert all(torch.isfinite(p).all() for p in after)


@pytest.mark.slow
@pytest.mark.parametrize("amp", sorted(DTYPES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_cli_runs_under_autocast(name, amp, tmp_path):
    """`python train.py --model X --amp bf16|fp16` takes a step and writes a checkpoint."""
    out = tmp_path / "run"
    train.main(["--model", name, "--amp", amp, "--max-steps", "1", "--batch-size", "2",
                "--shapes-train-size", "8", "--no-val", "--workers", "0", "--out", str(out)])
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_run_resumes_in_another_precision(tmp_path):
    """An fp32 (or bf16) run saved no loss scaler: resumed as fp16 (`--resume-override amp`) it
    starts one; resumed back, the fp16 run's scaler is dropped."""
    args = ["--model", "mmnet", "--batch-size", "2", "--shapes-train-size", "8", "--no-val",
            "--workers", "0", "--log-every", "1", "--out", str(tmp_path / "run")]
    train.main(args + ["--max-steps", "1"])
    train.main(args + ["--max-steps", "2", "--amp", "fp16", "--resume", "auto",
                       "--resume-override", "amp,max_steps"])
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["step"] == 2 and ckpt["scaler"]["scale"] > 0
    train.main(args + ["--max-steps", "3", "--resume", "auto",
                       "--resume-override", "amp,max_steps"])
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["step"] == 3 and ckpt["scaler"] == {}
    with open(tmp_path / "run" / "log.jsonl") as f:
        steps = [json.loads(line) for line in f if '"step"' in line]
    assert ["loss_scale" in r for r in steps if "loss" in r] == [False, True, False]


def test_cuda_index_maps_local_rank_to_a_visible_gpu():
    """torchrun shows each process all the node's GPUs, SLURM's --gpus-per-task=1 only its own."""
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="at most one process per GPU"):
        cuda_index(2, 2)


def test_token_batchnorm_statistics_stay_fp32_under_autocast():
    """The bf16 crash of M3Dec (`expected dtype float for 'end'`): statistics and running
    buffers are fp32, the output keeps the input's dtype, and it matches the fp32 result."""
    torch.manual_seed(0)
    bn = TokenBatchNorm(8)
    x = torch.randn(3, 5, 8) * 3 + 1
    mask = torch.rand(3, 5) > 0.3
    ref = bn(x, mask)
    ref_mean = bn.running_mean.clone()
    bn.running_mean.zero_(), bn.running_var.fill_(1)
    y = bn(x.bfloat16(), mask)
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    assert torch.allclose(y.float(), ref, atol=5e-2)
    assert torch.allclose(bn.running_mean, ref_mean, atol=2e-2)
    assert (y[~mask] == 0).all()  # padding stays zero


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, x: torch.Tensor, mask: torch.Tensor,
                 results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = sync_batchnorm(torch.nn.ModuleList([TokenBatchNorm(x.shape[-1])]))[0]
        part = x[rank::world].clone().requires_grad_(True)
        y = bn(part, mask[rank::world])
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        results[rank] = (y.detach(), part.grad, bn.running_mean.clone(), bn.running_var.clone())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_synchronised_token_batchnorm_equals_one_process_on_the_global_batch():
    """Two gloo processes, each with half of the batch, give the outputs, input gradients and
    running statistics of one process on the whole batch (what SyncBatchNorm promises)."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8) * 2 + 0.5
    mask = torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(2, _free_port(), x, mask, results), nprocs=2)
        results = dict(results)

    bn = TokenBatchNorm(8)
    full = x.clone().requires_grad_(True)
    y = bn(full, mask)
    weights = torch.cat([torch.arange(y[r::2].numel()).view_as(y[r::2]).sin() for r in (0, 1)])
    order = torch.cat([torch.arange(4)[r::2] for r in (0, 1)])
    (y[order] * weights).sum().backward()
    for rank in (0, 1):
        y_r, g_r, mean_r, var_r = results[rank]
        assert torch.allclose(y_r, y[rank::2].detach(), atol=1e-5)
        assert torch.allclose(g_r, full.grad[rank::2], atol=1e-5)
        assert torch.allclose(mean_r, bn.running_mean, atol=1e-6)
        assert torch.allclose(var_r, bn.running_var, atol=1e-6)
