"""Killed runs, non-finite losses and distributed evaluation lose nothing (real processes)."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import build

import eval as eval_cli
import maris
import train
from common.checkpoint import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--model", "maris", "--shapes-train-size", "24", "--batch-size", "4", "--epochs", "2",
       "--no-val", "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def cli(*args):
    return [sys.executable, os.path.join(ROOT, "train.py"), *args]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *args[:-1], os.path.join(ROOT, "train.py"), *args[-1]]


def weights(path):
    return load_checkpoint(path)["model"]


def logged_steps(out):
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if '"loss"' in line]
    except FileNotFoundError:
        return []


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_gives_identical_weights(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(cli(*RUN, "--out", ref), env=ENV, check=True, capture_output=True, timeout=600)
    rnd = random.Random(0)
    kills = 0
    for target_step in (2, 5, 9):  # kill three times, at random moments after these steps
        proc = subprocess.Popen(cli(*RUN, "--ckpt-every", "1", "--resume", "auto", "--out", run),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while ((not logged_steps(run) or logged_steps(run)[-1] < target_step)
               and proc.poll() is None):
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rnd.uniform(0, 0.4))  # anywhere: mid-step, mid-checkpoint-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    done = subprocess.run(cli(*RUN, "--ckpt-every", "1", "--resume", "auto", "--out", run),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stdout
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 12
    assert_same_weights(weights(os.path.join(ref, "last.pt")),
                        weights(os.path.join(run, "last.pt")))
    assert not [f for f in os.listdir(run) if ".tmp." in f]


def children(pid):
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return kids


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_worker_dies(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "restarted")
    args = RUN + ["--ckpt-every", "1", "--resume", "auto"]
    res = subprocess.run(torchrun([*args, "--out", ref]), env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(torchrun("--max-restarts", "1", [*args, "--out", run]), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while (not logged_steps(run) or logged_steps(run)[-1] < 3) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    workers = children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed at step" in out
    assert load_checkpoint(os.path.join(run, "last.pt"))["step"] == 6
    assert_same_weights(weights(os.path.join(ref, "last.pt")),
                        weights(os.path.join(run, "last.pt")))


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    forward = maris.MARIS.forward
    calls = {"n": 0}

    def sometimes_nan(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls["n"] += 1
        if "loss" in out and (calls["n"] in (3, 4) or calls["n"] > 8):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(maris.MARIS, "forward", sometimes_nan)
    out = str(tmp_path / "nan")
    args = ["--model", "maris", "--shapes-train-size", "40", "--batch-size", "4", "--no-val",
            "--log-every", "1", "--max-bad-steps", "3", "--out", out, "--ckpt-every", "1"]
    with pytest.warns(UserWarning, match="non-finite loss"):
        with pytest.raises(FloatingPointError, match="consecutive non-finite losses"):
            train.main(args)
    # calls 3 and 4 were skipped (steps 3, 4 are the 5th and 6th calls), then calls 9-11 failed
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    ckpt = load_checkpoint(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 6 and all(torch.isfinite(v.float()).all()
                                     for v in ckpt["model"].values())


@pytest.mark.slow
def test_distributed_evaluation_equals_one_process(tmp_path):
    model = build("maris")
    path = str(tmp_path / "c.pt")
    # 13 samples: not divisible by 2 processes
    args = dict(dataset="shapes", shapes_eval_size=13, shapes_image_size=128, data_seed=0,
                split_by=None, data_root=None, image_dir=None, seed=0)
    save_checkpoint(dict(model_name="maris", config=dataclasses.asdict(model.cfg),
                               model=model.state_dict(), args=args), path)
    one = eval_cli.main(["--checkpoint", path, "--batch-size", "4"])["val"]
    two_json = str(tmp_path / "two.json")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(ROOT, "eval.py"), "--checkpoint", path,
                          "--batch-size", "4", "--json", two_json],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(two_json) as f:
        two = json.load(f)["splits"]["val"]  # eval.py's one --json layout
    assert one["n"] == two["n"] == 13
    by_type = one.pop("by_type")  # printed, not in the JSON: compare the printed rows
    assert two == pytest.approx(one, rel=1e-12, abs=1e-12)
    assert sum(m["n"] for m in by_type.values()) == 13
    for stype, m in by_type.items():
        row = [r.split() for r in res.stdout.splitlines() if r.split()[:1] == [stype]]
        assert len(row) == 1 and int(row[0][-1]) == m["n"], res.stdout
        columns = ("mIoU", "oIoU") + tuple(f"Pr@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9))
        assert [float(v) for v in row[0][1:-1]] == pytest.approx([100 * m[c] for c in columns],
                                                                 abs=0.006)


def test_an_interrupted_accumulating_run_resumes_exactly(tmp_path, monkeypatch):
    """With --accum-steps 2 a checkpoint is written only between optimiser steps (never with
    half a gradient accumulated): a run stopped in its 4th step, after last.pt of step 2, then
    resumed mid-epoch (step 3 again, then step 4), ends with the weights of a run never stopped."""
    args = ["--model", "maris", "--shapes-train-size", "16", "--batch-size", "2",
            "--accum-steps", "2", "--epochs", "1", "--no-val", "--log-every", "1",
            "--ckpt-every", "2", "--no-tensorboard", "--resume", "auto"]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    train.main(args + ["--out", ref])
    clip = torch.nn.utils.clip_grad_norm_  # called once per optimiser step, before it steps
    calls = {"n": 0}

    def stop_in_step_4(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return clip(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", run])
    stopped = load_checkpoint(os.path.join(run, "last.pt"))
    assert stopped["step"] == 2 and stopped["batch_in_epoch"] == 4  # micro-batches
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train.main(args + ["--out", run])
    done = load_checkpoint(os.path.join(run, "last.pt"))
    assert done["step"] == 4 and done["epoch"] == 1 and done["batch_in_epoch"] == 0
    assert_same_weights(weights(os.path.join(ref, "last.pt")), done["model"])
