"""Per-step learning-rate schedules for the papers' recipes (all `LambdaLR`, stepped every step),
and parameter groups that train pretrained parts at a lower rate.

Build Adam/AdamW with `fused=True`: on this project's CPU it steps 7x faster than the default
(measured on 3.2M parameters, 1 thread: 7.6 ms vs 55 ms), and it is the fast path on CUDA too.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_linear(opt: Optimizer, total_steps: int, warmup: float = 0.1) -> LambdaLR:
    """Linear warm-up over `warmup` of the steps, then linear decay to zero (MaIL Sec. 4.1)."""
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return LambdaLR(opt, factor)


def poly(opt: Optimizer, total_steps: int, power: float = 0.9, warmup: float = 0.0) -> LambdaLR:
    """Optional linear warm-up over `warmup` of the steps, then polynomial decay
    (1 - step/total)^power."""
    warm = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, 1 - step / max(1, total_steps)) ** power

    return LambdaLR(opt, factor)


def step_decay(opt: Optimizer, total_steps: int, milestones: tuple[float, ...] = (0.7,),
               gamma: float = 0.1) -> LambdaLR:
    """Multiply the rate by `gamma` at each milestone, given as a fraction of the steps."""
    marks = [int(m * total_steps) for m in milestones]
    return LambdaLR(opt, lambda step: gamma ** sum(step >= m for m in marks))


def pretrained_groups(params: Iterable[nn.Parameter], pretrained: list[nn.Module],
                      pretrained_lr: float) -> list[dict]:
    """Optimiser parameter groups: the parameters of the `pretrained` modules at `pretrained_lr`,
    then the rest at the optimiser's lr; each group keeps the order of `params` (an optimiser's
    state is saved by position), and an empty one is left out."""
    params, ids = list(params), {id(p) for part in pretrained for p in part.parameters()}
    groups = [dict(params=[p for p in params if id(p) in ids], lr=pretrained_lr),
              dict(params=[p for p in params if id(p) not in ids])]
    return [g for g in groups if g["params"]]
