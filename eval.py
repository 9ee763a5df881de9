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
in fp32 whatever --amp the model runs under. Data flags default to the ones the checkpoint was
trained with, MaIL's candidate source included. The tables, the --json layouts and how several
checkpoints are compared: common/report.py. In Python, `Predictor` (below) is the way to a mask.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
from common import cli, distributed, report
from common.cache import frozen_features
from common.candidates import candidate_masks, candidate_source, load_candidates
from common.checkpoint import build_model_from_checkpoint, export_checkpoint, load_checkpoint
from common.images import as_rgb
from common.logs import plot_log
from common.metrics import IoUAccumulator, intersection_union
from common.refer import DEFAULT_SPLIT_BY, SPLITS
from common.shapes import SENTENCE_TYPES
from common.visualise import visual

cli.check_own_modules("data", "common")

# ---------------------------------------------------------------------------------------------
# Evaluation: metrics at each image's original resolution, summed over ranks
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, device, amp: str = "none", on_batch=None, cache=None,
             progress: bool = True) -> dict:
    """Metrics of common.metrics over a loader, at each image's original resolution, summed
    across ranks. Where samples carry a sentence type (the synthetic data: SENTENCE_TYPES),
    "by_type" adds the same metrics for each type. `on_batch(batch, out, ious)` sees every batch
    (visualisations); `cache`, a common.cache.FeatureCache, supplies frozen encoders' features.

    The model runs under `amp`; the logits are cast to fp32 before resizing and thresholding, so
    the reported numbers do not depend on the autocast dtype's rounding near 0. Every tensor of
    the batch, the ground truth included, is on `device` (data.to_device). A progress bar shows
    on rank 0 when stderr is a terminal and `progress` is set."""
    from tqdm import tqdm

    raw = distributed.unwrap(model)
    was_training = raw.training
    raw.eval()
    acc = IoUAccumulator()
    by_type = {t: IoUAccumulator() for t in SENTENCE_TYPES}
    bar = tqdm(loader, desc="val", leave=False, file=sys.stderr,
               disable=not (progress and distributed.is_rank0() and sys.stderr.isatty()))
    for batch in bar:
        batch = data.to_device(batch, device, raw.input_spec)
        with distributed.autocast(device, amp):
            feats = frozen_features(raw, batch, cache)
            out = raw(**raw.inputs_from(batch), **feats)
        logits = out["mask_logits"].float()  # (B, 1, H, W), fp32 whatever the autocast dtype
        ious = []
        for i in range(len(batch["gt"])):
            pred = data.to_original(logits[i], batch["valid_hw"][i], batch["orig_hw"][i]) > 0
            inter, union = intersection_union(pred[None], batch["gt"][i][None])
            ious.append(acc.add(inter[0], union[0]))
            group = by_type.get(batch["sentence_type"][i])  # None: no type (RefCOCO)
            if group is not None:
                group.add(inter[0], union[0])
        if on_batch is not None:
            on_batch(batch, out, ious)
    raw.train(was_training)
    metrics = acc.all_reduce().compute()
    by_type = {t: a.all_reduce().compute() for t, a in by_type.items()}  # same calls on every rank
    if any(m["n"] for m in by_type.values()):
        metrics["by_type"] = {t: m for t, m in by_type.items() if m["n"]}
    return metrics


# ---------------------------------------------------------------------------------------------
# Prediction on one image
# ---------------------------------------------------------------------------------------------


def unknown_words(model, sentences: list[str]) -> int:
    """How many words of `sentences` a word-level tokenizer (M3Dec's GRU vocabulary) does not
    know; 0 for subword tokenizers, which know every word."""
    unk = getattr(model.tokenizer, "unk_id", None)
    return 0 if unk is None else sum(model.tokenizer(s)[0].count(unk) for s in sentences)


@torch.no_grad()
def predict_batch(model, image, sentences: list[str], device="cpu",
                  candidates: np.ndarray | None = None, amp: str = "none"):
    """Logits (N, H0, W0) fp32 for one image and N sentences, at the image's resolution, and the
    model's outputs. A model whose image encoder's features do not depend on the sentence
    (`encode_distinct_images`, MARIS) encodes the image once for all N; the others run one
    batch of N. candidates: bool (K, H0, W0) instance masks for MaIL; without them it gets one
    empty candidate and segments from the image and the words alone."""
    image = as_rgb(image)
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names)
    device = torch.device(device)
    if candidates is None:
        candidates = np.zeros((0, *image.shape[:2]), bool)
    if candidates.shape[1:] != image.shape[:2]:
        raise ValueError(f"candidate masks are {candidates.shape[1:]}, the image {image.shape[:2]}")
    if unknown_words(model, sentences):
        warnings.warn(f"{unknown_words(model, sentences)} word(s) of the sentence(s) are not in "
                      "the model's vocabulary and read as <unk>", stacklevel=2)
    items = []
    for i, sentence in enumerate(sentences):
        item = prep(dict(image=image, sentence=sentence, mask=np.zeros(image.shape[:2], bool),
                         instances=candidates.astype(bool), image_key="image"))
        items.append(dict(item, index=i))
    batch = data.to_device(data.collate(items, model.tokenizer.pad_id), device, model.input_spec)
    if batch["truncated"]:
        warnings.warn(f"{batch['truncated']} sentence(s) longer than the model's limit of "
                      f"{batch['text'].shape[1]} tokens were cut; the model reads their start",
                      stacklevel=2)
    model.eval()
    with distributed.autocast(device, amp):
        feats = ({"image_feats": model.encode_distinct_images(batch["image"], batch["image_key"])}
                 if hasattr(model, "encode_distinct_images") else {})
        out = model(**model.inputs_from(batch), **feats)
    # to_original upsamples in fp32: the threshold never sees bf16/fp16 rounding
    logits = torch.stack([data.to_original(out["mask_logits"][i], batch["valid_hw"][i],
                                           batch["orig_hw"][i]) for i in range(len(items))])
    return logits, out


def predict(model, image, sentence: str, device="cpu", candidates: np.ndarray | None = None,
            amp: str = "none") -> tuple[np.ndarray, dict]:
    """Mask (H0, W0) bool for one image (see `as_rgb`) and one sentence, and the outputs."""
    logits, out = predict_batch(model, image, [sentence], device, candidates, amp)
    return (logits[0] > 0).cpu().numpy(), out


class Predictor:
    """A trained model ready for images and sentences (as segment-anything's SamPredictor):

        predictor = Predictor.from_checkpoint("runs/maris-tiny-shapes/best.pt")
        mask, prob = predictor("photo.jpg", "the red circle on the left")
        masks, probs = predictor.predict_many(image, ["the red circle", "the blue square"])

    An image is a path, a PIL image or a uint8 (H, W, 3) array; a mask is bool (H, W) and a
    probability map float32 (H, W) in [0, 1], both at the image's own resolution. MaIL takes
    its candidate masks, bool (K, H, W), as `candidates=`."""

    def __init__(self, model, device="cpu", amp: str = "none"):
        self.model, self.device, self.amp = model.eval(), torch.device(device), amp

    @classmethod
    def from_checkpoint(cls, path: str, device: str | None = None, amp: str | None = None,
                        weights: dict | None = None) -> Predictor:
        """A checkpoint written by train.py (or eval.py --export). device: default cuda when
        available; amp: default bf16 on CUDA, none on CPU; weights: {"image_weights": path,
        ...} where a frozen encoder's file now lives."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, _ = build_model_from_checkpoint(load_checkpoint(path), device, weights)
        return cls(model, device, amp or ("bf16" if device.type == "cuda" else "none"))

    def __call__(self, image, sentence: str, candidates=None) -> tuple[np.ndarray, np.ndarray]:
        masks, probs = self.predict_many(image, [sentence], candidates)
        return masks[0], probs[0]

    def predict_many(self, image, sentences: list[str],
                     candidates=None) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, H, W) bool and probabilities (N, H, W) for N sentences of one image."""
        if isinstance(sentences, str):
            raise TypeError("predict_many takes a list of sentences; call the predictor for one")
        logits, _ = predict_batch(self.model, image, list(sentences), self.device, candidates,
                                  self.amp)
        return (logits > 0).cpu().numpy(), torch.sigmoid(logits).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


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
    p.add_argument("--batch-size", type=int, default=8)
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
    p.add_argument("--image-id", type=int, default=None,
                   help="MaIL: --image's id in --candidates (default: the file's only image)")
    p.add_argument("--export", default=None, metavar="OUT.pt",
                   help="write --checkpoint as a self-contained weights-only file "
                        "(common.checkpoint.export_checkpoint) and stop")
    p.add_argument("--plot", default=None, metavar="RUN_DIR",
                   help="draw the loss and validation curves of a run's log.jsonl to a PNG "
                        "(common.logs.plot_log) and stop; no checkpoint needed")
    p.add_argument("--plot-out", default=None, metavar="PNG",
                   help="where --plot writes (default RUN_DIR/curves.png)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes per rank")
    p.add_argument("--image-weights", default=None, metavar="PATH",
                   help="where the checkpoint's frozen image-encoder file now lives")
    p.add_argument("--text-weights", default=None, metavar="PATH",
                   help="where the checkpoint's frozen text-encoder file now lives")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last weights and activations (see train.py --channels-last)")
    data.add_data_args(p, defaults=False)  # default: the checkpoint's training run's
    args = p.parse_args(argv)
    if (args.image is None) != (args.text is None):
        p.error("--image and --text go together")
    if args.plot is None and args.checkpoint is None:
        p.error("--checkpoint is needed (except with --plot)")
    args.runs = [report.split_label(c) for c in args.checkpoint or []]
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
    by_image = load_candidates(args.candidates)
    image_id = args.image_id
    if image_id is None:
        if len(by_image) != 1:
            raise ValueError(f"{args.candidates!r} holds {len(by_image)} images: say which one "
                             "is --image with --image-id")
        image_id = next(iter(by_image))
    masks = candidate_masks(by_image.get(image_id, []), *image.shape[:2])
    if not len(masks):
        raise ValueError(f"{args.candidates!r} has no candidates for image_id {image_id}")
    return masks


def run_predict(args, model, device) -> None:
    image = as_rgb(args.image)  # the user's photo, as their viewer shows it
    mask, out = predict(model, image, args.text, device, predict_candidates(args, model, image),
                        getattr(args, "amp", None) or "none")
    path = args.save_mask or os.path.splitext(args.image)[0] + ".mask.png"
    root, ext = os.path.splitext(path)
    if ext.lower() not in (".png", ".bmp", ".tif", ".tiff"):
        raise ValueError(f"--save-mask {path}: a mask is saved losslessly, as .png (or .bmp/.tif)")
    for out_path in (path, root + ".overlay.png"):
        refuse_overwrite(out_path, args.image, "--image")
    Image.fromarray((mask * 255).astype(np.uint8)).save(path)
    visual(image, mask, None, args.text, model.vis_panels(out, 0)).save(root + ".overlay.png")
    print(f"mask ({mask.mean() * 100:.1f}% of the image) -> {path}; overlay -> {root}.overlay.png")


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
    return candidate_source(args.dataset, args.candidates, args.oracle_candidates)


def moved_weights(args) -> dict:
    """--image-weights / --text-weights: where a checkpoint's frozen encoder files now live."""
    return {f: getattr(args, f) for f in ("image_weights", "text_weights") if getattr(args, f)}


def refuse_overwrite(path: str, source: str, flag: str) -> None:
    """eval.py never writes over one of its inputs (a photo, a checkpoint)."""
    if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
        raise ValueError(f"{path} is the {flag} file: eval.py does not write over its inputs; "
                         "choose another output path")


def refuse_overwriting_inputs(args) -> None:
    """Before anything runs: no file eval.py writes (--json, --export, --plot-out, --save-mask)
    is one it reads (a checkpoint, --image, --candidates, the weight files, the plotted log)."""
    inputs = [(path, "--checkpoint") for path, _ in args.runs] + [
        (getattr(args, flag.lstrip("-").replace("-", "_")), flag)
        for flag in ("--image", "--candidates", "--image-weights", "--text-weights")]
    if args.plot is not None:
        inputs.append((os.path.join(args.plot, "log.jsonl"), "--plot log.jsonl"))
    for output in (args.json, args.export, args.plot_out, args.save_mask):
        for source, flag in inputs:
            if output and source:
                refuse_overwrite(output, source, flag)


def run_tool(args) -> dict:
    """--plot (common.logs.plot_log) and --export (common.checkpoint.export_checkpoint)."""
    if args.plot is not None:
        png = args.plot_out or os.path.join(args.plot, "curves.png")
        plot_log(args.plot, png)
        print(f"curves of {args.plot} -> {png}")
        return {"plot": png}
    path = args.runs[0][0]
    export_checkpoint(path, args.export, moved_weights(args))
    print(f"{path} -> {args.export} (self-contained, weights only)")
    return {"export": args.export}


def main(argv=None) -> dict:
    """Returns {SPLIT: metrics} for one checkpoint, {"checkpoints": [row, ...]} for several
    (each row as `evaluate_checkpoint` returns it)."""
    args = parse_args(argv)
    refuse_overwriting_inputs(args)
    if args.plot is not None or args.export is not None:
        return run_tool(args)
    rank, world, rank_device = distributed.setup_distributed()
    device = distributed.pick_device(args.device, rank_device, world)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if args.image is not None:
        model, _, _ = build_model_from_checkpoint(load_checkpoint(args.runs[0][0]), device,
                                                  moved_weights(args))
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
                title += f", candidates: {report.candidate_title(row['source'])}"
            report.print_table(row["results"], title)
        else:
            report.print_comparison(rows)
        if args.json:
            written = (report.json_report(rows[0], alone=True) if len(rows) == 1
                       else {"checkpoints": [report.json_report(row) for row in rows]})
            with open(args.json, "w") as f:
                json.dump(written, f, indent=1)
    if world > 1:
        dist.destroy_process_group()
    return rows[0]["results"] if len(rows) == 1 else {"checkpoints": rows}


def evaluate_checkpoint(args, path: str, label: str, rank: int, world: int, device,
                        same_data: dict | None = None) -> dict:
    """One checkpoint on every split, as eval.py evaluates it alone. Returns the row {"label",
    "checkpoint", "model", "config", "dataset", "source" (data.candidate_source or None),
    "changes", "data" (its resolved DATA_FLAGS), "results" {SPLIT: metrics}}. `same_data`:
    another row's "data", which this checkpoint's must equal (a comparison on the same data)."""
    ckpt = load_checkpoint(path)
    trained = ckpt.get("args", {})
    run = data.eval_data_args(args, trained)
    resolved = {key: getattr(run, key) for key in data.TRAINED_DATA_FLAGS}
    if same_data is not None and resolved != same_data:
        differ = {k: (same_data[k], v) for k, v in resolved.items() if same_data[k] != v}
        raise ValueError(f"{path} was trained on other data than the first checkpoint "
                         f"(flag: (first, this) {differ}); give these flags on the command "
                         "line so that every checkpoint is evaluated on the same data")
    model, module, _ = build_model_from_checkpoint(ckpt, device, moved_weights(args))
    model.to(memory_format=distributed.memory_format(args.channels_last)).eval()
    source = resolve_candidates(run, trained, model)
    splits = run.split
    if splits == ["all"]:
        split_by = run.split_by or DEFAULT_SPLIT_BY.get(run.dataset)
        splits = [s for s in SPLITS.get((run.dataset, split_by), ("train", "val", "test"))
                  if s != "train"]
    if rank == 0 and source is not None:
        who = f"{label}: " if len(args.runs) > 1 else ""
        print(f"{who}candidate masks: {report.describe_candidates(source)}", flush=True)

    cache = None
    if run.cache_features:
        from common.cache import FeatureCache

        cache = FeatureCache(run.cache_features, model,
                             run.cache_storage or trained.get("cache_storage", "fp16"))
    results = {}
    for split in splits:
        loader = data.make_eval_loader(run, split, model, rank, world, run.batch_size)
        if getattr(model.tokenizer, "unk_id", None) is not None and rank == 0:  # word vocabulary
            unknown = unknown_words(model, data.sentences(loader.dataset.base))
            if unknown:
                warnings.warn(f"{split}: {unknown} words are not in the model's vocabulary (built "
                              "from its training sentences) and read as <unk>", stacklevel=1)
        on_batch = None
        if run.save_vis:
            os.makedirs(run.save_vis, exist_ok=True)
            on_batch = make_visualiser(run, split, model, loader.dataset)
        # evaluate shows the progress bar (rank 0, on a terminal) and thresholds in fp32
        results[split] = evaluate(model, loader, device, run.amp, on_batch, cache)
        if on_batch is not None and rank == 0:
            print(f"{on_batch.count['n']} pictures of {split} (this process's share) -> "
                  f"{run.save_vis}", flush=True)
    return dict(label=label, checkpoint=path, model=ckpt["model_name"],
                config=trained.get("config"), dataset=run.dataset, source=source,
                changes=report.config_changes(ckpt, module), data=resolved, results=results)


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

    on_batch.count = count
    return on_batch


def run() -> None:
    """The command line: `python eval.py`, `python -m eval` or, installed, `ris-eval`."""
    cli.run(main)


if __name__ == "__main__":
    run()
