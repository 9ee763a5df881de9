"""GPU check: every model's tiny and paper configs train a few bf16 steps on one GPU, fp16 with
gradient accumulation resumes, 2-process DDP runs where two GPUs exist, the evaluation runs on the
GPU, and the benchmark table is printed.

    python .ci/gpu_check.py                   # needs CUDA; prints one table, exits 1 on a failure
    python .ci/gpu_check.py --budget 480      # stop starting checks after 8 minutes
    python .ci/gpu_check.py --steps 3 --models maris mmnet --json rows.json

Not part of the CPU test suite (CI machines have no GPU; tests/test_gpu_check.py runs its train
and eval commands on the CPU). Paper configs start from random weights (`--random-init`): this
checks that the paper path runs, not what it learns. Each check is its own process, so a crash
or an out-of-memory in one does not hide the others. Checks run most informative first (the
paper-size benchmark in bf16, then each model's paper config, its tiny config, fp16 with gradient
accumulation and a resume, DDP, the other paper configs, the tiny benchmark, channels-last), so
that a time budget drops the least: a check cut by the budget, or not started, is reported as
such, not as a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = {"maris": ["paper-vit-b", "paper"],
                 "mmnet": ["paper", "paper-rn101", "paper-vit-l"],
                 "m3dec": ["paper-cnn", "paper-swin"],
                 "mail": ["paper", "paper-416"]}
MIN_START = 30  # seconds of budget a check needs left to be started


def run(cmd: list[str], timeout: float) -> tuple[str, float, str]:
    """Run one command from the repository root: (result, seconds, its output); result is
    "ok", "FAILED" or "cut" (stopped at `timeout`, with every process it started: the
    benchmark's rows and torchrun's workers would otherwise hold the GPU)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        result = "ok" if proc.returncode == 0 else "FAILED"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        result, out = "cut", f"stopped after {timeout:.0f}s\n{out}"
    return result, time.time() - t0, out.strip()


def last_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.splitlines()[-n:])


def train_cmd(model: str, config: str, out: str, steps: int, nproc: int = 1,
              amp: str = "bf16") -> list[str]:
    """train.py for a few steps on synthetic data (it picks CUDA when there is one)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["train.py", "--model", model, "--config", config, "--amp", amp,
                      "--max-steps", str(steps), "--batch-size", "2", "--no-val",
                      "--shapes-train-size", "64", "--shapes-image-size", "256", "--out", out]
    return cmd + (["--random-init"] if config != "tiny" else [])


def fp16_resume_cmds(model: str, config: str, out: str, steps: int) -> list[list[str]]:
    """fp16 with its GradScaler and 2-step gradient accumulation, then one more step resumed
    from that run's last.pt (optimiser, scaler and RNG states restored)."""
    first = train_cmd(model, config, out, steps, amp="fp16") + ["--accum-steps", "2"]
    return [first, train_cmd(model, config, out, steps + 1, amp="fp16") + [
        "--accum-steps", "2", "--resume", "auto", "--resume-override", "max_steps"]]


def eval_cmd(checkpoint: str, device: str = "cuda") -> list[str]:
    return [sys.executable, "eval.py", "--checkpoint", checkpoint, "--shapes-eval-size", "16",
            "--device", device]


def benchmark_cmd(config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "common.benchmark", "--model", "all", "--config", config,
            "--device", "cuda", "--amp", "bf16", *extra]


def plan(models: list[str], gpus: int) -> list[tuple]:
    """The checks in the order they run: (kind, model, config, nproc or benchmark flags)."""
    first = [("train", m, PAPER_CONFIGS[m][0], 1) for m in models]
    tiny = [("train", m, "tiny", 1) for m in models]
    fp16 = [("fp16", m, "tiny", 1) for m in models]
    ddp = [("train", m, "tiny", 2) for m in models] if gpus >= 2 else []
    rest = [("train", m, c, 1) for m in models for c in PAPER_CONFIGS[m][1:]]
    bench = [("benchmark", "all", config, flags)
             for config, flags in (("paper", ()), ("tiny", ()), ("paper", ("--channels-last",)))]
    return bench[:1] + first + tiny + fp16 + ddp + rest + bench[1:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PAPER_CONFIGS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=900, help="seconds per check at most")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds: no check starts after this, a running one is cut at it")
    p.add_argument("--no-benchmark", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 0
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"budget {args.budget:.0f}s", flush=True)
    t_start, rows = time.time(), []

    def check(model, config, what, cmd, table: bool = False) -> str:
        left = args.budget - (time.time() - t_start)
        if left < MIN_START:
            result, secs, tail = "skipped", 0.0, "budget spent"
        else:
            result, secs, tail = run(cmd, min(args.timeout, left))
        rows.append(dict(model=model, config=config, what=what, result=result,
                         seconds=round(secs, 1), tail=last_lines(tail, 20 if table else 3)))
        print(tail if table else json.dumps(rows[-1]), flush=True)  # the benchmark's own table
        return result

    with tempfile.TemporaryDirectory() as tmp:
        for kind, model, config, option in plan(args.models, gpus):
            if kind == "benchmark":
                if not args.no_benchmark:
                    check(model, config, "benchmark bf16" + " NHWC" * bool(option),
                          benchmark_cmd(config, *option), table=True)
                continue
            out = os.path.join(tmp, f"{kind}-{model}-{config}-{option}")
            if kind == "fp16":
                first, resume = fp16_resume_cmds(model, config, out, args.steps)
                if check(model, config, "train fp16 accum 2", first) == "ok":
                    check(model, config, "resume fp16", resume)
                continue
            done = check(model, config, f"train bf16 x{option}",
                         train_cmd(model, config, out, args.steps, option))
            if done == "ok" and option == 1:  # evaluate that checkpoint on the GPU
                check(model, config, "eval", eval_cmd(os.path.join(out, "last.pt")))

    print("\n| model | config | check | result | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['what']} | {r['result']} | {r['seconds']} |")
    for r in rows:
        if r["result"] == "FAILED":
            print(f"\nFAILED {r['model']}/{r['config']} {r['what']}:\n{r['tail']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["result"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
