"""The speed and memory table: per model and config, parameters, forward GFLOPs and latency,
training-step time, achieved GFLOP/s against a matmul timed between the steps (MFU), and peak
memory. docs/speed.md says how to read it.

  python -m common.benchmark --model all --config tiny            # one row per model, CPU fp32
  python -m common.benchmark --model maris --config paper --amp bf16 --device cuda
  python -m common.benchmark --model maris --config paper --freeze-encoders --sentences-per-image 4

A command-line tool: it builds models and synthetic batches, so it imports `data`, which nothing
under common/ that a model or the training loop uses does. Several rows run one process each.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import warnings

import torch

import data
from common import cli
from common.cache import frozen_features
from common.distributed import AMP_DTYPES, autocast, flush_denormals, memory_format
from common.encoders import quiet_random_init
from common.measure import count_flops, matmul, median_times
from common.model import count_parameters
from common.runconfig import MODELS, load_model_module, named_config
from common.shapes import ShapesDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder

# --- One row: a model's forward and training step ------------------------------------------------


def bench_batch(model, n: int, device) -> dict:
    """A real batch of synthetic shapes at the model's own input size."""
    spec = model.input_spec
    side = spec.max_size if spec.resize == "shorter" else spec.size
    base = ShapesDataset("val", n, side, seed=0,
                              instances="cand_masks" in model.input_names)
    prep = data.Preprocess(spec, model.tokenizer, candidates="cand_masks" in model.input_names)
    items = [dict(prep(base[i]), index=i) for i in range(n)]
    return data.to_device(data.collate(items, model.tokenizer.pad_id), device, spec)


def repeat_images(batch: dict, k: int) -> dict:
    """A batch in which each sample of `batch` appears k times in a row: k sentences of each
    image, as `--sentences-per-image k` batches them (the same key: one encoder pass)."""
    rows = torch.arange(len(batch["text"])).repeat_interleave(k)
    return {key: v[rows.to(v.device)] if torch.is_tensor(v) and v.dim() else
            [v[i] for i in rows] if isinstance(v, list) else v for key, v in batch.items()}


def bench_model(name: str, config: str, device: torch.device, batch_size: int, amp: str,
                warmup: int, repeats: int, freeze: bool, cached: bool,
                per_image: int = 1, channels_last: bool = False, compiled: bool = False) -> dict:
    """One row of the benchmark table (see README, "Reading the benchmark"). per_image k > 1:
    the step's batch holds k sentences of each of batch_size / k images (grouped encoding)."""
    module = load_model_module(name)
    cfg = named_config(module, config)
    if freeze:
        cfg = dataclasses.replace(cfg, freeze_encoders=True)
    if hasattr(module, "prepare_config"):  # a vocabulary from synthetic sentences (M3Dec's GRU)
        cfg = module.prepare_config(cfg, data.sentences(ShapesDataset("train", 200)))
    torch.manual_seed(0)
    with quiet_random_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.MODEL(cfg).to(device, memory_format=memory_format(channels_last))
    total, trainable = count_parameters(model)
    one = bench_batch(model, 1, device)
    if per_image > 1:
        if batch_size % per_image:
            raise ValueError(f"batch {batch_size} is not a multiple of {per_image} per image")
        batch = repeat_images(bench_batch(model, batch_size // per_image, device), per_image)
    else:
        batch = bench_batch(model, batch_size, device)
    feats = {}
    if cached:  # the step trains from stored encoder features (common.cache) instead
        with torch.no_grad():
            if "image" in model.frozen_parts():
                feats["image_feats"] = model.encode_image(batch["image"])
            if "text" in model.frozen_parts():
                feats["text_feats"] = model.encode_text(batch["text"], batch["text_mask"])
    model.eval()
    run = torch.compile(model) if compiled else model  # FLOPs are counted on the eager model

    @torch.no_grad()
    def forward(m=run):
        with autocast(device, amp):
            m(**model.inputs_from(one))

    fwd_flops = count_flops(lambda: forward(model))
    (latency,) = median_times([forward], device, warmup + compiled, repeats)
    model.train()
    optimizer, _ = model.configure_optimizers(1e-6, 1000)

    def step(m=run):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):  # grouped: one encoder pass per distinct image
            shared = feats or frozen_features(model, batch)
            loss = m(**model.inputs_from(batch), **shared, target=batch["mask"])["loss"]
        loss.backward()
        optimizer.step()

    train_flops = count_flops(lambda: step(model))
    if compiled:  # compile the training graph before anything is timed
        step()
    ref, ref_flops = matmul(device, AMP_DTYPES.get(amp, torch.float32))  # the step's dtype
    ref()  # its first call allocates; the peak is its rate between the steps, not before them
    if device.type == "cuda":  # the memory of the timed steps, not of the counting passes
        torch.cuda.reset_peak_memory_stats(device)
    step_time, ref_time = median_times([step, ref], device, warmup, repeats)
    peak_mem = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # the process's RSS
    peak = ref_flops / ref_time / 1e9
    achieved = train_flops / step_time / 1e9
    variant = (" (cached)" if cached else f" ({per_image}/image)" if per_image > 1 else "") + (
        " NHWC" * channels_last + " compiled" * compiled)
    return {"model": name + variant, "config": config, "device": str(device), "amp": amp,
            "threads": torch.get_num_threads(), "params_M": total / 1e6,
            "trainable_M": trainable / 1e6, "fwd_GFLOPs": fwd_flops / 1e9,
            "fwd_ms_b1": latency * 1e3, "batch": batch_size, "step_ms": step_time * 1e3,
            "samples_s": batch_size / step_time, "step_GFLOPs": train_flops / 1e9,
            "GFLOP_s": achieved, "peak_GFLOP_s": peak, "MFU": achieved / peak,
            "peak_mem_GiB": peak_mem}


# --- The table: rows in their own processes, printed ---------------------------------------------

COLUMNS = [("model", "model", "{:<16}"), ("config", "config", "{:<12}"),
           ("params_M", "params M", "{:>8.2f}"), ("trainable_M", "train M", "{:>8.2f}"),
           ("fwd_GFLOPs", "fwd GFLOP", "{:>9.2f}"), ("fwd_ms_b1", "fwd ms b1", "{:>9.1f}"),
           ("batch", "batch", "{:>5}"), ("step_ms", "step ms", "{:>9.1f}"),
           ("samples_s", "sample/s", "{:>8.2f}"), ("GFLOP_s", "GFLOP/s", "{:>8.1f}"),
           ("peak_GFLOP_s", "peak", "{:>8.1f}"), ("MFU", "MFU", "{:>6.1%}"),
           ("peak_mem_GiB", "mem GiB", "{:>7.2f}")]  # (row key, header, format)


def print_bench(rows: list[dict]) -> None:
    widths = [len(fmt.format(rows[0][k])) if rows else 8 for k, _, fmt in COLUMNS]
    print(" ".join(h.rjust(w) if i > 1 else h.ljust(w)
                   for i, ((_, h, _), w) in enumerate(zip(COLUMNS, widths))))
    for r in rows:
        print(" ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS))
    if rows:
        r = rows[0]
        print(f"device {r['device']}, amp {r['amp']}, {r['threads']} threads; medians over repeats "
              "after warm-up; peak = matmul GFLOP/s timed between the steps; mem = "
              + ("peak allocated" if r["device"].startswith("cuda") else "peak process RSS"))


def run_benchmark(args) -> tuple[list[dict], list[str]]:
    """The rows `args` asks for, and the errors of those that failed. Several rows run one
    process each (`python -m common.benchmark --row`), so that each row's peak memory is its
    own, and a row that fails (an out-of-memory) does not stop the others."""
    names = MODELS if args.model == "all" else [args.model]
    names = [n for n in names if importlib.util.find_spec(n) is not None]
    if len(names) == 1:
        named_config(load_model_module(names[0]), args.config)  # a wrong name stops here
    elif not any(args.config in load_model_module(n).CONFIGS for n in names):
        raise ValueError(f"no model has a config {args.config!r}")
    rows, failed = [], []
    for name in names:
        module = load_model_module(name)
        if args.config not in module.CONFIGS:
            continue
        config, batch = args.config, args.batch_size or (8 if args.config == "tiny" else 1)
        # (cached, sentences per image): recomputed encoders, then (where the model's encoders
        # can be frozen) from the cache, then grouped
        k = getattr(args, "sentences_per_image", 1)
        variants = [(False, 1)]
        if args.freeze_encoders and hasattr(module.MODEL, "frozen_parts"):
            variants += [(True, 1)] + [(False, k)] * (k > 1)
        for cached, per_image in variants:
            if len(names) == 1 and len(variants) == 1:
                rows.append(bench_model(name, config, torch.device(args.device), batch, args.amp,
                                        args.warmup, args.repeats, args.freeze_encoders, cached,
                                        per_image, args.channels_last, args.compile))
                continue
            cmd = [sys.executable, "-m", "common.benchmark", "--model", name, "--config", config,
                   "--device", args.device, "--batch-size", str(batch), "--amp", args.amp,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--row",
                   "--sentences-per-image", str(per_image)]
            cmd += ["--freeze-encoders"] * args.freeze_encoders + ["--cached"] * cached
            cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
            res = subprocess.run(cmd, capture_output=True, text=True,  # one process: its own RSS
                                 cwd=ROOT, env=os.environ | {"PYTHONPATH": ROOT})
            if res.returncode:
                failed.append(f"{name}/{config}: {res.stderr[-3000:]}")
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows, failed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", help="a model name or all")
    p.add_argument("--config", default="tiny", help="config of each model to benchmark")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 tiny, 1 paper")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="default bf16 on CUDA, none on CPU")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if any)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--freeze-encoders", action="store_true",
                   help="freeze encoders (the paper's MARIS setting) and add a row training "
                        "from cached features")
    p.add_argument("--sentences-per-image", type=int, default=1, metavar="K",
                   help="with --freeze-encoders, add a row whose batch holds K sentences of each "
                        "image (train.py --sentences-per-image: one encoder pass per image)")
    p.add_argument("--compile", action="store_true",
                   help="time the model through torch.compile (FLOPs counted on the eager model)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last (NHWC) weights and activations (train.py --channels-last)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--cached", action="store_true", help="internal: a row from cached features")
    p.add_argument("--row", action="store_true", help="internal: print one row as JSON")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """One row as JSON in this process (`--row`, how run_benchmark calls itself), or the whole
    table, printed and written to --json."""
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    if args.row:
        flush_denormals()  # as training does
        row = bench_model(args.model, args.config, torch.device(args.device), args.batch_size,
                          args.amp, args.warmup, args.repeats, args.freeze_encoders, args.cached,
                          args.sentences_per_image, args.channels_last, args.compile)
        print(json.dumps(row))
        return row
    rows, failed = run_benchmark(args)
    print_bench(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed:  # after the table of the others
        raise RuntimeError("benchmark rows failed:\n" + "\n\n".join(failed))
    return {"rows": rows}


if __name__ == "__main__":
    cli.run(main)  # a user's error: one line and exit status 2
