"""The paper path: every paper config, at its paper input size, loads encoder files in the formats
users download (written here by the upstream packages with random weights, tests/weights.py),
takes one real training step through train.py on CPU, and its checkpoint is evaluated by eval.py.

These are the users' first commands on RefCOCO, minus the data: the built-in shapes are resized
to each paper's input size. Batch 1, one step: this proves the path runs (loading, shapes,
optimiser, checkpoint, evaluation), not what it learns. MARIS `paper` (SAM ViT-H) runs on the
meta device in tests/test_models.py; its ViT-B sibling `paper-vit-b` runs here for real.
"""

from __future__ import annotations

import os

import pytest
import torch
import weights

import eval as evaluate_cli
import train
from common.checkpoint import build_model_from_checkpoint, load_checkpoint
from common.runconfig import load_model_module

SHAPES_WORDS = ("the", "red", "green", "blue", "yellow", "purple", "circle", "square", "triangle",
                "diamond", "shape", "small", "big", "left", "right", "leftmost", "rightmost",
                "top", "bottom", "topmost", "above", "below", "of", "on", "at", "<unk>", "<pad>")


@pytest.fixture(scope="module")
def files(tmp_path_factory, weight_file):
    """Writes each weight file once, on first use: {name: path} (the ones tests/test_upstream.py
    also reads come from the session's weight_file)."""
    root = tmp_path_factory.mktemp("paper-weights")
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name in made:
            return made[name]
        path = str(root / name)
        if name.startswith("sam_"):  # sam_vit_b.pth
            path, _ = weight_file(weights.write_sam, name, name.split("_", 1)[1].rsplit(".", 1)[0])
        elif name.endswith("-quickgelu.pt"):  # OpenAI CLIP file of that architecture
            path, _ = weight_file(weights.write_openai_clip, name, name[: -len(".pt")])
        elif name == "swin_base_patch4_window12_384_22k.pth":  # Microsoft's release
            path, _ = weight_file(weights.write_swin_microsoft, name)
        elif name == "darknet53.conv.74":
            weights.write_darknet(path)
        elif name == "glove.txt":
            weights.write_glove(path, list(SHAPES_WORDS), 300)
        elif name == "bert-base":
            os.makedirs(path)
            weights.write_bert_folder(path, words=SHAPES_WORDS)
        elif name == "vilt-b32":
            os.makedirs(path)
            weights.write_vilt_folder(path, words=SHAPES_WORDS)
        else:
            raise KeyError(name)
        made[name] = path
        return path

    return get


# (model, config, image weights, text weights): the files PAPER_WEIGHTS names, in their formats
PAPER_RUNS = [
    ("maris", "paper-vit-b", "sam_vit_b.pth", "ViT-B-16-quickgelu.pt"),
    ("mmnet", "paper", "ViT-B-16-quickgelu.pt", "ViT-B-16-quickgelu.pt"),
    ("mmnet", "paper-rn101", "RN101-quickgelu.pt", "RN101-quickgelu.pt"),
    ("mmnet", "paper-vit-l", "ViT-L-14-quickgelu.pt", "ViT-L-14-quickgelu.pt"),
    ("m3dec", "paper-cnn", "darknet53.conv.74", "glove.txt"),
    ("m3dec", "paper-swin", "swin_base_patch4_window12_384_22k.pth", "bert-base"),
    ("mail", "paper", "vilt-b32", None),
    ("mail", "paper-416", "vilt-b32", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,config,image_file,text_file", PAPER_RUNS,
                         ids=[f"{r[0]}-{r[1]}" for r in PAPER_RUNS])
def test_paper_config_trains_a_step_and_evaluates(name, config, image_file, text_file, files,
                                                  tmp_path, capsys):
    module = load_model_module(name)
    assert set(module.PAPER_WEIGHTS[config]) == {"image_weights"} | (
        {"text_weights"} if text_file else set())
    out = tmp_path / "run"
    argv = ["--model", name, "--config", config, "--max-steps", "1", "--batch-size", "1",
            "--shapes-train-size", "2", "--shapes-eval-size", "2", "--no-val", "--workers", "0",
            "--out", str(out), "--image-weights", files(image_file)]
    if text_file:
        argv += ["--text-weights", files(text_file)]
    torch.manual_seed(0)
    train.main(argv)
    printed = capsys.readouterr().out
    assert "loaded" in printed  # every weight load says what it loaded (common.encoders)
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["step"] == 1
    cfg = module.CONFIGS[config]
    size = cfg.image_size
    model, _, _ = build_model_from_checkpoint(ckpt)
    assert model.input_spec.size == size  # the paper's input size, not a reduced one
    results = evaluate_cli.main(["--checkpoint", str(out / "last.pt"), "--split", "val",
                                 "--shapes-eval-size", "2", "--batch-size", "1", "--workers", "0"])
    metrics = results["splits"]["val"] if "splits" in results else results["val"]
    assert metrics["n"] == 2 and 0.0 <= metrics["mIoU"] <= 1.0


@pytest.mark.parametrize("name", ["maris", "mmnet", "m3dec", "mail"])
def test_paper_config_without_its_weight_files_is_refused(name, tmp_path):
    """`train.py --config paper` without the encoder files the paper starts from stops and names
    the missing flags and files (a paper run never silently starts from random weights)."""
    module = load_model_module(name)
    required = module.PAPER_WEIGHTS["paper"]
    with pytest.raises((SystemExit, ValueError)) as err:
        train.main(["--model", name, "--config", "paper", "--max-steps", "1", "--no-val",
                    "--out", str(tmp_path / "run")])
    message = str(err.value)
    for field, description in required.items():
        assert "--" + field.replace("_", "-") in message
        assert description in message
    assert "--random-init" in message


def test_maris_paper_configs_freeze_both_encoders_whatever_weights():
    """The paper freezes SAM and CLIP: its configs do too, also when built without weight files
    (built on the meta device: ViT-H's 632M parameters are not allocated)."""
    import warnings

    import maris

    for config in ("paper", "paper-vit-b"):
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = maris.MARIS(maris.CONFIGS[config])
        assert model.frozen_parts() == {"image", "text"}
        encoders = [*model.image_encoder.parameters(), *model.text_encoder.parameters()]
        assert encoders and not any(p.requires_grad for p in encoders)
        assert any(p.requires_grad for p in model.trainable_parameters())
