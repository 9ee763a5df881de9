"""A careless user's commands: each mistake ends with exit status 2 and one line naming it, and
nothing is written or lost. A traceback would mean a bug. Also the predictor a new user meets
first: any image form in, a mask at the image's resolution out."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_cli
import train
from common import cli
from common.checkpoint import load_checkpoint

TINY = ["--model", "maris", "--shapes-train-size", "8", "--shapes-eval-size", "4",
        "--batch-size", "4", "--workers", "0", "--no-tensorboard"]


def user_error(capsys, main, argv) -> str:
    """Run a command's main as its __main__ does; returns stderr after checking exit status 2."""
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: main(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, words", [
    (["--config", "big"], "has configs"),
    (["--set", "nosuch=1"], "has no field 'nosuch'"),
    (["--set", "dim=abc"], "--set dim=abc: expected int"),
    (["--set", "tau=nan"], "--set tau=nan: expected a finite number"),
    (["--epochs", "-1"], "--epochs: must be >= 1"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--max-steps", "0"], "--max-steps: must be >= 1"),
    (["--clip-grad", "inf"], "--clip-grad: must be a finite number"),
    (["--config", "paper"], "--image-weights"),
    (["--resume", "nowhere/last.pt"], "checkpoint not found"),
])
def test_a_bad_command_line_exits_2_naming_it_and_leaves_no_folder(flags, words, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    err = user_error(capsys, train.main, TINY + ["--out", str(out)] + flags)
    assert words in err
    assert not out.exists()  # a refused start leaves nothing behind


def test_missing_paper_weights_are_all_named_at_once(tmp_path, capsys):
    err = user_error(capsys, train.main, TINY + ["--out", str(tmp_path / "r"), "--config",
                                                 "paper"])
    assert "--image-weights" in err and "--text-weights" in err


def test_a_second_run_into_a_folder_in_use_refuses(tmp_path, capsys):
    """Another process holds the run folder (as a running train.py does): this one stops before
    writing anything into it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = user_error(capsys, train.main, TINY + ["--out", str(out), "--max-steps", "1"])
        assert "another run is writing" in err
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.kill()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "run"
    train.main(TINY + ["--out", str(out), "--max-steps", "2", "--no-val"])
    return out


def test_resume_auto_needs_a_last_pt_and_never_restarts_over_a_run(finished_run, tmp_path,
                                                                     capsys):
    """A folder with best.pt and log.jsonl but no last.pt has nothing to resume from: a fresh
    run there would overwrite best.pt and append to the old log."""
    out = tmp_path / "partial"
    out.mkdir()
    (out / "log.jsonl").write_text((finished_run / "log.jsonl").read_text())
    (out / "best.pt").write_bytes((finished_run / "last.pt").read_bytes())
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    err = user_error(capsys, train.main, TINY + ["--out", str(out), "--resume", "auto"])
    assert "no last.pt" in err
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before


def test_a_resume_continues_its_own_folder_or_a_fresh_one(finished_run, tmp_path, capsys):
    """--resume PATH without --out continues PATH's folder; with an --out that holds another run
    it refuses (it would overwrite that run's checkpoints)."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes(b"another run's")
    err = user_error(capsys, train.main, TINY + ["--resume", str(finished_run / "last.pt"),
                                                 "--out", str(other), "--max-steps", "3",
                                                 "--resume-override", "max_steps"])
    assert "already holds a run" in err and (other / "last.pt").read_bytes() == b"another run's"
    train.main(TINY + ["--resume", str(finished_run / "last.pt"), "--max-steps", "3",
                       "--resume-override", "max_steps", "--no-val"])
    assert load_checkpoint(str(finished_run / "last.pt"))["step"] == 3


def test_eval_never_writes_over_its_inputs(finished_run, tmp_path, capsys):
    ckpt = finished_run / "last.pt"
    before = ckpt.read_bytes()
    err = user_error(capsys, eval_cli.main, ["--checkpoint", str(ckpt), "--export", str(ckpt)])
    assert "does not write over its inputs" in err and ckpt.read_bytes() == before
    photo = tmp_path / "photo.png"
    Image.new("RGB", (12, 10), "red").save(photo)
    photo_bytes = photo.read_bytes()
    err = user_error(capsys, eval_cli.main, ["--checkpoint", str(ckpt), "--image", str(photo),
                                             "--text", "the red square", "--save-mask",
                                             str(photo)])
    assert "does not write over its inputs" in err and photo.read_bytes() == photo_bytes
    err = user_error(capsys, eval_cli.main, ["--checkpoint", str(ckpt), "--image", str(photo),
                                             "--text", "a", "--save-mask", str(tmp_path / "m.jpg")])
    assert "losslessly" in err
    # every written file against every read one, refused before anything runs
    for flags in (["--json", str(ckpt)], ["--plot", str(finished_run), "--plot-out",
                                           str(finished_run / "log.jsonl")],
                  ["--json", str(finished_run / "args.json"), "--candidates",
                   str(finished_run / "args.json")]):
        logged = (finished_run / "log.jsonl").read_bytes()
        argv = flags if "--plot" in flags else ["--checkpoint", str(ckpt), *flags]
        err = user_error(capsys, eval_cli.main, argv)
        assert "does not write over its inputs" in err, flags
        assert ckpt.read_bytes() == before and (finished_run / "log.jsonl").read_bytes() == logged


def test_a_split_without_samples_is_refused(finished_run, capsys, monkeypatch):
    import data

    build = data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda *a, **k: torch.utils.data.Subset(
        build(*a, **k), []))
    err = user_error(capsys, eval_cli.main, ["--checkpoint", str(finished_run / "last.pt")])
    assert "holds no samples" in err


def test_a_shadowed_module_is_named():
    """A user's own data.py earlier on sys.path would be imported as `data` by the scripts."""
    fake = types.ModuleType("data")
    fake.__file__ = "/home/someone/data.py"
    saved = sys.modules["data"]
    sys.modules["data"] = fake
    try:
        with pytest.raises(ImportError, match="/home/someone/data.py.*shadows it"):
            cli.check_own_modules("data")
    finally:
        sys.modules["data"] = saved
    cli.check_own_modules("data", "eval", "common")  # the project's own: no error


def test_a_bug_keeps_its_traceback():
    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(bug)


# ---------------------------------------------------------------------------------------------
# The predictor
# ---------------------------------------------------------------------------------------------

def test_the_predictor_takes_a_path_a_pil_image_or_an_array(finished_run, tmp_path):
    predictor = eval_cli.Predictor.from_checkpoint(str(finished_run / "last.pt"), device="cpu")
    array = np.zeros((40, 60, 3), np.uint8)
    array[10:30, 20:40] = (215, 40, 40)
    Image.fromarray(array).save(tmp_path / "shapes.png")
    results = [predictor(image, "the red square") for image in
               (str(tmp_path / "shapes.png"), Image.fromarray(array), array)]
    for mask, prob in results:
        assert mask.shape == prob.shape == (40, 60) and mask.dtype == bool
        assert prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
        assert np.array_equal(mask, prob > 0.5)
        assert np.array_equal(mask, results[0][0]) and np.allclose(prob, results[0][1])
    masks, probs = predictor.predict_many(array, ["the red square", "the blue circle"])
    assert masks.shape == (2, 40, 60)
    assert np.allclose(probs[0], results[0][1], atol=1e-5)  # the image encoded once: same map
    gray = predictor(array[:, :, 0], "the red square")[0]
    assert gray.shape == (40, 60)


@pytest.mark.parametrize("image, words", [
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((8, 8, 4), np.uint8), "must be (H, W, 3)"),
])
def test_the_predictor_refuses_an_ambiguous_image(finished_run, image, words):
    predictor = eval_cli.Predictor.from_checkpoint(str(finished_run / "last.pt"), device="cpu")
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        predictor(image, "the red square")


def test_help_names_every_config_of_every_model():
    from common.runconfig import MODELS, load_model_module

    for name in MODELS:
        for config in load_model_module(name).CONFIGS:
            assert config in train.CONFIG_HELP, (name, config)


def test_a_damaged_weight_or_checkpoint_file_never_advises_unsafe_loading(tmp_path, capsys):
    """torch.load's own error suggests weights_only=False, which would run the file's code."""
    from common.checkpoint import load_checkpoint as load
    from common.encoders.loading import load_state_dict_file

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    for reader in (load_state_dict_file, load):
        with pytest.raises(ValueError) as err:
            reader(str(bad))
        assert "weights_only" not in str(err.value) and "corrupt" in str(err.value)


def test_a_file_named_as_a_published_one_must_be_it(tmp_path):
    """OpenAI's CLIP files and torchvision's have published sha256 digests (common.encoders.
    loading.KNOWN_FILES): a truncated download under that name is named as such."""
    from common.encoders.loading import KNOWN_FILES, load_state_dict_file

    assert "ViT-B-16.pt" in KNOWN_FILES and "swin_b-68c6b09e.pth" in KNOWN_FILES
    fake = tmp_path / "ViT-B-16.pt"
    torch.save({"w": torch.zeros(2)}, fake)
    with pytest.raises(ValueError, match="named as the published ViT-B-16.pt"):
        load_state_dict_file(str(fake))
    other = tmp_path / "my-vit.pt"  # not a published name: read as it is
    torch.save({"w": torch.zeros(2)}, other)
    assert list(load_state_dict_file(str(other))) == ["w"]


# ---------------------------------------------------------------------------------------------
# MaIL's proposals files: checked before they are used
# ---------------------------------------------------------------------------------------------

def _proposals(path, ids, side=64, **changes):
    import json

    from common.candidates import encode_candidates

    entries = []
    for i in ids:
        mask = np.zeros((side, side), bool)
        mask[10:30, 10:30] = True
        entries += [dict(e, **changes) for e in encode_candidates(i, mask[None], [0.9])]
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.mark.parametrize("changes, words", [
    (dict(image_id="seven"), "image_id must be an integer"),
    (dict(score=float("nan")), "score must be a finite number"),
    (dict(segmentation={"counts": "abc"}), "needs \"size\""),
])
def test_a_malformed_proposal_is_named_with_its_file_and_entry(tmp_path, changes, words):
    from common.candidates import load_candidates

    path = _proposals(tmp_path / "p.json", [0, 1], **changes)
    with pytest.raises(ValueError, match="entry 0") as err:
        load_candidates(path)
    assert words in str(err.value)


def test_a_proposals_file_must_cover_the_split(tmp_path):
    """A file whose ids match no image of the split (another split's file) is refused; one that
    misses a few images is used, with a warning that counts them."""
    import data

    kwargs = dict(shapes_size=4, shapes_image_size=64, candidates=None)
    none = _proposals(tmp_path / "none.json", [100, 101])
    with pytest.raises(ValueError, match="0 of the 4 images of the val split"):
        data.build_dataset("shapes", "val", **dict(kwargs, candidates=none))
    one = _proposals(tmp_path / "one.json", [0])  # a quarter: below the half it needs
    with pytest.raises(ValueError, match="1 of the 4 images of the val split"):
        data.build_dataset("shapes", "val", **dict(kwargs, candidates=one))
    half = _proposals(tmp_path / "half.json", [0, 1])  # the bound itself: used, with a warning
    with pytest.warns(UserWarning, match="2 of the 4 images"):
        data.build_dataset("shapes", "val", **dict(kwargs, candidates=half))
    some = _proposals(tmp_path / "some.json", [0, 1, 2])
    with pytest.warns(UserWarning, match="3 of the 4 images"):
        ds = data.build_dataset("shapes", "val", **dict(kwargs, candidates=some))
    assert len(ds[0]["instances"]) == 1 and len(ds[3]["instances"]) == 0
    wrong = _proposals(tmp_path / "wrong.json", [0, 1, 2, 3], side=32)
    with pytest.raises(ValueError, match="32x32, the image 64x64"):
        data.build_dataset("shapes", "val", **dict(kwargs, candidates=wrong))[0]


def test_a_run_records_its_proposals_file_hash(tmp_path):
    import argparse

    from common.runconfig import BatchPlan, run_settings

    path = _proposals(tmp_path / "p.json", [0])
    args = train.parse_args(["--model", "mail"])
    cfg = argparse.Namespace(lr=1e-4, epochs=1, clip_grad=0.0, hflip=False)
    one = run_settings(args, cfg, BatchPlan(1, 1, 1), path)["candidates_sha256"]
    (tmp_path / "p.json").write_text((tmp_path / "p.json").read_text() + " ")
    assert len(one) == 64 and run_settings(args, cfg, BatchPlan(1, 1, 1), path)[
        "candidates_sha256"] != one  # a resume with the changed file would be refused


def test_a_bit_flipped_checkpoint_is_refused(finished_run, tmp_path):
    """A flipped bit in a weight unpickles fine and would resume as a wrong (or NaN) number."""
    from common.checkpoint import load_checkpoint as load
    from common.checkpoint import save_checkpoint

    ckpt = load(str(finished_run / "last.pt"))
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.numel() > 8)
    ckpt["model"][name].view(-1).view(torch.int32)[3] ^= 1 << 30  # one bit of one weight
    path = tmp_path / "flipped.pt"
    torch.save(ckpt, path)  # the old checksum, new bytes: what a damaged disk gives
    with pytest.raises(ValueError, match="is damaged"):
        load(str(path))
    save_checkpoint(ckpt, str(path))  # written by us: its own checksum, read back
    assert torch.equal(load(str(path))["model"][name], ckpt["model"][name])


def test_prediction_says_when_words_are_cut_or_unknown(finished_run):
    predictor = eval_cli.Predictor.from_checkpoint(str(finished_run / "last.pt"), device="cpu")
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.warns(UserWarning, match="1 sentence.*were cut"):
        predictor(image, " ".join(["the red circle"] * 200))
    model = types.SimpleNamespace(tokenizer=lambda s: ([1 if w == "red" else 0
                                                         for w in s.split()], False))
    model.tokenizer.unk_id = 0
    assert eval_cli.unknown_words(model, ["the red zorb", "red"]) == 2


def test_configs_are_frozen():
    """`cfg = CONFIGS["tiny"]; cfg.dim = 32` would change every later user's config."""
    import dataclasses

    from common.runconfig import MODELS, load_model_module

    for name in MODELS:
        for cfg in load_model_module(name).CONFIGS.values():
            with pytest.raises(dataclasses.FrozenInstanceError):
                cfg.lr = 1.0


def test_a_refs_file_naming_an_unknown_image_is_a_clear_error(tmp_path):
    """refs(unc).p and instances.json from different releases: named at load, not a bare
    KeyError when the sample is first read."""
    from helpers import ref, write_refer

    import data

    write_refer(tmp_path, [ref(1, 1, 7, "train", "thing")],
                [{"id": 9, "file_name": "x.jpg", "height": 20, "width": 30}],
                [{"id": 1, "image_id": 7, "category_id": 1, "area": 4, "iscrowd": 0,
                  "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}])
    with pytest.raises(ValueError, match=r"does not hold: \[7\]"):
        data.build_dataset("refcoco", "train", data_root=str(tmp_path))


def test_console_commands_are_the_scripts(capsys, monkeypatch, tmp_path):
    """pyproject's [project.scripts] name train.run and eval.run, which behave as the scripts do
    (a user error: status 2, one line); where this project is installed in the interpreter
    running the tests (CI's `pip install -e`), the commands exist next to it and run from
    another folder, their usage naming themselves."""
    import importlib
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"ris-train": "train:run", "ris-eval": "eval:run"}
    mistakes = {"ris-train": (["--model", "maris", "--config", "big"], "has configs"),
                "ris-eval": (["--checkpoint", str(tmp_path / "none.pt")], "not found")}
    for command, target in scripts.items():
        module, function = target.split(":")
        run = getattr(importlib.import_module(module), function)
        argv, words = mistakes[command]
        monkeypatch.setattr(sys, "argv", [command, *argv])
        with pytest.raises(SystemExit) as stop:
            run()
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err
    try:
        importlib.metadata.distribution("ris-zoo")
    except importlib.metadata.PackageNotFoundError:
        return  # run from a source tree that is not installed: no commands to find
    bin_dir = os.path.dirname(sys.executable)
    for command in scripts:
        path = os.path.join(bin_dir, command)
        assert os.path.isfile(path), f"{command} is not installed next to {sys.executable}"
        done = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {command} ")


@pytest.mark.parametrize("tool, argv, words", [
    ("common.cache_error", ["--config", "big"], "maris has configs"),
    ("common.benchmark", ["--model", "mmnet", "--config", "big"], "mmnet has configs"),
    ("common.benchmark", ["--config", "big"], "no model has a config 'big'"),
    ("common.detector", ["--dataset", "refcoco", "--data-root", "nowhere", "--split", "val",
                         "--weights", "nowhere.pth", "--out", "props.json"], "nowhere"),
])
def test_tool_commands_end_a_user_error_with_status_2(tool, argv, words, tmp_path):
    """The `python -m common.NAME` tools end as the scripts do: one line, status 2, nothing
    written (here, the detector's --out)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", tool, *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=os.environ | {"PYTHONPATH": root})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and words in done.stderr
    assert "Traceback" not in done.stderr and os.listdir(tmp_path) == []


def test_resume_refuses_what_it_cannot_continue(finished_run, tmp_path, capsys):
    """--resume-override without --resume; a best.pt-like file without optimiser state; another
    model's checkpoint: each refused by name, the run folder untouched."""
    out = tmp_path / "r"
    err = user_error(capsys, train.main, TINY + ["--out", str(out), "--resume-override", "lr"])
    assert "--resume-override applies to a resumed run" in err
    lean = tmp_path / "lean.pt"
    eval_cli.main(["--checkpoint", str(finished_run / "last.pt"), "--export", str(lean)])
    err = user_error(capsys, train.main, TINY + ["--out", str(out), "--resume", str(lean)])
    assert "holds no optimiser state" in err
    other = ["--model", "mmnet", *TINY[2:]]
    err = user_error(capsys, train.main, other + ["--out", str(out), "--resume",
                                                  str(finished_run / "last.pt")])
    assert "holds a maris model, not mmnet" in err
    assert not out.exists()


def test_a_decompression_bomb_is_refused_as_an_image_error(tmp_path, monkeypatch):
    """Pillow's guard against images of absurd pixel counts (a small file that decodes to GBs)
    becomes ImageError (an OSError: exit status 2 on the command line) naming the file."""
    from common.images import ImageError, load_image

    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # errors above twice this
    with pytest.raises(ImageError, match="cannot decode image .*bomb.png"):
        load_image(str(path))


def test_ris_traceback_shows_the_traceback_of_a_user_error(monkeypatch):
    def main():
        raise ValueError("a user's mistake")

    monkeypatch.setenv("RIS_TRACEBACK", "1")
    with pytest.raises(ValueError, match="a user's mistake"):
        cli.run(main)
    monkeypatch.delenv("RIS_TRACEBACK")
    with pytest.raises(SystemExit):
        cli.run(main)


def test_a_full_disk_mid_checkpoint_keeps_the_last_one_and_leaves_no_partial_file(
        finished_run, tmp_path, monkeypatch):
    """A write that fails part-way (no space left) raises OSError (exit status 2), leaves the
    previous last.pt byte for byte, and removes its partial temporary file."""
    import errno
    import shutil

    from common import checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "last.pt").read_bytes()
    state = load_checkpoint(str(run / "last.pt"))

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(state, str(run / "last.pt"))
    assert (run / "last.pt").read_bytes() == before
    assert not [n for n in os.listdir(run) if ".tmp." in n]
