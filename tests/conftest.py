"""Shared fixtures. Exported bundles are cached per session: exporting costs seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

FASHION_DIR = Path(os.environ.get("DGCONVERT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


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
