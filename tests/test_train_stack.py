"""The training stack around the models: device placement, loaders, batch split and gradient
accumulation, strict resume, checkpoints with frozen encoders by reference, logs."""

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import shutil
import sys

import pytest
import torch
from helpers import MODEL_NAMES, build, make_batch
from torch.utils.data import DataLoader

import data
import eval as eval_cli
import maris
import train
from common.cache import frozen_features
from common.checkpoint import build_model_from_checkpoint, export_checkpoint, load_checkpoint
from common.distributed import memory_format
from common.logs import duration, open_tensorboard, plot_log, time_left
from common.metrics import IoUAccumulator
from common.resume import restore_rng, resume_position, rng_state, seed_rank, set_rng_state
from common.runconfig import (
    BatchPlan,
    build_config,
    load_model_module,
    paper_batch_note,
    plan_batches,
    run_settings,
)
from common.samplers import EpochKeyed, TrainSampler
from eval import evaluate

SEEN_DEVICES: list = []


class DeviceRecorder(IoUAccumulator):
    """Meta tensors hold no values, so this accumulator records the device of what it is given
    instead of reading it; everything before it (resizing, thresholding, intersection) runs."""

    def add(self, inter, union):
        SEEN_DEVICES.append((inter.device, union.device))
        return 0.0


def step_loss(model, raw, batch: dict, device) -> dict:
    """train.train_one_epoch's forward, restated (consistency, not fidelity): the batch to the
    device, frozen features once per image, the model with its target."""
    batch = data.to_device(batch, device, raw.input_spec)
    return model(**raw.inputs_from(batch), **frozen_features(raw, batch), target=batch["mask"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_training_step_and_an_evaluation_leave_nothing_on_the_cpu(name, monkeypatch):
    """The model on the meta device stands for a GPU: any tensor train.py leaves on the CPU
    meets a meta tensor and fails. Before data.to_device, evaluate() moved only the batch's
    tensors, not the list of per-sample ground truths, and failed with "Tensor on device cpu is
    not on the expected device meta!" (on a GPU: at the end of every first epoch). The
    optimiser is a plain AdamW: the fused kernels the models choose do not exist for meta.
    (FakeTensorMode's fake CUDA tensors run the forward but not the backward without a GPU:
    "hasPrimaryContext expects a valid device index".)"""
    model = build(name)
    batch = make_batch(model, n=2)  # on the CPU, as a loader gives it
    meta = torch.device("meta")
    model.to(meta).train()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = step_loss(model, model, batch, meta)
    scaler.scale(out["loss"]).backward()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, foreach=False)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
    scaler.step(optimizer)
    assert norm.device == meta and out["loss"].device == meta
    monkeypatch.setattr(eval_cli, "IoUAccumulator", DeviceRecorder)
    SEEN_DEVICES.clear()
    evaluate(model, [batch], meta, progress=False)
    assert SEEN_DEVICES and all(d == (meta, meta) for d in SEEN_DEVICES)


def tiny_args():
    return train.parse_args(["--model", "maris", "--shapes-eval-size", "4", "--workers", "0"])


@pytest.mark.slow
def test_loaders_start_workers_under_spawn():
    """Workers started by spawn/forkserver (macOS's default; Linux's from Python 3.14) unpickle
    the dataset and the collate function; a lambda collate_fn failed with "Can't pickle local
    object". Both loaders' collate functions pickle, and a spawned worker reads a batch."""
    model = build("maris")
    loader = data.make_eval_loader(tiny_args(), "val", model, rank=0, world=1, batch_size=2)
    spawned = DataLoader(loader.dataset, batch_size=2, sampler=loader.sampler,
                         collate_fn=loader.collate_fn, num_workers=1,
                         multiprocessing_context="spawn")
    batch = next(iter(spawned))
    assert batch["image"].shape[0] == 2 and len(batch["gt"]) == 2
    sampler = TrainSampler(len(loader.dataset), 0, 1, seed=0)
    train_loader = data.make_train_loader(loader.dataset, sampler, 2, model.tokenizer.pad_id,
                                           workers=0, cuda=False, seed=0)
    pickle.dumps((train_loader.collate_fn, train_loader.dataset))


def test_persistent_workers_see_each_epoch():
    """A persistent worker keeps its copy of the dataset across epochs, so set_epoch in the
    main process never reaches it: the epoch travels with each index instead (EpochKeyed), and
    the augmentation of epoch 1 is epoch 1's."""
    model = build("maris")
    prep = data.Preprocess(model.input_spec, model.tokenizer, augment=True)
    ds = data.PreparedDataset(data.ShapesDataset("train", 16, 64, 0), prep, seed=0)
    sampler = TrainSampler(len(ds), 0, 1, seed=0)
    loader = DataLoader(EpochKeyed(ds), batch_size=16, sampler=sampler, num_workers=1,
                        persistent_workers=True,
                        collate_fn=functools.partial(data.collate, pad_id=0))
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = next(iter(loader))
        ds.set_epoch(epoch)
        expected = data.collate([ds[i] for i in got["index"].tolist()], 0)
        assert got["sentence"] == expected["sentence"]
        assert torch.equal(got["image"], expected["image"])


def test_batch_plan_is_exact_or_refused():
    assert plan_batches(128, 2, global_batch=128, batch_size=16) == BatchPlan(16, 4, 2)
    assert plan_batches(128, 2, global_batch=128, accum_steps=2) == BatchPlan(32, 2, 2)
    assert plan_batches(128, 4, accum_steps=2) == BatchPlan(16, 2, 4)
    with pytest.raises(ValueError, match="--global-batch 128 is not 3 process"):
        plan_batches(128, 3, global_batch=128)  # MaIL's 128 on 3 GPUs
    with pytest.raises(ValueError, match="--global-batch"):
        plan_batches(128, 2, global_batch=128, batch_size=16, accum_steps=2)
    # without --global-batch the split is not forced, but said: 128 on 3 GPUs is 126
    plan = plan_batches(128, 3)
    cfg = dataclasses.replace(maris.CONFIGS["tiny"], batch_size=128)
    assert plan.global_batch == 126 and "not the config's 128" in paper_batch_note(cfg, plan)


def test_an_optimiser_step_uses_the_same_samples_whatever_the_split():
    """The samples of optimiser step s depend only on the global batch: 2 processes x batch 2 x
    2 accumulation steps use the samples 1 process x batch 2 x 4 steps uses, and a resumed run
    with another split (equal global batch) continues with the same remaining samples."""

    def steps(world, per, accum, start=0):
        keys = [list(TrainSampler(40, r, world, seed=3)) for r in range(world)]
        for r in range(world):
            keys[r] = keys[r][start * per * accum:]
        n = min(len(k) for k in keys) // (per * accum)
        return [sorted(i for r in range(world) for _, i in keys[r][s * per * accum:
                                                                   (s + 1) * per * accum])
                for s in range(n)]

    two = steps(2, 2, 2)
    assert two == steps(1, 2, 4)[: len(two)]
    ckpt = dict(batch_in_epoch=2 * 2, samples_in_epoch=2 * 2 * 2 * 2,
                run=dict(batch_size=2, accum_steps=2, world_size=2))
    start, restarted = resume_position(ckpt, BatchPlan(4, 2, 1))  # 1 proc x 4 x 2
    assert not restarted and start == 4  # micro-batches of 4 already done: 16 samples = 2 steps
    assert steps(1, 4, 2, start=start // 2)[0] == two[2]
    assert resume_position(ckpt, BatchPlan(2, 1, 1)) == (0, True)  # global 2 != 8


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_accumulated_gradients_equal_one_larger_batch(name):
    """--accum-steps 2 at batch 2 gives the gradient of one step at batch 4, with BatchNorm in
    eval mode (in training mode its statistics depend on the batch, by design). Tolerance: the
    difference's norm within 1e-5 of the gradient's (measured 2e-7 to 2e-6: fp32 summation
    order). Without the 1/N scaling the difference is the whole gradient."""
    model = build(name).eval()
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names, keep_original=True)
    base = data.build_dataset("shapes", "val", shapes_size=4, shapes_image_size=96,
                              candidates=data.model_candidates(tiny_args(), model.input_names))
    items = [dict(prep(base[i]), index=i) for i in range(4)]

    def gradient(groups):
        model.zero_grad()
        return torch.cat([g.flatten() for g in _accumulated_gradients(model, groups).values()])

    accumulated, large = gradient([items[:2], items[2:]]), gradient([items])
    assert (accumulated - large).norm() <= 1e-5 * large.norm()


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, name: str,
                channels_last: bool, token_bn: bool = False) -> None:
    """One rank of test_ddp_accumulation_equals_one_process: two micro-batches of 2 samples
    (its TrainSampler share of a global batch of 8), accumulated under DDP with no_sync.
    token_bn: M3Dec with its synchronised TokenBatchNorms in training mode (_token_bn_model)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                           world_size=world)
    model = (_token_bn_model(sync=True) if token_bn else  # as sync_batchnorm leaves it on GPUs
             build(name).to(memory_format=memory_format(channels_last)).eval())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    items = _prepared(model)
    keys = [i for _, i in TrainSampler(len(items), rank, world, seed=0)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for micro in range(2):
        group = [items[i] for i in keys[2 * micro: 2 * micro + 2]]
        with ddp.no_sync() if micro == 0 else contextlib.nullcontext():
            out = step_loss(ddp, model, data.collate(group, model.tokenizer.pad_id),
                            torch.device("cpu"))
            scaler.scale(out["loss"] / 2).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                   out_file)
    dist.destroy_process_group()


def _accumulated_gradients(model, groups: list[list[dict]]) -> dict:
    """One process, as train.py steps: the micro-batches `groups`, each loss scaled by
    1/len(groups), their gradients summed; {name: gradient} of the parameters that got one."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for group in groups:
        out = step_loss(model, model, data.collate(group, model.tokenizer.pad_id),
                        torch.device("cpu"))
        scaler.scale(out["loss"] / len(groups)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _prepared(model):
    prep = data.Preprocess(model.input_spec, model.tokenizer, keep_original=True)
    base = data.ShapesDataset("train", 8, 64, 0)
    return [dict(prep(base[i]), index=i) for i in range(len(base))]


@pytest.mark.slow
@pytest.mark.parametrize("name,channels_last", [("maris", False), ("mmnet", True)])
def test_ddp_accumulation_equals_one_process(tmp_path, name, channels_last):
    """2 gloo processes x batch 2 x 2 accumulation steps (no_sync on the first) give the
    gradient of 1 process x batch 2 x 4 accumulation steps over the same 8 samples (the equal
    global batch is the equivalence: DDP averages over ranks what each rank averaged over its
    micro-batches). BatchNorm in eval mode; tolerance 1e-5 of the gradient's norm. MMNet's
    convolutions run channels-last (--channels-last): DDP's buckets take its NHWC gradients."""
    import torch.multiprocessing as mp

    out_file = str(tmp_path / "grads.pt")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out_file, name,
                                          channels_last), nprocs=2, start_method="spawn")
    ddp = torch.load(out_file)
    model = build(name).to(memory_format=memory_format(channels_last)).eval()
    items = _prepared(model)
    order = [i for _, i in TrainSampler(len(items), 0, 1, seed=0)]
    one = _accumulated_gradients(model, [[items[i] for i in order[2 * micro: 2 * micro + 2]]
                                         for micro in range(4)])
    assert one.keys() == ddp.keys()
    a, b = torch.cat([ddp[k].flatten() for k in one]), torch.cat([one[k].flatten() for k in one])
    assert (a - b).norm() <= 1e-5 * b.norm()


def _token_bn_model(sync: bool):
    """M3Dec tiny with only its TokenBatchNorms in training mode (batch statistics; the conv
    BatchNorms, which sync only on CUDA as SyncBatchNorm, in eval mode), synchronised or not."""
    from common.layers import TokenBatchNorm

    model = build("m3dec").eval()
    for m in model.modules():
        if isinstance(m, TokenBatchNorm):
            m.train()
            m.sync = sync
    return model


@pytest.mark.slow
def test_synchronised_token_batchnorm_under_ddp_equals_the_global_batch(tmp_path):
    """M3Dec's TokenBatchNorm all-reduces its statistics inside the forward and their gradients
    inside the backward, while DDP all-reduces the parameters' gradients: 2 gloo processes x 2
    samples x 2 accumulation steps give the gradient of 1 process x 4 samples (both ranks'
    micro-batch) x 2 steps, whose statistics are the same global ones. Tolerance 1e-4 of the
    gradient's norm (measured 1.6e-5: normalising by statistics of 4 samples' tokens amplifies
    the summation order); without the synchronisation the gradient differs by 1.6x its norm."""
    import torch.multiprocessing as mp

    out_file = str(tmp_path / "grads.pt")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out_file, "m3dec", False,
                                          True), nprocs=2, start_method="spawn")
    ddp = torch.load(out_file)
    model = _token_bn_model(sync=False)
    items = _prepared(model)
    keys = [[i for _, i in TrainSampler(len(items), r, 2, seed=0)] for r in range(2)]
    one = _accumulated_gradients(model, [[items[i] for k in keys for i in k[2 * m: 2 * m + 2]]
                                         for m in range(2)])  # both ranks' micro-batch m
    assert one.keys() == ddp.keys()
    a, b = torch.cat([ddp[k].flatten() for k in one]), torch.cat([one[k].flatten() for k in one])
    assert (a - b).norm() <= 1e-4 * b.norm()
    # without the synchronisation each rank normalises with its own 2 samples: not the same
    model = _token_bn_model(sync=False)
    group = [items[i] for i in keys[0][:2]]
    out = step_loss(model, model, data.collate(group, model.tokenizer.pad_id),
                    torch.device("cpu"))
    out["loss"].backward()
    local = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in one])
    assert (local - b).norm() > 0.1 * b.norm()


# ---------------------------------------------------------------------------------------------
# Runs: frozen encoders from weight files, checkpoints, resume, logs
# ---------------------------------------------------------------------------------------------

SMALL = ["--model", "maris", "--shapes-train-size", "16", "--shapes-eval-size", "4",
         "--batch-size", "4", "--log-every", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A SAM-format file and a CLIP-format file holding MARIS tiny's own random encoders."""
    folder = tmp_path_factory.mktemp("weights")
    model = build("maris")
    image = str(folder / "sam_tiny.pth")
    torch.save({f"image_encoder.{k}": v for k, v in model.image_encoder.state_dict().items()},
               image)
    text = str(folder / "clip_tiny.pt")
    torch.save(model.text_encoder.state_dict(), text)
    return image, text


@pytest.fixture(scope="module")
def frozen_run(weight_files, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("frozen"))
    image, text = weight_files
    train.main(SMALL + ["--image-weights", image, "--text-weights", text, "--max-steps", "4",
                        "--epochs", "2", "--out", out, "--tensorboard"])
    return out


def test_frozen_encoders_are_stored_by_reference(frozen_run, weight_files):
    last = load_checkpoint(os.path.join(frozen_run, "last.pt"))
    best = load_checkpoint(os.path.join(frozen_run, "best.pt"))
    assert set(last["frozen"]) == {"image_encoder", "text_encoder"}
    assert last["frozen"]["image_encoder"]["path"] == os.path.abspath(weight_files[0])
    assert "optimizer" in last and "optimizer" not in best  # optimiser state: last.pt only
    model, _, _ = build_model_from_checkpoint(last)
    encoders = {n for n, _ in model.named_parameters()
                if n.startswith(("image_encoder.", "text_encoder."))}
    assert encoders and not encoders & set(last["model"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(last["model"])
    assert model.frozen_parts() == {"image", "text"}
    full = model.state_dict()
    assert all(torch.equal(full[k], v) for k, v in last["model"].items())
    trained = build("maris", image_weights=weight_files[0], text_weights=weight_files[1])
    assert torch.equal(full["image_encoder.pos_embed"], trained.image_encoder.pos_embed)


def test_a_changed_or_missing_weight_file_is_named(frozen_run, weight_files, tmp_path):
    ckpt = load_checkpoint(os.path.join(frozen_run, "last.pt"))
    moved = str(tmp_path / "sam.pth")
    shutil.copy(weight_files[0], moved)
    with open(moved, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="--image-weights.*not the file"):
        build_model_from_checkpoint(ckpt, weights={"image_weights": moved})
    ref = dict(ckpt["frozen"]["text_encoder"], path=str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match="gone.pt.*--text-weights"):
        build_model_from_checkpoint(dict(ckpt, frozen=dict(ckpt["frozen"],
                                                                 text_encoder=ref)))


def test_export_writes_a_self_contained_weights_file(frozen_run, tmp_path):
    dst = str(tmp_path / "export.pt")
    export_checkpoint(os.path.join(frozen_run, "last.pt"), dst)
    exported = load_checkpoint(dst)
    assert "optimizer" not in exported and not exported.get("frozen")
    assert any(k.startswith("image_encoder.") for k in exported["model"])
    model, _, _ = build_model_from_checkpoint(exported)
    again, _, _ = build_model_from_checkpoint(
        load_checkpoint(os.path.join(frozen_run, "last.pt")))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_self_contained_checkpoints_hold_every_weight(weight_files, tmp_path):
    image, text = weight_files
    out = str(tmp_path / "full")
    train.main(SMALL + ["--image-weights", image, "--text-weights", text, "--max-steps", "1",
                        "--no-val", "--no-tensorboard", "--out", out,
                        "--self-contained-checkpoints"])
    ckpt = load_checkpoint(os.path.join(out, "last.pt"))
    assert not ckpt["frozen"] and any(k.startswith("image_encoder.") for k in ckpt["model"])
    assert not os.path.exists(os.path.join(out, "tb"))  # --no-tensorboard
    model, _, _ = build_model_from_checkpoint(ckpt)
    assert model.frozen_parts() == {"image", "text"}  # frozen again, as in training


def test_logs_hold_throughput_gradients_memory_and_validation(frozen_run, tmp_path):
    with open(os.path.join(frozen_run, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["grad_norm"] > 0 and r["samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1
        assert r["memory_mb"] > 0
    val = [r for r in records if "val" in r]
    assert val and val[-1]["val"]["n"] == 4 and "candidates" in val[-1]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(frozen_run, "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "train/data_wait", "train/memory_mb", "val/mIoU"} <= tags
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "curves.png")
    plot_log(frozen_run, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_is_optional_unless_asked_for(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert open_tensorboard(None, str(tmp_path)) is None
    with pytest.raises(ImportError, match="pip install tensorboard"):
        open_tensorboard(True, str(tmp_path))


def test_resume_refuses_changed_settings_or_applies_them(frozen_run, weight_files, tmp_path):
    """Resuming with another --lr and --max-steps is refused with both differences listed;
    with --resume-override the new lr and schedule apply from the checkpoint's step on: the
    logged lr of step 5 is the new schedule's at step 4 (the old code kept the old lr and
    stretched the old schedule)."""
    image, text = weight_files
    out = str(tmp_path / "resumed")
    os.makedirs(out)
    shutil.copy(os.path.join(frozen_run, "last.pt"), out)
    args = SMALL + ["--image-weights", image, "--text-weights", text, "--epochs", "2",
                    "--no-val", "--no-tensorboard", "--out", out, "--resume", "auto"]
    with pytest.raises(ValueError, match=r"(?s)lr: 0.001 in the checkpoint, 0.002 now.*"
                                         r"max_steps: 4 in the checkpoint, 6 now"):
        train.main(args + ["--lr", "2e-3", "--max-steps", "6"])
    with pytest.raises(ValueError, match="not a run setting"):
        train.main(args + ["--lr", "2e-3", "--resume-override", "learning_rate"])
    train.main(args + ["--lr", "2e-3", "--max-steps", "6", "--resume-override", "lr,max_steps"])
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [5, 6]
    model = build("maris", image_weights=image, text_weights=text)
    optimizer, scheduler = model.configure_optimizers(2e-3, 6)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert records[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0], rel=1e-12)


def test_a_fresh_run_does_not_overwrite_a_run_folder(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(FileExistsError, match="already holds a run .log.jsonl.: it has no last.pt"):
        train.main(SMALL + ["--out", str(out)])
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


def test_a_paper_config_without_its_weight_files_stops(tmp_path):
    with pytest.raises(ValueError, match="(?s)--image-weights SAM ViT-H.*--text-weights OpenAI"):
        train.main(["--model", "maris", "--config", "paper", "--out", str(tmp_path / "p")])
    with pytest.raises(ValueError, match="--text-weights") as err:
        train.main(["--model", "maris", "--config", "paper-vit-b", "--image-weights", "x.pth",
                    "--out", str(tmp_path / "p")])
    assert "--image-weights" not in str(err.value)


def test_recipe_and_candidates_come_from_the_model():
    plan = BatchPlan(4, 1, 1)
    args = train.parse_args(["--model", "maris", "--set", "clip_grad=0.5", "--set", "hflip=false"])
    run = run_settings(args, build_config(maris, args), plan, None)
    assert run["clip_grad"] == 0.5 and run["augment"] is False
    args = train.parse_args(["--model", "maris", "--clip-grad", "0"])
    assert run_settings(args, maris.CONFIGS["tiny"], plan, None)["clip_grad"] == 0
    assert data.model_candidates(args, maris.MODEL.input_names) is None
    mail = load_model_module("mail")
    names = mail.MODEL.input_names_for(mail.CONFIGS["tiny"])
    assert data.model_candidates(train.parse_args(["--model", "mail"]), names) == "simulated"
    oracle = train.parse_args(["--model", "mail", "--oracle-candidates"])
    assert data.model_candidates(oracle, names) == "oracle"
    run = run_settings(oracle, mail.CONFIGS["tiny"], plan, "oracle")
    assert run["candidates"] == "oracle"


def test_random_states_are_per_rank_and_cuda_only_for_existing_devices(monkeypatch):
    seed_rank(0, 1)
    one = torch.rand(3)
    seed_rank(0, 2)
    assert not torch.equal(one, torch.rand(3))
    states = [dict(rng_state(), torch=torch.manual_seed(r).get_state()) for r in range(2)]
    restore_rng(states, rank=1, world=2, seed=0, step=5)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    # each rank saves and restores its own device's generator only, never every device's
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i="cuda": restored.append(i))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(range(len(s))))
    set_rng_state(dict(rng_state(), cuda_device=torch.zeros(16, dtype=torch.uint8)))
    assert restored == ["cuda"]


def test_workers_pin_memory_and_persist_on_cuda_only():
    assert data.loader_options(2, cuda=True) == dict(num_workers=2, pin_memory=True,
                                                     persistent_workers=True)
    assert data.loader_options(2, cuda=False)["persistent_workers"] is False
    assert data.loader_options(0, cuda=True)["persistent_workers"] is False


def test_each_epoch_prints_the_elapsed_and_the_remaining_time(tmp_path, capsys):
    """The per-epoch line says how long the run has taken and how long it still needs, from the
    measured time per step."""
    train.main(["--model", "maris", "--shapes-train-size", "2", "--batch-size", "2",
                "--epochs", "2", "--no-val", "--workers", "0", "--no-tensorboard",
                "--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1 step 1/2", "epoch 2 step 2/2"]
    assert "elapsed " in lines[0] and ", ETA " in lines[0] and "ETA ?" not in lines[0]
    assert lines[1].endswith(", ETA 0s)")  # nothing left at the end


def test_remaining_time_is_the_mean_step_time_times_the_steps_left():
    assert time_left(120.0, 10, 25) == "elapsed 2m00s, ETA 5m00s"
    assert time_left(5.0, 0, 25) == "elapsed 5s, ETA ?"  # no step measured yet
    assert duration(3725) == "1h02m"
