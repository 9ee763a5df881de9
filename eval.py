"""Evaluate a checkpoint (or compare several), visualise its predictions, or predict one image +
sentence.

  python eval.py --checkpoint runs/maris-tiny-shapes/best.pt                   # val split
  python eval.py --checkpoint C --dataset refcoco --data-root D --split val testA testB \
--json m.json
  torchrun --nproc_per_node=2 eval.py --checkpoint C                         # same numbers, faster
  python eval.py --checkpoint runs/a/best.pt=base runs/b/best.pt=no-maa        # comparison table
  python eval.py --checkpoint C --save-vis vis/ --num-vis 16                  # overlays
  python eval.py --checkpoint C --image photo.jpg --text "the dog on the left" --save-mask dog.png
  python eval.py --checkpoint C --export weights.pt       # a self-contained, weights-only file
  python eval.py --plot runs/maris-tiny-shapes            # loss and val curves -> PNG

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

import argparse
import dataclasses
import gc
import json
import os
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import data
import train
from common.benchmark import benchmark_command
from common.metrics import THRESHOLDS

# ---------------------------------------------------------------------------------------------
# Visualisation
# ---------------------------------------------------------------------------------------------

# Mask colours that no synthetic shape has (data.COLOURS: red, green, blue, yellow, purple), so
# that a mask stays visible on the very shape it covers.
PRED_COLOUR = np.array([0, 230, 255])  # cyan
GT_COLOUR = np.array([255, 0, 255])  # magenta
PANEL_WIDTH = 256  # pixels; outlines are drawn at this size, so they look alike for any image
OUTLINE_PX, FILL_ALPHA = 2, 0.25  # a solid edge says where the mask is, a light fill what it covers
HEADER_PX, TITLE_PX, LEGEND_BOX = 32, 14, 10  # header (sentence, legend) and panel-title heights


def to_width(array: np.ndarray, width: int, resample) -> np.ndarray:
    """An image (H, W, 3) uint8 or a mask (H, W) bool resized to `width`, keeping its aspect."""
    height = max(1, round(array.shape[0] * width / array.shape[1]))
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def edge(mask: np.ndarray, px: int) -> np.ndarray:
    """The pixels of `mask` within `px` pixels of its border (4-neighbour erosion; the image's
    border counts as outside, so a mask touching it is outlined there too)."""
    inner = mask
    for _ in range(px):
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """`mask` on `image`: a light fill of `colour` and a solid OUTLINE_PX outline of it."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - FILL_ALPHA) * out[mask] + FILL_ALPHA * colour
    out[edge(mask, OUTLINE_PX)] = colour
    return out.astype(np.uint8)


def heatmap(image: np.ndarray, value: np.ndarray) -> np.ndarray:
    """A map in [0, 1] of any size, resized onto the image and blended as a blue-red heat map."""
    v = np.asarray(Image.fromarray((np.clip(value, 0, 1) * 255).astype(np.uint8))
                   .resize(image.shape[1::-1], Image.BILINEAR), dtype=np.float32)[:, :, None] / 255
    heat = np.concatenate([v, 0.2 * np.ones_like(v), 1 - v], 2) * 255
    return (0.45 * image + 0.55 * heat).astype(np.uint8)


def compose(panels: list[tuple[str, np.ndarray]], header: str,
            legend: Sequence[tuple[str, np.ndarray]] = (),
            width: int = PANEL_WIDTH) -> Image.Image:
    """Panels (title, uint8 image) side by side, wrapping every 6, under a header: one line of
    text and a legend line of (label, colour) boxes."""
    font = ImageFont.load_default()
    tiles = []
    for title, img in panels:
        im = Image.fromarray(img)
        im = im.resize((width, max(1, round(im.height * width / im.width))), Image.BILINEAR)
        tile = Image.new("RGB", (width, im.height + TITLE_PX), "white")
        tile.paste(im, (0, TITLE_PX))
        ImageDraw.Draw(tile).text((2, 1), title[:42], fill="black", font=font)
        tiles.append(tile)
    cols = min(6, len(tiles))
    rows = -(-len(tiles) // cols)
    th = max(t.height for t in tiles)
    sheet = Image.new("RGB", (cols * width, rows * th + HEADER_PX), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 3), header[:160], fill="black", font=font)
    x = 2
    for label, colour in legend:  # a box of the colour, then its label
        draw.rectangle((x, 18, x + LEGEND_BOX, 18 + LEGEND_BOX), fill=tuple(int(c) for c in colour),
                       outline="black")
        draw.text((x + LEGEND_BOX + 4, 17), label, fill="black", font=font)
        x += LEGEND_BOX + 12 + round(draw.textlength(label, font=font))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * width, HEADER_PX + (k // cols) * th))
    return sheet


def visual(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, sentence: str,
           extra: list[tuple[str, torch.Tensor]], iou: float | None = None) -> Image.Image:
    """The prediction and the ground truth (when known) outlined on the image, then the model's
    own panels (vis_panels: the paper's figures) as heat maps, under the sentence and a legend."""
    image = to_width(image, PANEL_WIDTH, Image.BILINEAR)  # outlines at the size they are seen
    panels = [("prediction", overlay(image, to_width(pred, PANEL_WIDTH, Image.NEAREST),
                                     PRED_COLOUR))]
    legend = [("prediction", PRED_COLOUR)]
    if gt is not None:
        panels.append(("ground truth", overlay(image, to_width(gt, PANEL_WIDTH, Image.NEAREST),
                                               GT_COLOUR)))
        legend.append(("ground truth", GT_COLOUR))
    for title, value in extra:
        panels.append((title, heatmap(image, value.detach().float().cpu().numpy())))
    header = f'"{sentence}"' + (f"  IoU={iou:.3f}" if iou is not None else "")
    return compose(panels, header, legend)


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
# Command line
# ---------------------------------------------------------------------------------------------


RENAMED = {"--out": "--save-mask"}  # eval.py flags renamed so that a flag means one thing in
# train.py and eval.py (train.py's --out is a run folder)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=None, metavar="CKPT[=LABEL]",
                   help="a checkpoint written by train.py; several: a comparison table (labels "
                        "optional, see above)")
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
    p.add_argument("--cache-storage", choices=("fp16", "bf16", "int8"), default=None,
                   help="how the cache stores features (default: as the training run did)")
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
    train.add_layout_arg(p)
    g = p.add_argument_group("benchmark (no checkpoint needed)")
    g.add_argument("--benchmark", action="store_true", help="print the speed/memory table")
    g.add_argument("--model", default="all", help="a model name or all")
    g.add_argument("--config", default="tiny", help="config of each model to benchmark")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--freeze-encoders", action="store_true",
                   help="freeze encoders (the paper's MARIS setting) and add a row training "
                        "from cached features")
    g.add_argument("--sentences-per-image", type=int, default=1, metavar="K",
                   help="with --freeze-encoders, add a row whose batch holds K sentences of each "
                        "image (train.py --sentences-per-image: one encoder pass per image)")
    g.add_argument("--compile", action="store_true",
                   help="time the model through torch.compile (FLOPs counted on the eager model)")
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
    args.runs = [split_label(c) for c in args.checkpoint or []]
    if len(args.runs) > 1:
        single = [flag for flag, value in (("--image", args.image), ("--save-mask", args.save_mask),
                                           ("--save-vis", args.save_vis),
                                           ("--export", args.export)) if value is not None]
        if single:
            p.error(f"{', '.join(single)} take(s) one checkpoint, not {len(args.runs)}")
        labels = [label for _, label in args.runs]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            p.error(f"several checkpoints labelled {twice}: name them, --checkpoint PATH=LABEL")
    return args


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
    path = args.runs[0][0]
    train.export_checkpoint(path, args.export)
    print(f"{path} -> {args.export} (self-contained, weights only)")
    return {"export": args.export}


DATA_FLAGS = ("dataset", "split_by", "data_root", "image_dir", "shapes_eval_size",
              "shapes_image_size", "data_seed")  # what a checkpoint's training run decides


def main(argv=None) -> dict:
    """Returns {SPLIT: metrics} for one checkpoint, {"checkpoints": [row, ...]} for several
    (each row as `evaluate_checkpoint` returns it)."""
    args = parse_args(argv)
    if args.plot is not None or args.export is not None:
        return run_tool(args)
    if args.benchmark:  # common.benchmark; several rows rerun this script, one per process
        return benchmark_command(args, os.path.abspath(__file__))
    rank, world, rank_device = train.setup_distributed()
    device = pick_device(args.device, rank_device, world)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if args.image is not None:
        model, _, _ = train.build_model_from_checkpoint(train.load_checkpoint(args.runs[0][0]),
                                                        device)
        if rank == 0:
            run_predict(args, model.eval(), device)
        return {}

    rows = []
    for path, label in args.runs:  # one at a time: a model's memory is freed before the next
        rows.append(evaluate_checkpoint(args, path, label, rank, world, device,
                                        same_data=rows[0]["data"] if rows else None))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        if len(rows) == 1:
            row = rows[0]
            title = f"{row['model']} ({row['checkpoint']}) on {row['dataset']}"
            if row["source"] is not None:
                title += f", candidates: {candidate_title(row['source'])}"
            print_table(row["results"], title)
        else:
            print_comparison(rows)
        if args.json:
            report = (json_report(rows[0], alone=True) if len(rows) == 1
                      else {"checkpoints": [json_report(row) for row in rows]})
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return rows[0]["results"] if len(rows) == 1 else {"checkpoints": rows}


def data_args(args, trained: dict) -> argparse.Namespace:
    """A copy of the command line's args whose data flags the user did not give come from the
    training run (`trained`, the checkpoint's args)."""
    run = argparse.Namespace(**vars(args))
    defaults = vars(parse_args(["--checkpoint", "unused.pt"]))
    for key in DATA_FLAGS:
        if getattr(args, key) == defaults[key] and trained.get(key) is not None:
            setattr(run, key, trained[key])
    if run.workers is None:
        run.workers = 0
    run.seed = trained.get("seed", 0)
    return run


def evaluate_checkpoint(args, path: str, label: str, rank: int, world: int, device,
                        same_data: dict | None = None) -> dict:
    """One checkpoint on every split, as eval.py evaluates it alone. Returns the row {"label",
    "checkpoint", "model", "config", "dataset", "source" (data.candidate_source or None),
    "changes", "data" (its resolved DATA_FLAGS), "results" {SPLIT: metrics}}. `same_data`:
    another row's "data", which this checkpoint's must equal (a comparison on the same data)."""
    ckpt = train.load_checkpoint(path)
    trained = ckpt.get("args", {})
    run = data_args(args, trained)
    resolved = {key: getattr(run, key) for key in DATA_FLAGS}
    if same_data is not None and resolved != same_data:
        differ = {k: (same_data[k], v) for k, v in resolved.items() if same_data[k] != v}
        raise ValueError(f"{path} was trained on other data than the first checkpoint "
                         f"(flag: (first, this) {differ}); give these flags on the command "
                         "line so that every checkpoint is evaluated on the same data")
    model, module, _ = train.build_model_from_checkpoint(ckpt, device)
    model.to(memory_format=train.memory_format(args.channels_last)).eval()
    source = resolve_candidates(run, trained, model)
    splits = run.split
    if splits == ["all"]:
        split_by = run.split_by or data.DEFAULT_SPLIT_BY.get(run.dataset)
        splits = [s for s in data.SPLITS.get((run.dataset, split_by), ("train", "val", "test"))
                  if s != "train"]
    if rank == 0 and source is not None:
        who = f"{label}: " if len(args.runs) > 1 else ""
        print(f"{who}candidate masks: {describe_candidates(source)}", flush=True)

    cache = None
    if run.cache_features:
        from common.cache import FeatureCache

        cache = FeatureCache(run.cache_features, model,
                             run.cache_storage or trained.get("cache_storage", "fp16"))
    results = {}
    for split in splits:
        loader = train.make_eval_loader(run, split, model, rank, world, run.batch_size or 8)
        on_batch = None
        if run.save_vis:
            os.makedirs(run.save_vis, exist_ok=True)
            on_batch = make_visualiser(run, split, model, loader.dataset)
        # train.evaluate shows the progress bar (rank 0, on a terminal) and thresholds in fp32
        results[split] = train.evaluate(model, loader, device, run.amp, on_batch, cache)
    return dict(label=label, checkpoint=path, model=ckpt["model_name"],
                config=trained.get("config"), dataset=run.dataset, source=source,
                changes=config_changes(ckpt, module), data=resolved, results=results)


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


def json_report(row: dict, alone: bool = False) -> dict:
    """--json's layout for one checkpoint (see the module docstring): alone, exactly the one
    layout, the synthetic data's per-type rows printed, not written; in a comparison, also its
    label, its config changes and the per-type metrics."""
    report = {
        "model": row["model"],
        "config": row["config"],
        "checkpoint": row["checkpoint"],
        "dataset": row["dataset"],
        "candidates": None if row["source"] is None else data.candidate_label(row["source"]),
        "splits": {split: {k: v for k, v in m.items() if not alone or k != "by_type"}
                   for split, m in row["results"].items()},
    }
    if not alone:
        report = {"label": row["label"], **report, "changes": row["changes"]}
    return report


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


def print_comparison(rows: list[dict]) -> None:
    """One table per split, a row per checkpoint (module docstring); on the synthetic data the
    per-type columns are each sentence type's mIoU."""
    metrics = ["mIoU", "oIoU"] + [f"Pr@{t}" for t in THRESHOLDS]
    text = lambda row: [row["label"], row["model"], str(row["config"]),
                        "-" if row["source"] is None else candidate_title(row["source"])]
    width = [max(len(h), *(len(text(r)[k]) for r in rows)) + 2
             for k, h in enumerate(("checkpoint", "model", "config", "candidates"))]
    for split in rows[0]["results"]:
        types = [t for t in data.SENTENCE_TYPES
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


if __name__ == "__main__":
    main()
