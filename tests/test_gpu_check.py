""".ci/gpu_check.py on a machine without a GPU: the train and eval commands it runs on CUDA run
here on the CPU (so a GPU session spends no device time on a wrong flag), its order puts the
paper-size checks first, and a time budget cuts a check instead of failing it."""

import importlib.util
import os
import sys
import time

import pytest

from common.runconfig import load_model_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_check", f"{ROOT}/.ci/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(gpu_check.PAPER_CONFIGS))
def test_the_train_and_eval_commands_run(model, tmp_path):
    out = str(tmp_path / "run")
    result, _, log = gpu_check.run(gpu_check.train_cmd(model, "tiny", out, steps=1, amp="none"),
                                   timeout=300)
    assert result == "ok", log
    result, _, log = gpu_check.run(gpu_check.eval_cmd(os.path.join(out, "last.pt"), "cpu"),
                                   timeout=300)
    assert result == "ok", log
    assert "mIoU" in log or "oIoU" in log, log


@pytest.mark.slow
def test_the_fp16_accumulation_and_resume_commands_run(tmp_path):
    out = str(tmp_path / "run")
    first, resume = gpu_check.fp16_resume_cmds("mmnet", "tiny", out, steps=1)
    for cmd in (first, resume):
        result, _, log = gpu_check.run(cmd, timeout=300)
        assert result == "ok", log
    assert "resumed at step 1" in log


def test_paper_configs_are_the_models_and_random_init_only_for_them(tmp_path):

    for model, configs in gpu_check.PAPER_CONFIGS.items():
        assert set(configs) <= set(load_model_module(model).CONFIGS), model
    assert "--random-init" in gpu_check.train_cmd("mail", "paper", "o", 1)
    assert "--random-init" not in gpu_check.train_cmd("mail", "tiny", "o", 1)
    assert gpu_check.train_cmd("mail", "tiny", "o", 1, nproc=2)[1:3] == [
        "-m", "torch.distributed.run"]


def test_the_plan_runs_paper_checks_first_and_ddp_only_on_two_gpus():
    one, two = gpu_check.plan(["mail", "maris"], gpus=1), gpu_check.plan(["mail", "maris"], gpus=2)
    assert one[0] == ("benchmark", "all", "paper", ())
    assert one[1:3] == [("train", "mail", "paper", 1), ("train", "maris", "paper-vit-b", 1)]
    assert one[3:7] == [("train", "mail", "tiny", 1), ("train", "maris", "tiny", 1),
                        ("fp16", "mail", "tiny", 1), ("fp16", "maris", "tiny", 1)]
    assert not [c for c in one if c[3] == 2]
    assert [c for c in two if c[3] == 2] == [("train", "mail", "tiny", 2),
                                           ("train", "maris", "tiny", 2)]
    trained = {(c[1], c[2]) for c in one if c[0] == "train"}
    assert trained == {("mail", c) for c in ["tiny", *gpu_check.PAPER_CONFIGS["mail"]]} | {
        ("maris", c) for c in ["tiny", *gpu_check.PAPER_CONFIGS["maris"]]}


def test_a_command_past_its_time_is_cut_not_failed_with_the_processes_it_started(tmp_path):
    flag = tmp_path / "grandchild_ran_on"
    grandchild = f"import time; time.sleep(3); open({str(flag)!r}, 'w')"
    child = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
             f"{grandchild!r}]); time.sleep(30)")
    result, secs, log = gpu_check.run([sys.executable, "-c", child], timeout=1)
    assert result == "cut" and secs < 20 and "stopped after 1s" in log
    time.sleep(4)
    assert not flag.exists()  # the grandchild was stopped with its parent
    assert gpu_check.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)[0] == "FAILED"
