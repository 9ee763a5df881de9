"""eval.py's results as a person and a program read them: the metrics table of one checkpoint,
the comparison table of several, the --json report, and how each names its candidate source
(an oracle always says it is one). Metrics arrive as fractions and are printed in percent."""

from __future__ import annotations

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
