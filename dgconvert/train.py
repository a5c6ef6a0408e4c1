"""Reference backbone recipe: :func:`dgconvert.zoo.resnet` trained on Fashion-MNIST.

The recipe (:class:`Recipe`) is fixed and seeded: SGD + Nesterov momentum under a
one-cycle learning-rate schedule, random-crop (zero padding) and horizontal-flip
augmentation, channels-last convolutions, 2 CPU threads. :func:`reference_checkpoint`
trains it once and caches the checkpoint under ``$DGCONVERT_CACHE`` (default
``~/.cache/dgconvert``), keyed by the recipe's hyper-parameters.

Checkpoints are plain containers (``torch.load(..., weights_only=True)`` reads them)::

    {"format": "dgconvert-backbone", "version": 1,
     "arch": {"factory": "dgconvert.zoo:resnet", "kwargs": {...}},
     "state_dict": {...}, "input": {"shape": [1, 28, 28], "normalization": {...}},
     "classes": [...], "metrics": {"test_accuracy": ..., "train_seconds": ...}, "recipe": {...}}

Run ``python -m dgconvert.train --out backbone.pt`` to train one explicitly (about 7
minutes on 2 idle cores, 92.3 % test accuracy). On a machine shared with other jobs, set
``OMP_WAIT_POLICY=PASSIVE`` before starting Python: spinning OpenMP threads otherwise
slow training by up to 10x.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dgconvert.core.io import atomic_write
from dgconvert.data import DataError, Dataset, load_dataset
from dgconvert.gating.augment import random_crop_flip
from dgconvert.gating.checkpoint import BACKBONE_FORMAT, VERSION
from dgconvert.gating.threads import torch_threads
from dgconvert.zoo import resnet

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEFAULT_RECIPE",
    "INPUT_SHAPE",
    "MEAN",
    "NORMALIZATION",
    "STD",
    "Recipe",
    "build_model",
    "resolve_cache_dir",
    "evaluate",
    "fit",
    "normalize_batch",
    "reference_checkpoint",
    "save_checkpoint",
    "train_reference",
]

#: Fashion-MNIST pixel statistics (of ``uint8 / 255`` over the 60k training images).
MEAN = 0.2860
STD = 0.3530
SCALE = 255.0
NORMALIZATION: dict[str, Any] = {"scale": SCALE, "mean": [MEAN], "std": [STD]}
INPUT_SHAPE: list[int] = [1, 28, 28]
CHECKPOINT_FORMAT = BACKBONE_FORMAT  # what dgconvert.gating.checkpoint reads
CHECKPOINT_VERSION = VERSION
ARCH_FACTORY = "dgconvert.zoo:resnet"
CACHE_ENV = "DGCONVERT_CACHE"


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the reference training run (all part of the cache key)."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.1  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.25  # fraction of steps spent rising to the peak
    crop_pad: int = 2  # random crop after zero-padding this many pixels per side
    hflip: bool = True
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (tests, smoke runs)

    def __post_init__(self) -> None:
        problems = []
        for name in ("widths", "blocks"):
            v = getattr(self, name)
            if len(v) != 4 or not all(isinstance(i, int) and i >= 1 for i in v):
                problems.append(f"{name}={v!r} (expected 4 positive integers)")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name}={v!r} (expected an integer >= 1)")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps!r} (expected None or >= 1)")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            problems.append(
                f"lr={self.lr}, weight_decay={self.weight_decay}, momentum={self.momentum} "
                "(expected lr > 0, weight_decay >= 0, 0 <= momentum < 1)"
            )
        if not 0 < self.warmup < 1:
            problems.append(f"warmup={self.warmup} (expected 0 < warmup < 1)")
        if self.crop_pad < 0:
            problems.append(f"crop_pad={self.crop_pad} (expected >= 0)")
        if problems:
            raise ValueError(
                "invalid Recipe: " + "; ".join(problems) + ". Fix: pass values in range, e.g. "
                "dataclasses.replace(DEFAULT_RECIPE, epochs=2)."
            )

    def arch_kwargs(self, num_classes: int = 10) -> dict[str, Any]:
        """Keyword arguments of :func:`dgconvert.zoo.resnet` for this recipe."""
        return {
            "in_channels": INPUT_SHAPE[0],
            "num_classes": num_classes,
            "widths": list(self.widths),
            "blocks": list(self.blocks),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON/``weights_only``-safe dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def cache_key(self, data: str, test_data: str) -> str:
        """Short hash of everything that changes the trained weights."""
        blob = json.dumps(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "arch": ARCH_FACTORY,
                "recipe": self.as_dict(),
                "normalization": NORMALIZATION,
                "data": data,
                "test_data": test_data,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_RECIPE = Recipe()


def build_model(recipe: Recipe = DEFAULT_RECIPE, num_classes: int = 10) -> nn.Module:
    """A freshly initialised backbone for ``recipe`` (seeded by ``recipe.seed``)."""
    torch.manual_seed(recipe.seed)
    return resnet(**recipe.arch_kwargs(num_classes))


#: the narrowest convolution trained channels-last; oneDNN's channels-last backward crashes
#: (SIGSEGV/SIGBUS) on narrower ones on some CPUs (torch 2.13, AMD EPYC with AVX2)
MIN_CHANNELS_LAST_WIDTH = 8


def training_memory_format(model: nn.Module) -> torch.memory_format:
    """``channels_last`` (faster on the CPU), or the default layout, with a warning, when a
    convolution of ``model`` has fewer than :data:`MIN_CHANNELS_LAST_WIDTH` channels."""
    narrow = min((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)),
                 default=MIN_CHANNELS_LAST_WIDTH)
    if narrow >= MIN_CHANNELS_LAST_WIDTH:
        return torch.channels_last
    logging.getLogger(__name__).warning(
        "training in the default memory layout, not channels-last: a convolution has %d "
        "channels (< %d), where oneDNN's channels-last backward can crash on this kind of "
        "CPU; training is slower", narrow, MIN_CHANNELS_LAST_WIDTH)
    return torch.contiguous_format


def normalize_batch(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[B, C, H, W]`` -> float32 network input ``((x / 255) - MEAN) / STD``."""
    return (x.float() / SCALE - MEAN) / STD


def fit(
    model: nn.Module,
    train: Dataset,
    recipe: Recipe = DEFAULT_RECIPE,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on uint8 ``train`` with ``recipe``; return per-step losses."""
    labels = train.require_labels("training")
    if train.images.dtype != np.uint8:
        raise DataError(
            f"training images are {train.images.dtype}; expected uint8 pixels (the recipe "
            "normalizes with NORMALIZATION). Fix: load raw images, e.g. fashion-mnist:train."
        )
    x_all = torch.from_numpy(train.images)
    y_all = torch.from_numpy(labels)
    n, bs = len(train), recipe.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = recipe.epochs * steps_per_epoch
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    layout = training_memory_format(model)
    model.to(memory_format=layout).train()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.momentum > 0,
        weight_decay=recipe.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=total, pct_start=recipe.warmup
    )
    losses: list[float] = []
    step = 0
    bar = None
    try:
        for epoch in range(recipe.epochs):
            perm = torch.randperm(n, generator=gen)
            epoch_losses: list[float] = []
            if progress:
                from tqdm.auto import tqdm

                steps = min(steps_per_epoch, total - step)
                desc = f"epoch {epoch + 1}/{recipe.epochs}"
                bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)
            for i in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[i * bs : (i + 1) * bs]
                xb = random_crop_flip(x_all[idx], recipe.crop_pad, recipe.hflip, gen)
                xb = normalize_batch(xb).contiguous(memory_format=layout)
                loss = nn.functional.cross_entropy(model(xb), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(loss.item())
                epoch_losses.append(losses[-1])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if bar is not None:
                bar.close()
                bar = None
            if epoch_losses and on_epoch is not None:
                on_epoch(epoch, float(np.mean(epoch_losses)))
            if step >= total:
                break
    finally:
        if bar is not None:
            bar.close()
        model.to(memory_format=torch.contiguous_format)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy (0..1) of ``model`` on uint8 ``data`` (normalized with NORMALIZATION)."""
    labels = data.require_labels("evaluation")
    if len(labels) == 0:
        raise DataError(f"{data.source!r} has no samples; evaluation needs at least one.")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for xb, yb in data.batches(batch_size):
            x = normalize_batch(torch.from_numpy(xb))
            correct += int((model(x).argmax(1).numpy() == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    recipe: Recipe,
    classes: list[str],
    metrics: dict[str, Any],
) -> Path:
    """Write a ``dgconvert-backbone`` checkpoint atomically (temp file + ``os.replace``)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": {"factory": ARCH_FACTORY, "kwargs": recipe.arch_kwargs(len(classes))},
        "state_dict": state,
        "input": {
            "shape": list(INPUT_SHAPE),
            "normalization": {"scale": SCALE, "mean": [MEAN], "std": [STD]},
        },
        "classes": list(classes),
        "metrics": _plain(metrics),
        "recipe": recipe.as_dict(),
    }
    return atomic_write(path, lambda p: torch.save(ckpt, p))


def _plain(obj: Any) -> Any:
    """Copy ``obj`` with only dict/list/str/int/float/bool/None (``weights_only``-loadable)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    return str(obj)


def train_reference(
    out: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    seed: int = 0,
    data: str = "fashion-mnist:train",
    test_data: str | None = "fashion-mnist:test",
    recipe: Recipe | None = None,
    threads: int | None = 2,
    progress: bool = True,
) -> Path:
    """Train the reference backbone and write its checkpoint to ``out``; return ``out``.

    ``recipe`` defaults to :data:`DEFAULT_RECIPE`; ``epochs``/``seed`` override it.
    ``test_data=None`` skips the test-set evaluation (``metrics.test_accuracy`` is then
    absent). ``threads`` sets torch's CPU threads for the run (restored afterwards).
    """
    recipe = recipe or DEFAULT_RECIPE
    recipe = replace(recipe, seed=seed, epochs=recipe.epochs if epochs is None else epochs)
    train = load_dataset(data)
    with torch_threads(threads):
        model = build_model(recipe, num_classes=len(train.classes))
        epoch_loss: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        losses = fit(
            model, train, recipe, progress=progress, on_epoch=lambda _, v: epoch_loss.append(v)
        )
        train_seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        metrics: dict[str, Any] = {
            "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(cpu_seconds, 2),  # ~ threads x wall time when not shared
            "train_steps": len(losses),
            "epoch_loss": [round(v, 5) for v in epoch_loss],
            "first_loss": losses[0],
            "final_loss": float(np.mean(losses[-20:])),
            "train_data": data,
            "train_fingerprint": train.fingerprint(),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "torch": str(torch.__version__),
        }
        if test_data is not None:
            test = load_dataset(test_data, num_classes=len(train.classes))
            t1 = time.perf_counter()
            metrics["test_accuracy"] = evaluate(model, test)
            metrics["test_data"] = test_data
            metrics["eval_seconds"] = round(time.perf_counter() - t1, 2)
    return save_checkpoint(out, model, recipe, train.classes, metrics)


def resolve_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint cache: ``override``, else ``$DGCONVERT_CACHE``, else ``~/.cache/dgconvert``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dgconvert"


def reference_checkpoint(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    data: str = "fashion-mnist:train",
    test_data: str = "fashion-mnist:test",
    threads: int | None = 2,
    progress: bool = True,
) -> Path:
    """Path of the cached reference backbone, training it first if it is missing
    (about 7 minutes on 2 CPU cores)."""
    root = resolve_cache_dir(cache_dir)
    path = root / f"backbone-resnet-{recipe.cache_key(data, test_data)}.pt"
    if not path.is_file():
        print(
            f"dgconvert: training the reference backbone (cached afterwards at {path}); "
            "this takes about 7 minutes on 2 CPU cores.",
            file=sys.stderr,
        )
        train_reference(
            path,
            epochs=recipe.epochs,
            seed=recipe.seed,
            data=data,
            test_data=test_data,
            recipe=recipe,
            threads=threads,
            progress=progress,
        )
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m dgconvert.train``: train the reference backbone, print its metrics."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m dgconvert.train",
        description="Train the reference backbone (dgconvert.zoo:resnet on Fashion-MNIST) "
        "and print its metrics as JSON.",
    )
    p.add_argument("--out", type=Path, help="checkpoint path (default: the cache entry)")
    p.add_argument("--epochs", type=int, default=DEFAULT_RECIPE.epochs, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=DEFAULT_RECIPE.seed, help="default: %(default)s")
    p.add_argument("--data", default="fashion-mnist:train", help="training data spec")
    p.add_argument("--test-data", default="fashion-mnist:test", help="evaluation data spec")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.out is None:
        recipe = replace(DEFAULT_RECIPE, epochs=a.epochs, seed=a.seed)
        path = reference_checkpoint(
            recipe=recipe,
            data=a.data,
            test_data=a.test_data,
            threads=a.threads,
            progress=not a.no_progress,
        )
    else:
        path = train_reference(
            a.out,
            epochs=a.epochs,
            seed=a.seed,
            data=a.data,
            test_data=a.test_data,
            threads=a.threads,
            progress=not a.no_progress,
        )
    metrics = torch.load(path, weights_only=True)["metrics"]
    print(json.dumps({"checkpoint": str(path), **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
