"""End to end on CPU: train.py (one process and a 2-process torchrun), resume, eval.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_cli
import train
from common.checkpoint import load_checkpoint
from common.shapes import SENTENCE_TYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "maris", "--shapes-train-size", "48", "--shapes-eval-size", "12",
         "--batch-size", "4", "--log-every", "1"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    train.main(SMALL + ["--epochs", "1", "--out", out])
    return out


def test_training_writes_checkpoints_and_log(trained):
    assert os.path.isfile(os.path.join(trained, "last.pt"))
    assert os.path.isfile(os.path.join(trained, "best.pt"))
    ckpt = load_checkpoint(os.path.join(trained, "last.pt"))
    assert ckpt["step"] == 12 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 0
    for key in ("optimizer", "scheduler", "scaler", "rng", "config", "best"):
        assert key in ckpt
    log = read_log(trained)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    assert log[-1]["val"]["n"] == 12


def test_resume_continues_at_the_saved_step(trained, tmp_path):
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    with (open(os.path.join(trained, "last.pt"), "rb") as src,
          open(os.path.join(out, "last.pt"), "wb") as dst):
        dst.write(src.read())
    train.main(SMALL + ["--epochs", "2", "--out", out, "--resume", "auto",
                        "--resume-override", "epochs"])  # a longer run, asked explicitly
    steps = [r["step"] for r in read_log(out) if "loss" in r]
    assert steps == list(range(13, 25))
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 24


def test_eval_cli_writes_json(trained, tmp_path):
    path = str(tmp_path / "m.json")
    eval_cli.main(["--checkpoint", os.path.join(trained, "best.pt"), "--json", path,
                   "--save-vis", str(tmp_path / "vis"), "--num-vis", "3"])
    with open(path) as f:
        report = json.load(f)
    assert report["model"] == "maris" and report["config"] == "tiny"
    assert report["candidates"] is None  # MARIS takes no candidate masks
    metrics = report["splits"]["val"]
    assert set(metrics) == {"mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "n"}
    assert metrics["n"] == 12  # the training run's --shapes-eval-size, taken from the checkpoint
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "n")
    assert len(os.listdir(tmp_path / "vis")) == 3


def test_eval_reports_each_sentence_type(trained, capsys):
    """On the synthetic data the metrics are also given per sentence type, and they add up:
    the counts sum to n and the count-weighted mIoU and Pr@0.5 are the overall ones."""
    results = eval_cli.main(["--checkpoint", os.path.join(trained, "best.pt")])
    m = results["val"]
    parts = m["by_type"].values()
    assert set(m["by_type"]) <= set(SENTENCE_TYPES)
    assert sum(p["n"] for p in parts) == m["n"]
    for key in ("mIoU", "Pr@0.5"):
        assert sum(p[key] * p["n"] for p in parts) / m["n"] == pytest.approx(m[key])
    printed = capsys.readouterr().out
    assert all(f"  {t}" in printed for t in m["by_type"])


def test_predict_one_image(trained, tmp_path):
    image = np.zeros((50, 70, 3), np.uint8)
    image[10:30, 10:30] = (215, 40, 40)
    Image.fromarray(image).save(tmp_path / "in.png")
    out = str(tmp_path / "pred.png")
    eval_cli.main(["--checkpoint", os.path.join(trained, "last.pt"), "--image",
                   str(tmp_path / "in.png"), "--text", "the red square", "--save-mask", out])
    mask = np.asarray(Image.open(out))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    assert os.path.isfile(str(tmp_path / "pred.overlay.png"))


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py"] + SMALL + ["--epochs", "1", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ckpt = load_checkpoint(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 48 // (2 * 4)  # each rank took half the data
    assert read_log(out)[-1]["val"]["n"] == 12  # every val sample counted exactly once
    assert torch.isfinite(torch.stack([v.float().sum() for v in ckpt["model"].values()])).all()
