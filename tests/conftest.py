"""Shared fixtures. Exported bundles are made once per session (``exported_bundle``):
exporting and verifying costs seconds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FASHION_DIR = Path(os.environ.get("DGCONVERT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Import torch's compiler stack before any test puts a fake module (TensorRT, CUDA,
    ModelOpt) into ``sys.modules``: its first import scans for such packages, and a fake
    seen then breaks torch.export for the rest of the session, whatever the test order."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch._dynamo  # noqa: F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests with a reason unless a CUDA GPU and TensorRT are present."""
    reason = _gpu_skip_reason()
    if reason is None:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _gpu_skip_reason() -> str | None:
    import importlib.util
    import shutil

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt cuda-python on a GPU machine)"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install cuda-python)"
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        return "no NVIDIA GPU visible on this machine"
    return None


@pytest.fixture(scope="session")
def fashion_available() -> bool:
    return (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one torch thread is faster than two fighting over 2 busy cores."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small zoo ResNet (widths 8/16/24/32) trained 150 steps on fashion-mnist:train[:2000],
    shared by the gate-fitting and CLI tests (training it once costs seconds)."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    from tests.models import train_tiny_backbone

    return train_tiny_backbone(tmp_path_factory.mktemp("bb") / "backbone.pt",
                               data="fashion-mnist:train[:2000]")


@dataclass(frozen=True)
class Exported:
    """A gated network and its exported, verified bundle (shared: never modify it; copy it
    with :meth:`copy_to` first)."""

    net: Any
    bundle: Any
    pixels: np.ndarray  # the uint8 images it was verified on

    def copy_to(self, folder: Path) -> Any:
        from dgconvert.core.bundle import Bundle

        dst = folder / self.bundle.path.name
        shutil.copytree(self.bundle.path, dst)
        return Bundle.load(dst)


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Exported]:
    """``exported_bundle(arch="resnet", gate="dgate")``: the test model ``arch`` (see
    ``tests/models.py``) with ``gate`` heads, exported and verified once per test session."""
    import torch

    import dgconvert as dg
    from dgconvert.core.preprocess import prepare_images
    from tests.models import NORMALIZATION, build

    root = tmp_path_factory.mktemp("bundles")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    x = torch.from_numpy(prepare_images(pixels, [1, 28, 28], NORMALIZATION))
    cache: dict[tuple[str, str], Exported] = {}

    def make(arch: str = "resnet", gate: str = "dgate") -> Exported:
        if (arch, gate) not in cache:
            net = build(arch, gate)
            bundle = dg.export(net, root / f"{arch}-{gate}.dg", verify_input=x)
            cache[arch, gate] = Exported(net, bundle, pixels)
        return cache[arch, gate]

    return make
