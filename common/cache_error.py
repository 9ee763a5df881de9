"""How much a feature cache's storage costs: `storage_error` of common.cache on a batch of
synthetic images at a model's input size.

  python -m common.cache_error --model maris --config paper-vit-b [--image-weights F
      --text-weights F]

Random encoders unless weight files are given (then the numbers are your encoder's).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch

from common import cli
from common.benchmark import bench_batch
from common.cache import storage_error
from common.encoders import quiet_random_init
from common.runconfig import load_model_module, named_config


def main(argv=None) -> dict:
    """Print and return the feature, loss and mask errors of each storage against fp32."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="maris")
    p.add_argument("--config", default="paper-vit-b")
    p.add_argument("--image-weights", default=None)
    p.add_argument("--text-weights", default=None)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args(argv)
    module = load_model_module(args.model)
    cfg = dataclasses.replace(named_config(module, args.config), freeze_encoders=True,
                              image_weights=args.image_weights, text_weights=args.text_weights)
    torch.manual_seed(0)
    with quiet_random_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module.MODEL(cfg)
    report = storage_error(model, bench_batch(model, args.batch_size, torch.device("cpu")))
    weights = "given weights" if args.image_weights else "random encoders"
    print(f"{args.model}/{args.config} ({weights}), {args.batch_size} synthetic images; "
          "against fp32 features:")
    for storage, r in report.items():
        print(f"  {storage}: feature rel. L2 error {r['feature_rel_error']:.1e}, loss rel. change "
              f"{r['loss_rel_change']:.1e}, pixels flipped {r['pixels_flipped']:.2%}")
    return report


if __name__ == "__main__":
    cli.run(main)  # a user's error: one line and exit status 2
