"""--channels-last (train.py, eval.py, the benchmark): the same model in another memory layout.

Consistency checks, not fidelity ones: a channels-last run must compute what the default layout
computes, up to rounding, and the layout must really be in use (else the flag would be a no-op
that these comparisons cannot tell from a working one). DDP with channels-last gradients:
tests/test_train_stack.py::test_ddp_accumulation_equals_one_process[mmnet-True].
"""

import json
import os

import pytest
import torch
from helpers import build, make_batch

import eval as evaluate
import train
from common.benchmark import bench_model
from common.checkpoint import load_checkpoint
from common.distributed import memory_format

# MaIL: its segmentation head is 3x3 convs and bilinear upsampling, what the layout speeds up
SMALL = ["--model", "mail", "--shapes-train-size", "8", "--shapes-eval-size", "4",
         "--batch-size", "4", "--log-every", "1", "--workers", "0", "--epochs", "1"]
HEAD_CONV = "head.blocks.0.0.weight"  # a 3x3 convolution, (C_out, C_in, 3, 3)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    out = {k: str(root / k) for k in ("nchw", "nhwc")}
    train.main(SMALL + ["--out", out["nchw"]])
    train.main(SMALL + ["--out", out["nhwc"], "--channels-last"])
    return out


def test_a_channels_last_run_trains_the_same_model(runs):
    nchw = load_checkpoint(os.path.join(runs["nchw"], "last.pt"))["model"]
    nhwc = load_checkpoint(os.path.join(runs["nhwc"], "last.pt"))["model"]
    conv = nhwc[HEAD_CONV]
    assert conv.dim() == 4 and min(conv.shape[:2]) > 1  # a layout-sensitive tensor
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nchw[HEAD_CONV].is_contiguous()
    assert losses(runs["nhwc"]) == pytest.approx(losses(runs["nchw"]), rel=1e-4)
    assert nchw.keys() == nhwc.keys()  # (Adam's steps amplify rounding: weights are not compared)


@pytest.mark.parametrize("name", ["mail", "m3dec", "mmnet"])
def test_channels_last_gives_the_same_loss_and_gradients(name):
    """A forward and backward of the same weights in both layouts (the models with convolution
    stacks), BatchNorm on its running statistics: train-mode BatchNorm over 2 samples would
    amplify rounding to ~1e-4 and hide a layout bug that this 1e-5 bound catches."""
    grads = {}
    for nhwc in (False, True):
        model = build(name).to(memory_format=memory_format(nhwc)).eval()
        batch = make_batch(model, n=2, image_size=model.input_spec.size)
        loss = model(**model.inputs_from(batch), target=batch["mask"])["loss"]
        loss.backward()
        grads[nhwc] = loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                if p.grad is not None])
    (l0, g0), (l1, g1) = grads[False], grads[True]
    assert torch.allclose(l0, l1, rtol=1e-6) and g0.shape == g1.shape
    assert (g0 - g1).norm() <= 1e-5 * g0.norm()


def test_eval_reads_any_checkpoint_in_either_layout(runs, tmp_path):
    """A checkpoint written channels-last evaluates alike with and without the flag."""
    got = {}
    for flag in ([], ["--channels-last"]):
        path = str(tmp_path / f"m{len(flag)}.json")
        evaluate.main(["--checkpoint", os.path.join(runs["nhwc"], "last.pt"), "--split", "val",
                       "--workers", "0", "--json", path] + flag)
        with open(path) as f:
            got[len(flag)] = json.load(f)["splits"]["val"]
    assert got[0]["n"] == got[1]["n"] == 4
    assert got[1]["mIoU"] == pytest.approx(got[0]["mIoU"], abs=1e-3)


def test_the_benchmark_row_counts_the_same_flops_in_either_layout():
    row = lambda nhwc: bench_model("mail", "tiny", torch.device("cpu"), 2, "none", 0, 1,
                                   False, False, channels_last=nhwc)
    nchw, nhwc = row(False), row(True)
    assert nhwc["model"] == "mail NHWC" and nchw["model"] == "mail"
    assert nhwc["step_GFLOPs"] == pytest.approx(nchw["step_GFLOPs"], rel=1e-9)
    assert nhwc["step_ms"] > 0 and nhwc["MFU"] > 0
