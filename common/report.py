"""eval.py's results as a person and a program read them: the metrics table of one checkpoint,
the comparison table of several, the --json report, and how each names its candidate source
(an oracle always says it is one). Metrics arrive as fractions and are printed in percent.

Metrics (common.metrics) are computed per (image, sentence) at the image's original resolution,
in fp32 whatever --amp the model runs under: mIoU, oIoU, Pr@0.5 ... Pr@0.9, and n, the number of
samples. Data flags default to the ones the checkpoint was trained with, the candidate source of
a model that takes candidate masks (MaIL) included. --json writes, for one checkpoint, one
layout whatever the splits:
  {"model": NAME, "config": CONFIG, "checkpoint": PATH, "dataset": NAME,
   "candidates": "simulated" | "oracle" | PROPOSALS FILE NAME | null,
   "splits": {SPLIT: {"mIoU", "oIoU", "Pr@0.5", ..., "Pr@0.9", "n"}}}

Several checkpoints (--checkpoint A.pt B.pt ..., each optionally PATH=LABEL; the default label
is the checkpoint's folder and file name, runs/a/best.pt -> a/best.pt) are evaluated one after
the other on the same data, each exactly as it would be alone (its own candidate source, its
training run's data flags, which must then agree across checkpoints), and printed as one
comparison table per split: a row per checkpoint with its label, model, config, candidate
source ("oracle (upper bound)" for an oracle), the metrics, on the synthetic data the mIoU of
each sentence type (attribute, position, relation), and "changes": the config fields its
training run set with --set or --freeze-encoders to values other than its named config's.
--json then writes {"checkpoints": [ONE OBJECT PER CHECKPOINT]}, each object the layout above
plus "label", "changes" {FIELD: VALUE} and, on the synthetic data, "by_type" {TYPE: metrics}
in each split. --image, --save-mask, --save-vis and --export take one checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from common.candidates import candidate_label
from common.metrics import THRESHOLDS
from common.shapes import SENTENCE_TYPES

CANDIDATE_WORDS = {"oracle": "the annotated instances, the referred object's exact mask among "
                             "them: an upper bound, not comparable with the paper",
                   "simulated": "a simulated detector's proposals (common.proposals)"}


def candidate_title(source: str) -> str:
    """The candidate source as the results table names it: an oracle says it is one."""
    label = candidate_label(source)
    return "oracle (upper bound)" if label == "oracle" else label


def describe_candidates(source: str) -> str:
    words = CANDIDATE_WORDS.get(source, f"proposals file {source}")
    return f"{candidate_title(source)}: {words}"


def json_report(row: dict, alone: bool = False) -> dict:
    """--json's layout for one checkpoint (see the module docstring): alone, exactly the one
    layout, the synthetic data's per-type rows printed, not written; in a comparison, also its
    label, its config changes and the per-type metrics."""
    report = {
        "model": row["model"],
        "config": row["config"],
        "checkpoint": row["checkpoint"],
        "dataset": row["dataset"],
        "candidates": None if row["source"] is None else candidate_label(row["source"]),
        "splits": {split: {k: v for k, v in m.items() if not alone or k != "by_type"}
                   for split, m in row["results"].items()},
    }
    if not alone:
        report = {"label": row["label"], **report, "changes": row["changes"]}
    return report


def print_table(results: dict, title: str) -> None:
    cols = ["mIoU", "oIoU"] + [f"Pr@{t}" for t in THRESHOLDS]
    print(title)
    print(f"{'split':<10}" + "".join(f"{c:>9}" for c in cols) + f"{'n':>8}")
    row = lambda label, m: print(f"{label:<10}" + "".join(f"{100 * m[c]:>9.2f}" for c in cols)
                                 + f"{m['n']:>8}")
    for split, m in results.items():
        row(split, m)
        for stype, mt in m.get("by_type", {}).items():  # the synthetic data's sentence types
            row("  " + stype, mt)
    sys.stdout.flush()


def print_comparison(rows: list[dict]) -> None:
    """One table per split, a row per checkpoint (module docstring); on the synthetic data the
    per-type columns are each sentence type's mIoU."""
    metrics = ["mIoU", "oIoU"] + [f"Pr@{t}" for t in THRESHOLDS]
    text = lambda row: [row["label"], row["model"], str(row["config"]),
                        "-" if row["source"] is None else candidate_title(row["source"])]
    width = [max(len(h), *(len(text(r)[k]) for r in rows)) + 2
             for k, h in enumerate(("checkpoint", "model", "config", "candidates"))]
    for split in rows[0]["results"]:
        types = [t for t in SENTENCE_TYPES
                 if any(t in r["results"][split].get("by_type", {}) for r in rows)]
        print(f"{split} on {rows[0]['dataset']}" + (" (sentence types: mIoU)" if types else ""))
        head = ["checkpoint", "model", "config", "candidates"]
        print("".join(f"{h:<{w}}" for h, w in zip(head, width))
              + "".join(f"{c:>9}" for c in metrics) + "".join(f"{t:>10}" for t in types)
              + f"{'n':>8}  changes")
        for row in rows:
            m = row["results"][split]
            by_type = m.get("by_type", {})
            changes = ", ".join(f"{k}={v}" for k, v in row["changes"].items()) or "-"
            print("".join(f"{t:<{w}}" for t, w in zip(text(row), width))
                  + "".join(f"{100 * m[c]:>9.2f}" for c in metrics)
                  + "".join(f"{100 * by_type[t]['mIoU']:>10.2f}" if t in by_type else f"{'-':>10}"
                            for t in types)
                  + f"{m['n']:>8}  {changes}")
    sys.stdout.flush()


def split_label(entry: str) -> tuple[str, str]:
    """--checkpoint's PATH[=LABEL] as (path, label); without a label, the checkpoint's folder
    and file name. The label starts after the first "=" that ends an existing file's name, so
    labels may hold "=" ("N_q=24") and an existing file whose name holds "=" is a path; when no
    prefix exists, after the first "=" (the missing path is then reported)."""
    path, label = entry, None
    cuts = [i for i, c in enumerate(entry) if c == "="]
    if not os.path.isfile(entry) and cuts:
        i = next((i for i in cuts if os.path.isfile(entry[:i])), cuts[0])
        path, label = entry[:i], entry[i + 1:]
    folder = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return path, label or os.path.join(folder, os.path.basename(path))


def config_changes(ckpt: dict, module) -> dict:
    """The config fields the training run set (--set, --freeze-encoders) to values other than
    its named config's, with the checkpoint's values: what tells ablation runs of one model and
    config apart. Fields a run fills from its data or weight files (a word vocabulary, weight
    paths) are not changes of the config, so only the fields named on its command line count."""
    trained = ckpt.get("args", {})
    named = module.CONFIGS.get(trained.get("config"))
    if named is None:
        return {}
    fields = [item.partition("=")[0] for item in trained.get("set") or []]
    if trained.get("freeze_encoders"):
        fields.append("freeze_encoders")
    declared = dataclasses.asdict(named)
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # tuples may come back as lists
    return {k: ckpt["config"][k] for k in dict.fromkeys(fields)
            if k in ckpt["config"] and as_list(ckpt["config"][k]) != as_list(declared.get(k))}
