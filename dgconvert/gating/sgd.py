"""The mini-batch SGD loop that fits gate heads and GaterNets, and its progress bar."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dgconvert.gating.losses import l2_penalty


def progress_bar(total: int, progress: bool | str, desc: str, unit: str) -> Any:
    """A tqdm bar of ``total`` ``unit`` labelled ``progress`` (a string) or ``desc``; off
    when ``progress`` is false."""
    from tqdm.auto import tqdm

    label = progress if isinstance(progress, str) else desc
    return tqdm(total=total, desc=label, unit=unit, disable=not progress, leave=False, dynamic_ncols=True)


def _one_cycle(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total, 1), pct_start=0.1
    )


def sgd(
    params: list[nn.Parameter],
    loss_fn: Any,
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    l2: float,
    decayed: Sequence[nn.Linear],
    seed: int,
    bar: Any,
) -> float:
    """Mini-batch (sub-)gradient descent, Nesterov momentum, one-cycle schedule; L2 on the
    ``decayed`` layers' weights. Returns the mean data loss of the last epoch."""
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(n / batch_size)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    sched = _one_cycle(opt, epochs * steps)
    last = 0.0
    for _ in range(epochs):
        perm, tot = torch.randperm(n, generator=gen), 0.0
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            data = loss_fn(idx)
            loss = data + sum(l2_penalty(m.weight, l2) for m in decayed) if l2 else data
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += data.item() * len(idx)
            bar.update(1)
        last = tot / n
    return last
