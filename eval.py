"""Evaluate a checkpoint, visualise its predictions, or predict one image + sentence.

  python eval.py --checkpoint runs/maris-tiny-shapes/best.pt                   # val split
  python eval.py --checkpoint C --dataset refcoco --data-root D --split val testA testB \
--json m.json
  torchrun --nproc_per_node=2 eval.py --checkpoint C                         # same numbers, faster
  python eval.py --checkpoint C --save-vis vis/ --num-vis 16                  # overlays
  python eval.py --checkpoint C --image photo.jpg --text "the dog on the left" --save-mask dog.png
  python eval.py --checkpoint C --export weights.pt       # a self-contained, weights-only file
  python eval.py --plot runs/maris-tiny-shapes            # loss and val curves -> PNG

Metrics (common.metrics) are computed per (image, sentence) at the image's original resolution,
in fp32 whatever --amp the model runs under: mIoU, oIoU, Pr@0.5 ... Pr@0.9, and n, the number of
samples. Data flags default to the ones the checkpoint was trained with, the candidate source of
a model that takes candidate masks (MaIL) included. --json writes one layout:
  {"model": NAME, "config": CONFIG, "checkpoint": PATH, "dataset": NAME,
   "candidates": "simulated" | "oracle" | PROPOSALS FILE NAME | null,
   "splits": {SPLIT: {"mIoU", "oIoU", "Pr@0.5", ..., "Pr@0.9", "n"}}}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import data
import train
from common.metrics import THRESHOLDS

# ---------------------------------------------------------------------------------------------
# Visualisation
# ---------------------------------------------------------------------------------------------

PRED_COLOUR, GT_COLOUR = np.array([230, 40, 40]), np.array([40, 200, 70])


def overlay(image: np.ndarray, mask: np.ndarray, colour: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.astype(np.uint8)


def heatmap(image: np.ndarray, value: np.ndarray) -> np.ndarray:
    """A map in [0, 1] of any size, resized onto the image and blended as a blue-red heat map."""
    v = np.asarray(Image.fromarray((np.clip(value, 0, 1) * 255).astype(np.uint8))
                   .resize(image.shape[1::-1], Image.BILINEAR), dtype=np.float32)[:, :, None] / 255
    heat = np.concatenate([v, 0.2 * np.ones_like(v), 1 - v], 2) * 255
    return (0.45 * image + 0.55 * heat).astype(np.uint8)


def compose(panels: list[tuple[str, np.ndarray]], header: str, width: int = 256) -> Image.Image:
    """Panels (title, uint8 image) side by side, wrapping every 6, under a header line."""
    font = ImageFont.load_default()
    tiles = []
    for title, img in panels:
        im = Image.fromarray(img)
        im = im.resize((width, max(1, round(im.height * width / im.width))), Image.BILINEAR)
        tile = Image.new("RGB", (width, im.height + 14), "white")
        tile.paste(im, (0, 14))
        ImageDraw.Draw(tile).text((2, 1), title[:42], fill="black", font=font)
        tiles.append(tile)
    cols = min(6, len(tiles))
    rows = -(-len(tiles) // cols)
    th = max(t.height for t in tiles)
    sheet = Image.new("RGB", (cols * width, rows * th + 18), "white")
    ImageDraw.Draw(sheet).text((2, 3), header[:160], fill="black", font=font)
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * width, 18 + (k // cols) * th))
    return sheet


def visual(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, sentence: str,
           extra: list[tuple[str, torch.Tensor]], iou: float | None = None) -> Image.Image:
    panels = [("prediction", overlay(image, pred, PRED_COLOUR))]
    if gt is not None:
        panels.append(("ground truth", overlay(image, gt, GT_COLOUR)))
    for title, value in extra:
        panels.append((title, heatmap(image, value.detach().float().cpu().numpy())))
    header = f'"{sentence}"' + (f"  IoU={iou:.3f}" if iou is not None else "")
    return compose(panels, header)


# ---------------------------------------------------------------------------------------------
# Prediction on one image
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, image: np.ndarray, sentence: str, device="cpu",
            candidates: np.ndarray | None = None, amp: str = "none") -> tuple[np.ndarray, dict]:
    """Mask (H0, W0) bool for one uint8 RGB image and one sentence, at the image's resolution,
    with the model on `device` (and under `amp`: none | bf16 | fp16).
    candidates: bool (K, H0, W0) instance masks for MaIL; without them it gets one empty
    candidate and segments from the image and the words alone."""
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names)
    device = torch.device(device)
    if candidates is None:
        candidates = np.zeros((0, *image.shape[:2]), bool)
    if candidates.shape[1:] != image.shape[:2]:
        raise ValueError(f"candidate masks are {candidates.shape[1:]}, the image {image.shape[:2]}")
    sample = dict(image=image, sentence=sentence, mask=np.zeros(image.shape[:2], bool),
                  instances=candidates.astype(bool))
    item = prep(sample)
    item["index"] = 0
    batch = data.to_device(data.collate([item], model.tokenizer.pad_id), device, model.input_spec)
    model.eval()
    with train.autocast(device, amp):
        out = model(**model.inputs_from(batch))
    # to_original upsamples in fp32: the threshold never sees bf16/fp16 rounding
    logits = data.to_original(out["mask_logits"][0], batch["valid_hw"][0], batch["orig_hw"][0])
    return (logits > 0).cpu().numpy(), out


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Achieved GFLOP/s of an n x n matmul in `dtype`: the reference for model FLOP utilisation."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
    seconds = median_time(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / seconds / 1e9


def count_flops(fn) -> int:
    """Model FLOPs of `fn()` (forward, or forward and backward), counted by torch's
    FlopCounterMode, with attention counted alike whichever kernel SDPA picks:

    - torch's registry has no formula for the CPU flash-attention kernels SDPA picks when dropout
      is off (torch 2.14 counts them as 0 FLOPs); they get torch's own SDPA formula;
    - torch counts the fused backward kernels with the recomputation of the attention scores (5
      matmuls where explicit attention has 4); model FLOPs, what MFU divides by, leave recompute
      out, so every SDPA backward counts twice its forward, as explicit attention does.
    SDPA and the same attention written with matmuls and a softmax count the same (tested)."""
    from torch.utils import flop_counter

    def sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments are shapes
        return flop_counter.sdpa_flop_count(query, key, value)

    def sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * flop_counter.sdpa_flop_count(query, key, value)

    kernels = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"]
    mapping = {}
    for name in kernels:
        for suffix, formula in (("", sdpa), ("_backward", sdpa_backward)):
            if hasattr(torch.ops.aten, name + suffix):
                mapping[getattr(torch.ops.aten, name + suffix)] = formula
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def bench_batch(model, n: int, device) -> dict:
    """A real batch of synthetic shapes at the model's own input size."""
    spec = model.input_spec
    side = spec.max_size if spec.resize == "shorter" else spec.size
    base = data.ShapesDataset("val", n, side, seed=0,
                              instances="cand_masks" in model.input_names)
    prep = data.Preprocess(spec, model.tokenizer, candidates="cand_masks" in model.input_names)
    items = [dict(prep(base[i]), index=i) for i in range(n)]
    return data.to_device(data.collate(items, model.tokenizer.pad_id), device, spec)


def bench_model(name: str, config: str, device: torch.device, batch_size: int, amp: str,
                warmup: int, repeats: int, freeze: bool, cached: bool) -> dict:
    """One row of the benchmark table (see README, "Reading the benchmark")."""
    import dataclasses
    import resource
    import warnings

    from common.encoders import quiet_random_init
    from common.model import count_parameters

    module = train.load_model_module(name)
    cfg = module.CONFIGS[config]
    if freeze:
        cfg = dataclasses.replace(cfg, freeze_encoders=True)
    if hasattr(module, "prepare_config"):  # a vocabulary from synthetic sentences (M3Dec's GRU)
        cfg = module.prepare_config(cfg, data.sentences(data.ShapesDataset("train", 200)))
    torch.manual_seed(0)
    with quiet_random_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.MODEL(cfg).to(device)
    total, trainable = count_parameters(model)
    one, batch = bench_batch(model, 1, device), bench_batch(model, batch_size, device)
    feats = {}
    if cached:  # the step trains from stored encoder features (common.cache) instead
        with torch.no_grad():
            if "image" in model.frozen_parts():
                feats["image_feats"] = model.encode_image(batch["image"])
            if "text" in model.frozen_parts():
                feats["text_feats"] = model.encode_text(batch["text"], batch["text_mask"])
    model.eval()

    @torch.no_grad()
    def forward():
        with train.autocast(device, amp):
            model(**model.inputs_from(one))

    fwd_flops = count_flops(forward)
    latency = median_time(forward, device, warmup, repeats)
    model.train()
    optimizer, _ = model.configure_optimizers(1e-6, 1000)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with train.autocast(device, amp):
            loss = model(**model.inputs_from(batch), **feats, target=batch["mask"])["loss"]
        loss.backward()
        optimizer.step()

    train_flops = count_flops(step)
    step_time = median_time(step, device, warmup, repeats)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the whole process's peak resident memory
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = matmul_peak(device, torch.bfloat16 if amp == "bf16" else torch.float32)
    achieved = train_flops / step_time / 1e9
    return {
        "model": name + (" (cached)" if cached else ""), "config": config,
        "device": str(device), "amp": amp, "threads": torch.get_num_threads(),
        "params_M": total / 1e6, "trainable_M": trainable / 1e6,
        "fwd_GFLOPs": fwd_flops / 1e9, "fwd_ms_b1": latency * 1e3, "batch": batch_size,
        "step_ms": step_time * 1e3, "samples_s": batch_size / step_time,
        "step_GFLOPs": train_flops / 1e9, "GFLOP_s": achieved, "peak_GFLOP_s": peak,
        "MFU": achieved / peak, "peak_mem_GiB": peak_mem,
    }


BENCH_COLUMNS = [("model", "{:<16}"), ("config", "{:<12}"), ("params_M", "{:>8.2f}"),
                 ("trainable_M", "{:>8.2f}"), ("fwd_GFLOPs", "{:>9.2f}"), ("fwd_ms_b1", "{:>9.1f}"),
                 ("batch", "{:>5}"), ("step_ms", "{:>9.1f}"), ("samples_s", "{:>8.2f}"),
                 ("GFLOP_s", "{:>8.1f}"), ("peak_GFLOP_s", "{:>8.1f}"), ("MFU", "{:>6.1%}"),
                 ("peak_mem_GiB", "{:>7.2f}")]
BENCH_HEADERS = ["model", "config", "params M", "train M", "fwd GFLOP", "fwd ms b1", "batch",
                 "step ms", "sample/s", "GFLOP/s", "peak", "MFU", "mem GiB"]


def print_bench(rows: list[dict]) -> None:
    widths = [len(fmt.format(rows[0][k])) if rows else 8 for k, fmt in BENCH_COLUMNS]
    print(" ".join(h.rjust(w) if i > 1 else h.ljust(w)
                   for i, (h, w) in enumerate(zip(BENCH_HEADERS, widths))))
    for r in rows:
        print(" ".join(fmt.format(r[k]) for k, fmt in BENCH_COLUMNS))
    if rows:
        r = rows[0]
        print(f"device {r['device']}, amp {r['amp']}, {r['threads']} threads; medians over repeats "
              "after warm-up; peak = measured matmul GFLOP/s in the same run; mem = "
              + ("peak allocated" if r["device"].startswith("cuda") else "peak process RSS"))


def run_benchmark(args) -> list[dict]:
    import subprocess

    names = train.MODELS if args.model == "all" else [args.model]
    names = [n for n in names if importlib.util.find_spec(n) is not None]
    device = torch.device(args.device)
    rows = []
    for name in names:
        module = train.load_model_module(name)
        configs = [args.config] if args.config in module.CONFIGS else []
        for config in configs:
            batch = args.batch_size or (8 if config == "tiny" else 1)
            variants = [False]
            if args.freeze_encoders and hasattr(module.MODEL, "frozen_parts"):
                variants.append(True)
            for cached in variants:
                if len(names) > 1 or len(variants) > 1:  # one process per row: clean peak memory
                    cmd = [sys.executable, os.path.abspath(__file__), "--benchmark",
                           "--model", name, "--config", config, "--device", args.device,
                           "--batch-size", str(batch), "--amp", args.amp, "--warmup",
                           str(args.warmup), "--repeats", str(args.repeats), "--row-json", "-"]
                    cmd += ["--freeze-encoders"] * args.freeze_encoders + ["--cached"] * cached
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode:
                        raise RuntimeError(f"benchmark of {name}/{config} failed:\n"
                                           f"{res.stderr[-3000:]}")
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                else:
                    rows.append(bench_model(name, config, device, batch, args.amp, args.warmup,
                                            args.repeats, args.freeze_encoders, cached))
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


RENAMED = {"--out": "--save-mask"}  # eval.py flags renamed so that a flag means one thing in
# train.py and eval.py (train.py's --out is a run folder)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint written by train.py")
    p.add_argument("--split", nargs="+", default=["val"], help="one or more splits (or: all)")
    p.add_argument("--json", default=None,
                   help="write the metrics here (layout in the description above)")
    p.add_argument("--save-vis", default=None, metavar="DIR", help="write overlay PNGs here")
    p.add_argument("--num-vis", type=int, default=16,
                   help="how many samples to visualise per split")
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation: 8; benchmark: 8 tiny, 1 paper")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="the model's precision (default bf16 on CUDA, none on CPU); metrics are "
                        "computed in fp32 either way")
    p.add_argument("--device", default=None,
                   help="cpu | cuda | cuda:N (default: cuda if available; under torchrun each "
                        "process's own GPU)")
    p.add_argument("--cache-features", default=None, metavar="DIR",
                   help="read/write frozen encoders' features here (as train.py --cache-features)")
    p.add_argument("--image", default=None, help="predict on this image (with --text)")
    p.add_argument("--text", default=None, help="the referring expression for --image")
    p.add_argument("--save-mask", default=None, metavar="PNG",
                   help="mask PNG for --image (default IMAGE.mask.png); the overlay goes beside it")
    for old in RENAMED:
        p.add_argument(old, dest="renamed_" + old.strip("-"), default=None,
                       help=argparse.SUPPRESS)
    p.add_argument("--image-id", type=int, default=None,
                   help="MaIL: --image's id in --candidates (default: the file's only image)")
    p.add_argument("--export", default=None, metavar="OUT.pt",
                   help="write --checkpoint as a self-contained weights-only file "
                        "(train.export_checkpoint) and stop")
    p.add_argument("--plot", default=None, metavar="RUN_DIR",
                   help="draw the loss and validation curves of a run's log.jsonl to a PNG "
                        "(train.plot_log) and stop; no checkpoint needed")
    p.add_argument("--plot-out", default=None, metavar="PNG",
                   help="where --plot writes (default RUN_DIR/curves.png)")
    train.add_data_args(p)
    g = p.add_argument_group("benchmark (no checkpoint needed)")
    g.add_argument("--benchmark", action="store_true", help="print the speed/memory table")
    g.add_argument("--model", default="all", help="a model name or all")
    g.add_argument("--config", default="tiny", help="config of each model to benchmark")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--freeze-encoders", action="store_true",
                   help="freeze encoders (the paper's MARIS setting) and add a row training "
                        "from cached features")
    g.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--row-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for old, new in RENAMED.items():
        if getattr(args, "renamed_" + old.strip("-")) is not None:
            p.error(f"eval.py {old} is now {new} (in train.py, {old} is the run folder)")
    if (args.image is None) != (args.text is None):
        p.error("--image and --text go together")
    if args.plot is None and not args.benchmark and args.checkpoint is None:
        p.error("--checkpoint is needed (except with --benchmark or --plot)")
    return args


def predict_candidates(args, model, image: np.ndarray) -> np.ndarray | None:
    """--image's candidate masks from --candidates (entries of --image-id, or of the file's only
    image), at the image's resolution; None when the model takes none or no file is given."""
    if "cand_masks" not in model.input_names:
        return None
    if args.oracle_candidates:
        raise ValueError("--oracle-candidates: a single image has no annotated instances; give "
                         "its proposals with --candidates")
    if not args.candidates:
        print("no --candidates: MaIL segments from the image and the sentence alone (one empty "
              "candidate mask)")
        return None
    by_image = data.load_candidates(args.candidates)
    image_id = args.image_id
    if image_id is None:
        if len(by_image) != 1:
            raise ValueError(f"{args.candidates!r} holds {len(by_image)} images: say which one "
                             "is --image with --image-id")
        image_id = next(iter(by_image))
    masks = data.candidate_masks(by_image.get(image_id, []), *image.shape[:2])
    if not len(masks):
        raise ValueError(f"{args.candidates!r} has no candidates for image_id {image_id}")
    return masks


def run_predict(args, model, device) -> None:
    image = data.load_image(args.image, exif=True)  # the user's photo, as their viewer shows it
    mask, out = predict(model, image, args.text, device, predict_candidates(args, model, image),
                        getattr(args, "amp", None) or "none")
    path = args.save_mask or os.path.splitext(args.image)[0] + ".mask.png"
    Image.fromarray((mask * 255).astype(np.uint8)).save(path)
    root, _ = os.path.splitext(path)
    visual(image, mask, None, args.text, model.vis_panels(out, 0)).save(root + ".overlay.png")
    print(f"mask ({mask.mean() * 100:.1f}% of the image) -> {path}; overlay -> {root}.overlay.png")


def pick_device(requested: str | None, rank_device: torch.device, world: int) -> torch.device:
    """--device, or the process's own device (train.setup_distributed: its GPU, else the CPU).
    Under torchrun each process keeps its own device, whose type must be the requested one."""
    if requested is None:
        return rank_device
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: no CUDA device is available here")
    if world > 1:
        if device.type != rank_device.type:
            raise ValueError(f"--device {requested} under torchrun: each process uses "
                             f"{rank_device.type} (its own GPU when there is one); hide the GPUs "
                             "(CUDA_VISIBLE_DEVICES=) to evaluate on CPUs")
        return rank_device
    return device


def resolve_candidates(args, trained: dict, model) -> str | None:
    """The candidate source of a model that takes candidate masks (data.candidate_source): the
    one given on the command line, else the training run's. None for any other model."""
    if "cand_masks" not in model.input_names:
        if args.candidates or args.oracle_candidates:
            warnings.warn("this model takes no candidate masks: --candidates / "
                          "--oracle-candidates are ignored", stacklevel=2)
        args.candidates, args.oracle_candidates = None, False
        return None
    if not args.candidates and not args.oracle_candidates:  # the training run's source
        args.candidates = trained.get("candidates")
        args.oracle_candidates = bool(trained.get("oracle_candidates"))
    return data.candidate_source(args.dataset, args.candidates, args.oracle_candidates)


CANDIDATE_WORDS = {"oracle": "the annotated instances, the referred object's exact mask among "
                             "them: an upper bound, not comparable with the paper",
                   "simulated": "a simulated detector's proposals (common.proposals)"}


def candidate_title(source: str) -> str:
    """The candidate source as the results table names it: an oracle says it is one."""
    label = data.candidate_label(source)
    return "oracle (upper bound)" if label == "oracle" else label


def describe_candidates(source: str) -> str:
    words = CANDIDATE_WORDS.get(source, f"proposals file {source}")
    return f"{candidate_title(source)}: {words}"


def run_tool(args) -> dict:
    """--plot and --export: the two train.py helpers, from eval.py's command line."""
    if args.plot is not None:
        png = args.plot_out or os.path.join(args.plot, "curves.png")
        train.plot_log(args.plot, png)
        print(f"curves of {args.plot} -> {png}")
        return {"plot": png}
    train.export_checkpoint(args.checkpoint, args.export)
    print(f"{args.checkpoint} -> {args.export} (self-contained, weights only)")
    return {"export": args.export}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot is not None or args.export is not None:
        return run_tool(args)
    if args.benchmark:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
        if args.row_json:  # one row, in this process (called by run_benchmark)
            train.flush_denormals()  # as training does
            row = bench_model(args.model, args.config, torch.device(args.device),
                              args.batch_size, args.amp, args.warmup, args.repeats,
                              args.freeze_encoders, args.cached)
            print(json.dumps(row))
            return row
        rows = run_benchmark(args)
        print_bench(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return {"rows": rows}
    ckpt = train.load_checkpoint(args.checkpoint)
    rank, world, rank_device = train.setup_distributed()
    device = pick_device(args.device, rank_device, world)
    model, module, cfg = train.build_model_from_checkpoint(ckpt, device)
    model.eval()
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if args.image is not None:
        if rank == 0:
            run_predict(args, model, device)
        return {}

    # data flags the user did not give come from the training run
    trained = ckpt.get("args", {})
    defaults = vars(parse_args(["--checkpoint", args.checkpoint]))
    for key in ("dataset", "split_by", "data_root", "image_dir", "shapes_eval_size",
                "shapes_image_size", "data_seed"):
        if getattr(args, key) == defaults[key] and trained.get(key) is not None:
            setattr(args, key, trained[key])
    source = resolve_candidates(args, trained, model)
    if args.workers is None:
        args.workers = 0
    args.seed = trained.get("seed", 0)
    splits = args.split
    if splits == ["all"]:
        split_by = args.split_by or data.DEFAULT_SPLIT_BY.get(args.dataset)
        splits = [s for s in data.SPLITS.get((args.dataset, split_by), ("train", "val", "test"))
                  if s != "train"]
    if rank == 0 and source is not None:
        print(f"candidate masks: {describe_candidates(source)}", flush=True)

    cache = None
    if args.cache_features:
        from common.cache import FeatureCache

        cache = FeatureCache(args.cache_features, model)
    results = {}
    for split in splits:
        loader = train.make_eval_loader(args, split, model, rank, world, args.batch_size or 8)
        on_batch = None
        if args.save_vis:
            os.makedirs(args.save_vis, exist_ok=True)
            on_batch = make_visualiser(args, split, model, loader.dataset)
        # train.evaluate shows the progress bar (rank 0, on a terminal) and thresholds in fp32
        results[split] = train.evaluate(model, loader, device, args.amp, on_batch, cache)
    if rank == 0:
        title = f"{ckpt['model_name']} ({args.checkpoint}) on {args.dataset}"
        if source is not None:
            title += f", candidates: {candidate_title(source)}"
        print_table(results, title)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(json_report(ckpt, args, source, results), f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return results


def json_report(ckpt: dict, args, source: str | None, results: dict) -> dict:
    """--json's one layout, whatever the number of splits (see the module docstring); the
    synthetic data's per-type rows are printed, not written."""
    return {
        "model": ckpt["model_name"],
        "config": ckpt.get("args", {}).get("config"),
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "candidates": None if source is None else data.candidate_label(source),
        "splits": {split: {k: v for k, v in m.items() if k != "by_type"}
                   for split, m in results.items()},
    }


def make_visualiser(args, split: str, model, dataset):
    count = {"n": 0}

    def on_batch(batch, out, ious):
        for i, idx in enumerate(batch["index"].tolist()):
            if count["n"] >= args.num_vis:
                return
            count["n"] += 1
            image = dataset.base[idx]["image"]
            pred = data.to_original(out["mask_logits"][i], batch["valid_hw"][i],
                                    batch["orig_hw"][i]) > 0
            visual(image, pred.cpu().numpy(), batch["gt"][i].cpu().numpy(), batch["sentence"][i],
                   model.vis_panels(out, i), ious[i]).save(
                os.path.join(args.save_vis, f"{split}_{idx:06d}.png"))

    return on_batch


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


if __name__ == "__main__":
    main()
