"""GPU check: every model's tiny and paper configs train a few bf16 steps on one GPU, 2-process
DDP runs where two GPUs exist, the evaluation runs on the GPU, and the benchmark table is printed.

    python .ci/gpu_check.py                 # needs CUDA; prints one table, exits 1 on a failure
    python .ci/gpu_check.py --steps 3 --models maris mmnet

Not part of the CPU test suite (CI machines have no GPU). Paper configs start from random
weights (`--random-init`): this checks that the paper path runs, not what it learns. Each row is
its own process, so a crash or an out-of-memory in one row does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = {"maris": ["paper-vit-b", "paper"],
                 "mmnet": ["paper", "paper-rn101", "paper-vit-l"],
                 "m3dec": ["paper-cnn", "paper-swin"],
                 "mail": ["paper", "paper-416"]}


def run(cmd: list[str], timeout: int) -> tuple[bool, float, str]:
    """Run one command from the repository root: (ok, seconds, its output)."""
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, out = res.returncode == 0, res.stdout + res.stderr
    except subprocess.TimeoutExpired as err:
        ok, out = False, f"timed out after {timeout}s\n{err.stdout or ''}{err.stderr or ''}"
    return ok, time.time() - t0, str(out).strip()


def last_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.splitlines()[-n:])


def train_cmd(model: str, config: str, out: str, steps: int, nproc: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["train.py", "--model", model, "--config", config, "--amp", "bf16",
                      "--max-steps", str(steps), "--batch-size", "2", "--no-val",
                      "--shapes-train-size", "64", "--shapes-image-size", "256", "--out", out]
    return cmd + (["--random-init"] if config != "tiny" else [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PAPER_CONFIGS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--no-benchmark", action="store_true")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 0
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for config in ["tiny"] + PAPER_CONFIGS[model]:
                for nproc in [1] + ([2] if gpus >= 2 and config == "tiny" else []):
                    out = os.path.join(tmp, f"{model}-{config}-{nproc}")
                    ok, secs, tail = run(train_cmd(model, config, out, args.steps, nproc),
                                         args.timeout)
                    rows.append(dict(model=model, config=config, what=f"train bf16 x{nproc}",
                                     ok=ok, seconds=round(secs, 1), tail=last_lines(tail)))
                    print(json.dumps(rows[-1]), flush=True)
                    if ok and nproc == 1:  # evaluate that checkpoint on the GPU
                        ok, secs, tail = run(
                            [sys.executable, "eval.py", "--checkpoint",
                             os.path.join(out, "last.pt"), "--shapes-eval-size", "16",
                             "--device", "cuda"], args.timeout)
                        rows.append(dict(model=model, config=config, what="eval", ok=ok,
                                         seconds=round(secs, 1), tail=last_lines(tail)))
                        print(json.dumps(rows[-1]), flush=True)
        if not args.no_benchmark:
            for config in ("tiny", "paper"):
                ok, secs, tail = run([sys.executable, "eval.py", "--benchmark", "--model", "all",
                                      "--config", config, "--device", "cuda", "--amp", "bf16"],
                                     args.timeout * 2)
                rows.append(dict(model="all", config=config, what="benchmark bf16", ok=ok,
                                 seconds=round(secs, 1), tail=last_lines(tail, 20)))
                print(tail, flush=True)  # the benchmark's own table

    print("\n| model | config | check | result | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['what']} | {'ok' if r['ok'] else 'FAILED'} "
              f"| {r['seconds']} |")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"\nFAILED {r['model']}/{r['config']} {r['what']}:\n{r['tail']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
