"""Measuring speed on a noisy machine: median times of interleaved rounds, the reference matmul
rate that model FLOP utilisation divides by, and model FLOPs with attention counted whichever
kernel SDPA picks. The benchmark table (common/benchmark.py) is built on these."""

from __future__ import annotations

import time

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns, device, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each of `fns`, timed in interleaved rounds (fn1, fn2, fn1, fn2, ...),
    so that a machine whose speed drifts (a shared CPU's does, by 2x) slows them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


def matmul(device: torch.device, dtype: torch.dtype, n: int = 2048):
    """An n x n matmul in `dtype` and its FLOPs: the reference rate for model FLOP utilisation."""
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


def count_flops(fn) -> int:
    """Model FLOPs of `fn()` (forward, or forward and backward), counted by torch's
    FlopCounterMode, with attention counted alike whichever kernel SDPA picks:

    - torch's registry has no formula for the CPU flash-attention kernels SDPA picks when dropout
      is off (torch 2.14 counts them as 0 FLOPs); they get torch's own SDPA formula;
    - torch counts the fused backward kernels with the recomputation of the attention scores (5
      matmuls where explicit attention has 4); model FLOPs, what MFU divides by, leave recompute
      out, so every SDPA backward counts twice its forward, as explicit attention does.
    - nn.MultiheadAttention and nn.TransformerEncoderLayer (open_clip's towers) take torch's
      inference fast path in eval mode without gradients, a fused kernel the counter does not
      see: the fast path is off while counting, so eval and train mode count the same.
    SDPA and the same attention written with matmuls and a softmax count the same (tested)."""
    from torch.utils import flop_counter

    def sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments are shapes
        return flop_counter.sdpa_flop_count(query, key, value)

    def sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * flop_counter.sdpa_flop_count(query, key, value)

    kernels = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"]
    mapping = {getattr(torch.ops.aten, name + suffix): formula for name in kernels
               for suffix, formula in (("", sdpa), ("_backward", sdpa_backward))
               if hasattr(torch.ops.aten, name + suffix)}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()
