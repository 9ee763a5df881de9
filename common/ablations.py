"""The synthetic ablation table (README, "Ablations on the synthetic data").

For each model: the tiny config trained as the full model and once per row of its module's
`ABLATIONS` (config overrides named after the paper's ablation rows), every run with the same
seed, data and number of steps; then every run's last.pt evaluated on the synthetic val split in
one comparison table (`eval.py --checkpoint RUN/last.pt=LABEL ...`), printed and written to
OUT/<model>.json, and as markdown to OUT/ablations.md (the README's tables).

  python -m common.ablations --model all --max-steps 300 --out runs/ablations

Each run is its own process (`train.py`), so one run's memory and threads never affect the next.
A run whose folder already holds last.pt at the asked step is kept, so the command continues
after an interruption. It shows each switch working end to end and what each component does at
small scale; small-scale results need not match the papers' tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import torch

from common import cli
from common.checkpoint import load_checkpoint
from common.runconfig import MODELS, load_model_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slug(label: str) -> str:
    """A row's label as a folder name: "w/o IMI" -> "wo-imi"."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower().replace("/", "")).strip("-") or "row"


def rows(model: str, only: str | None = None) -> dict[str, dict[str, object]]:
    """{"full": {}, LABEL: overrides, ...} from the model module's ABLATIONS (a row without
    overrides is the full model, already first); `only`: the labels this regex finds."""
    module = load_model_module(model)
    table = {label: o for label, o in getattr(module, "ABLATIONS", {}).items() if o}
    return {"full": {}} | {k: v for k, v in table.items() if only is None or re.search(only, k)}


def trained_to(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "last.pt")
    return os.path.isfile(path) and load_checkpoint(path)["step"] >= steps


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ablate(model: str, args) -> str:
    """Train every row of one model (those not yet trained) and compare them; returns the
    comparison's JSON path."""
    runs = []
    for label, overrides in rows(model, args.only).items():
        out = os.path.join(args.out, model, slug(label))
        if not trained_to(out, args.max_steps):
            # an interrupted run continues from its last checkpoint
            resume = ["--resume", "auto"] if os.path.isfile(os.path.join(out, "last.pt")) else []
            sets = [f"--set={field}={value}" for field, value in overrides.items()]
            run([sys.executable, "train.py", "--model", model, "--max-steps", str(args.max_steps),
                 "--seed", str(args.seed), "--workers", "0", "--no-val", "--out", out,
                 *resume, *sets, *args.train_args])
        runs.append(f"{os.path.join(out, 'last.pt')}={label}")
    report = os.path.join(args.out, f"{model}.json")
    run([sys.executable, "eval.py", "--checkpoint", *runs, "--split", "val", "--json", report])
    return report


def markdown(report: str) -> str:
    """One comparison JSON (eval.py --json) as the README's markdown table (val, in %)."""
    with open(report) as f:
        rows = json.load(f)["checkpoints"]
    types = list(rows[0]["splits"]["val"].get("by_type", {}))
    lines = ["| row | switches | mIoU | oIoU | Pr@0.5 | Pr@0.9 | "
             + " | ".join(types) + " |", "|---" * (6 + len(types)) + "|"]
    for r in rows:
        m = r["splits"]["val"]
        changes = ", ".join(f"`{k}={v}`" for k, v in r["changes"].items()) or "-"
        cells = [r["label"], changes] + [f"{100 * m[k]:.1f}" for k in ("mIoU", "oIoU", "Pr@0.5",
                                                                    "Pr@0.9")]
        cells += [f"{100 * m['by_type'][t]['mIoU']:.1f}" for t in types]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", help="a model name or all")
    p.add_argument("--max-steps", type=int, default=300, help="optimiser steps of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="only the ABLATIONS rows whose label this finds (the full model always)")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more train.py flags for every run (e.g. -- --batch-size 8)")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    names = MODELS if args.model == "all" else [args.model]
    torch.set_num_threads(1)  # this process only waits for its children
    reports = [ablate(name, args) for name in names]
    tables = "\n\n".join(f"{os.path.basename(path)[:-5]}\n\n{markdown(path)}" for path in reports)
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write(tables + "\n")
    print(f"tables (markdown): {os.path.join(args.out, 'ablations.md')}", flush=True)
    return reports


if __name__ == "__main__":
    cli.run(main)  # a user's error: one line and exit status 2
