"""eval.py's command line: one JSON layout, the candidate source named (and an oracle labelled),
flags that mean what they mean in train.py, --device, --export and --plot."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from helpers import build
from PIL import Image

import eval as eval_cli
from common import visualise
from common.checkpoint import load_checkpoint, save_checkpoint
from common.metrics import THRESHOLDS
from common.shapes import COLOURS

DATA = {"dataset": "shapes", "shapes_eval_size": 4, "shapes_image_size": 64, "seed": 0}


def checkpoint(tmp_path, name: str, **trained) -> str:
    """A checkpoint as train.py writes it, of an untrained tiny model (no training needed)."""
    model = build(name)
    path = str(tmp_path / f"{name}.pt")
    save_checkpoint(dict(model_name=name, config=dataclasses.asdict(model.cfg),
                               model=model.state_dict(),
                               args=dict(DATA, model=name, config="tiny", **trained)), path)
    return path


@pytest.fixture(scope="module")
def maris_ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("maris"), "maris")


def read(path):
    with open(path) as f:
        return json.load(f)


def test_json_has_one_layout_whatever_the_number_of_splits(maris_ckpt, tmp_path):
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    eval_cli.main(["--checkpoint", maris_ckpt, "--json", one])
    eval_cli.main(["--checkpoint", maris_ckpt, "--split", "val", "test", "--json", two])
    a, b = read(one), read(two)
    assert set(a) == set(b) == {"model", "config", "checkpoint", "dataset", "candidates",
                                "splits"}
    assert list(a["splits"]) == ["val"] and list(b["splits"]) == ["val", "test"]
    assert a["splits"]["val"] == b["splits"]["val"] and a["splits"]["val"]["n"] == 4
    assert a["model"] == "maris" and a["config"] == "tiny" and a["candidates"] is None


def test_candidate_source_is_printed_and_an_oracle_labelled(tmp_path, capsys):
    ckpt = checkpoint(tmp_path, "mail")
    path = str(tmp_path / "m.json")
    eval_cli.main(["--checkpoint", ckpt, "--json", path])
    printed = capsys.readouterr().out
    assert read(path)["candidates"] == "simulated"  # the synthetic data's default source
    assert "candidate masks: simulated" in printed and "upper bound" not in printed
    eval_cli.main(["--checkpoint", ckpt, "--json", path, "--oracle-candidates"])
    assert read(path)["candidates"] == "oracle"
    title = [line for line in capsys.readouterr().out.splitlines() if " on shapes" in line]
    assert title and "oracle (upper bound)" in title[0]
    # by default, the training run's source
    oracle_run = checkpoint(tmp_path, "mail", oracle_candidates=True)
    eval_cli.main(["--checkpoint", oracle_run, "--json", path])
    assert read(path)["candidates"] == "oracle"


def test_device_is_honoured_for_evaluation_and_prediction(maris_ckpt, monkeypatch, tmp_path):
    seen = []

    def spy(model, loader, device, *args, **kwargs):
        seen.append((torch.device(device), next(model.parameters()).device))
        return {"mIoU": 0.0, "oIoU": 0.0, "n": 0, **{f"Pr@{t}": 0.0 for t in THRESHOLDS}}

    monkeypatch.setattr(eval_cli, "evaluate", spy)
    eval_cli.main(["--checkpoint", maris_ckpt, "--device", "meta"])
    assert seen == [(torch.device("meta"), torch.device("meta"))]

    class Stop(Exception):
        pass

    def predict_spy(model, image, sentence, device, *args, **kwargs):
        seen.append((torch.device(device), next(model.parameters()).device))
        raise Stop

    monkeypatch.setattr(eval_cli, "predict", predict_spy)
    Image.new("RGB", (8, 6)).save(tmp_path / "im.png")
    with pytest.raises(Stop):
        eval_cli.main(["--checkpoint", maris_ckpt, "--device", "meta", "--image",
                       str(tmp_path / "im.png"), "--text", "a"])
    assert seen[-1] == (torch.device("meta"), torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            eval_cli.main(["--checkpoint", maris_ckpt, "--device", "cuda"])


def test_prediction_under_autocast_thresholds_in_fp32():
    model = build("maris").eval()
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    plain, _ = eval_cli.predict(model, image, "the red circle")
    mixed, out = eval_cli.predict(model, image, "the red circle", amp="bf16")
    assert out["mask_logits"].dtype == torch.bfloat16  # the model did run under autocast
    assert mixed.dtype == bool and mixed.shape == (40, 56)
    assert (mixed == plain).mean() > 0.9  # bf16 rounding moves few pixels across 0


def test_export_writes_a_weights_only_checkpoint_that_evaluates(maris_ckpt, tmp_path):
    out = str(tmp_path / "weights.pt")
    eval_cli.main(["--checkpoint", maris_ckpt, "--export", out])
    exported = load_checkpoint(out)
    assert "optimizer" not in exported and exported["model_name"] == "maris"
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    eval_cli.main(["--checkpoint", maris_ckpt, "--json", a])
    eval_cli.main(["--checkpoint", out, "--json", b])
    assert read(a)["splits"] == read(b)["splits"]


def test_plot_draws_the_curves_of_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    records += [{"step": 5, "epoch": 1, "val": {"mIoU": 0.3, "n": 4}}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    eval_cli.main(["--plot", str(run)])
    assert Image.open(run / "curves.png").size[0] > 100
    eval_cli.main(["--plot", str(run), "--plot-out", str(tmp_path / "c.png")])
    assert os.path.isfile(tmp_path / "c.png")


def test_masks_are_outlined_in_colours_no_shape_has():
    """A prediction and a ground truth on a red shape: each panel has its mask's colour on the
    mask's border (a filled red or green overlay vanishes on a red or green shape), and neither
    colour is a synthetic shape's."""
    side = visualise.PANEL_WIDTH  # drawn at its own size: panel pixels are image pixels
    image = np.full((side, side, 3), 128, np.uint8)
    gt = np.zeros((side, side), bool)
    gt[60:160, 80:180] = True
    image[gt] = COLOURS["red"]
    pred = np.roll(gt, 20, axis=1)
    sheet = np.asarray(visualise.visual(image, pred, gt, "the red square", [], iou=0.67))
    top = visualise.HEADER_PX + visualise.TITLE_PX
    for k, (mask, colour) in enumerate([(pred, visualise.PRED_COLOUR), (gt, visualise.GT_COLOUR)]):
        panel = sheet[top:top + side, k * side:(k + 1) * side]
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        border = mask & ~inner  # the mask's outermost pixels
        assert border.sum() > 300 and (panel[border] == colour).all()
        assert not (panel[~mask] == colour).all(-1).any()  # outside the mask: untouched
    for shape_colour in COLOURS.values():
        for colour in (visualise.PRED_COLOUR, visualise.GT_COLOUR):
            assert np.abs(colour - np.array(shape_colour)).max() > 90


def test_heat_maps_come_with_their_colour_scale():
    image, mask = np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60), bool)
    plain = np.asarray(visualise.visual(image, mask, None, "x", []))
    heat = np.asarray(visualise.visual(image, mask, None, "x", [("attention", torch.rand(5, 5))]))
    header = heat[: visualise.HEADER_PX].astype(int)
    # the scale's two ends: heatmap's colour of 0 (blue) and of 1 (red), in the header only
    red, blue = header[..., 0], header[..., 2]
    assert (blue > red + 60).any() and (red > blue + 60).any()
    top = plain[: visualise.HEADER_PX].astype(int)
    assert not (top[..., 0] > top[..., 2] + 60).any()
