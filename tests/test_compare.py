"""eval.py --checkpoint A B ...: one comparison table (and JSON) with a row per checkpoint, each
row the numbers the checkpoint gets alone; its label, candidate source and config changes."""

import os
import subprocess
import sys

import pytest
from test_eval_stack import DATA, checkpoint, read

import eval as eval_cli
import train
from common import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three checkpoints on the same data: an untrained MARIS, a MARIS trained for one step
    without its mutual-aware attention (an ablation by --set), an untrained MaIL on the
    oracle candidates."""
    tmp = tmp_path_factory.mktemp("compare")
    ablation = str(tmp / "no-maa")
    train.main(["--model", "maris", "--shapes-train-size", "4", "--batch-size", "4",
                "--shapes-eval-size", str(DATA["shapes_eval_size"]),
                "--shapes-image-size", str(DATA["shapes_image_size"]), "--max-steps", "1",
                "--workers", "0", "--no-val", "--set", "mutual_aware_attention=false",
                "--set", "dim=64", "--out", ablation])  # dim=64 is tiny's own: no change
    return [checkpoint(tmp, "maris"), os.path.join(ablation, "last.pt"),
            checkpoint(tmp, "mail", oracle_candidates=True)]


def rows_of(printed: str, labels) -> dict:
    """The printed table's row of each label, as its whitespace-separated cells."""
    rows = {}
    for line in printed.splitlines():
        cells = line.split()
        if cells and cells[0] in labels:
            rows[cells[0]] = cells
    return rows


def test_one_row_per_checkpoint_equal_to_each_alone(runs, tmp_path, capsys):
    maris, ablation, mail = runs
    path = str(tmp_path / "c.json")
    got = eval_cli.main(["--checkpoint", f"{maris}=base", f"{ablation}=no-maa",
                         f"{mail}=mail-oracle", "--split", "val", "test", "--json", path])
    printed = capsys.readouterr().out
    report = read(path)
    assert set(report) == {"checkpoints"}
    entries = report["checkpoints"]
    assert [e["label"] for e in entries] == ["base", "no-maa", "mail-oracle"]
    assert [e["checkpoint"] for e in entries] == runs
    assert [r["label"] for r in got["checkpoints"]] == ["base", "no-maa", "mail-oracle"]
    for entry, ckpt in zip(entries, runs):
        alone = str(tmp_path / "alone.json")
        results = eval_cli.main(["--checkpoint", ckpt, "--split", "val", "test", "--json", alone])
        one = read(alone)
        for key in ("model", "config", "checkpoint", "dataset", "candidates"):
            assert entry[key] == one[key]
        for split in ("val", "test"):
            assert {k: entry["splits"][split][k] for k in METRICS} == one["splits"][split]
            assert entry["splits"][split]["by_type"] == results[split]["by_type"]
    assert entries[0]["changes"] == {} and entries[2]["changes"] == {}
    assert entries[1]["changes"] == {"mutual_aware_attention": False}
    assert entries[2]["candidates"] == "oracle" and entries[0]["candidates"] is None
    assert entries[0]["splits"] != entries[1]["splits"]  # the ablation is another model

    # the printed table: one row per checkpoint and split, the numbers of the JSON
    assert printed.count("val on shapes") == printed.count("test on shapes") == 1
    val = printed[printed.index("val on shapes"):printed.index("test on shapes")]
    header = next(line for line in val.splitlines() if line.startswith("checkpoint"))
    types = [t for t in ("attribute", "position", "relation") if t in header.split()]
    assert types and header.split()[-2:] == ["n", "changes"]
    rows = rows_of(val, ("base", "no-maa", "mail-oracle"))
    assert len(rows) == 3
    assert rows["mail-oracle"][1:6] == ["mail", "tiny", "oracle", "(upper", "bound)"]
    assert rows["no-maa"][-1] == "mutual_aware_attention=False" and rows["base"][-1] == "-"
    for entry in entries:
        cells = rows[entry["label"]]
        m = entry["splits"]["val"]
        numbers = cells[-(len(METRICS) + len(types) + 1):-1]
        expect = [100 * m[k] for k in METRICS[:-1]]
        expect += [100 * m["by_type"][t]["mIoU"] if t in m["by_type"] else None for t in types]
        assert [None if v == "-" else float(v) for v in numbers[:-1]] == pytest.approx(
            expect, abs=0.006)
        assert int(numbers[-1]) == m["n"]


def test_one_checkpoint_keeps_the_one_layout(runs, tmp_path):
    path = str(tmp_path / "one.json")
    eval_cli.main(["--checkpoint", f"{runs[1]}=no-maa", "--json", path])
    assert set(read(path)) == {"model", "config", "checkpoint", "dataset", "candidates",
                               "splits"}
    assert read(path)["checkpoint"] == runs[1] and "by_type" not in read(path)["splits"]["val"]


def test_labels_default_to_the_run_folder_and_must_differ(runs, capsys):
    assert report.split_label("runs/a/best.pt") == ("runs/a/best.pt", "a/best.pt")
    assert report.split_label("runs/a/best.pt=x=1") == ("runs/a/best.pt", "x=1")
    assert report.split_label(f"{runs[0]}=N_q=24") == (runs[0], "N_q=24")  # an ablation row
    assert report.split_label(runs[0]) == (runs[0], os.path.join(
        os.path.basename(os.path.dirname(runs[0])), "maris.pt"))
    with pytest.raises(SystemExit):
        eval_cli.main(["--checkpoint", f"{runs[0]}=same", f"{runs[1]}=same"])
    assert "labelled ['same']" in capsys.readouterr().err


def test_single_checkpoint_flags_refuse_several(runs, tmp_path, capsys):
    for flags in (["--save-vis", str(tmp_path)], ["--export", str(tmp_path / "w.pt")],
                  ["--image", "x.png", "--text", "a"]):
        with pytest.raises(SystemExit):
            eval_cli.main(["--checkpoint", runs[0], runs[1], *flags])
        assert f"{flags[0]} take(s) one checkpoint, not 2" in capsys.readouterr().err


def test_checkpoints_trained_on_other_data_are_refused(runs, tmp_path):
    other = checkpoint(tmp_path, "maris", shapes_eval_size=3)  # overrides DATA's 4
    with pytest.raises(ValueError, match="shapes_eval_size"):
        eval_cli.main(["--checkpoint", runs[0], other])
    # ... unless the command line says which data
    got = eval_cli.main(["--checkpoint", runs[0], other, "--shapes-eval-size", "5"])
    assert [r["results"]["val"]["n"] for r in got["checkpoints"]] == [5, 5]


@pytest.mark.slow
def test_torchrun_compares_as_one_process(runs, tmp_path):
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    eval_cli.main(["--checkpoint", *runs, "--batch-size", "2", "--json", one])
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", os.path.join(ROOT, "eval.py"), "--checkpoint",
                          *runs, "--batch-size", "2", "--json", two],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read(one)["checkpoints"], read(two)["checkpoints"]
    assert [e["label"] for e in a] == [e["label"] for e in b] and len(b) == 3
    for x, y in zip(a, b):
        assert y["splits"]["val"]["n"] == DATA["shapes_eval_size"]
        assert flat(y["splits"]) == pytest.approx(flat(x["splits"]), rel=1e-12, abs=1e-12)


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict of numbers as {"a/b/c": number}, for pytest.approx."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}/")
        else:
            out[prefix + key] = value
    return out
