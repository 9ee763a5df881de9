"""The ablation runner (common.ablations) trains the full model and each ABLATIONS row with the
same seed and steps, and compares them in one table."""

import json

import pytest
from helpers import build, make_batch

import train
from common import ablations
from common.runconfig import MODELS, build_config, load_model_module


def test_every_model_lists_its_paper_ablations_as_settable_rows():
    for name in MODELS:
        table = ablations.rows(name)
        assert table["full"] == {} and len(table) > 1, name
        for label, overrides in table.items():
            sets = [f"{k}={v}" for k, v in overrides.items()]
            args = train.parse_args(["--model", name] + [f"--set={s}" for s in sets])
            cfg = build_config(load_model_module(name), args)
            assert all(str(getattr(cfg, k)) == str(v) for k, v in overrides.items()), label
    assert ablations.slug("w/o IMI") == "wo-imi"
    assert ablations.slug("II #3 baseline + IMI*") == "ii-3-baseline-imi"
    assert list(ablations.rows("m3dec", only="^III")) == ["full", "III concate"]


@pytest.mark.slow
def test_the_runner_trains_each_row_once_and_compares_them(tmp_path, monkeypatch):
    module = load_model_module("maris")
    label, overrides = next(iter(module.ABLATIONS.items()))
    monkeypatch.setattr(ablations, "rows", lambda name, only: {"full": {}, label: overrides})
    argv = ["--model", "maris", "--max-steps", "1", "--out", str(tmp_path), "--",
            "--shapes-train-size", "8", "--batch-size", "4", "--shapes-eval-size", "4"]
    report, = ablations.main(argv)
    with open(report) as f:
        rows = json.load(f)["checkpoints"]
    assert [r["label"] for r in rows] == ["full", label]
    assert all(r["splits"]["val"]["n"] == 4 for r in rows)
    table = (tmp_path / "ablations.md").read_text().splitlines()
    assert table[0] == "maris" and table[5].startswith(f"| {label} | `")
    assert table[4].startswith(f"| full | - | {100 * rows[0]['splits']['val']['mIoU']:.1f} |")
    ran = []
    monkeypatch.setattr(ablations, "run", lambda cmd: ran.append(cmd[1]))
    ablations.main(argv)  # both rows trained to the step: only the comparison runs again
    assert ran == ["eval.py"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_trainable_parameter_gets_a_gradient_in_every_row(name):
    """DDP (train.py keeps find_unused_parameters off) stops a multi-process run whose trainable
    parameters get no gradient: in the full model and in every ablation row, one training step
    reaches them all (parameters a row leaves untouched must be frozen)."""
    module = load_model_module(name)
    for label, overrides in {"full": {}, **module.ABLATIONS}.items():
        model = build(name, **overrides).train()
        batch = make_batch(model, n=2)
        model(**model.inputs_from(batch), target=batch["mask"])["loss"].backward()
        untouched = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not untouched, (label, untouched)
