"""Reference recipe: a few real training steps, checkpoint format, cache behaviour."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dgconvert import train as dgtrain
from dgconvert.data import DataError, Dataset, load_dataset
from dgconvert.train import (
    MEAN,
    NORMALIZATION,
    STD,
    Recipe,
    build_model,
    evaluate,
    fit,
    normalize_batch,
    reference_checkpoint,
    train_reference,
)
from dgconvert.zoo import resnet

FMNIST_DIR = Path(
    os.environ.get("DGCONVERT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)
TINY = Recipe(widths=(4, 8, 16, 32), epochs=2, batch_size=64, lr=0.1)
TRAIN = "fashion-mnist:train[:2000]"
TEST = "fashion-mnist:test[:500]"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: tiny models gain nothing from two, and on a shared machine two
    spinning OpenMP threads can run ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_fmnist
def test_tiny_training_round_trips(tmp_path: Path) -> None:
    out = train_reference(
        tmp_path / "sub" / "tiny.pt",
        data=TRAIN,
        test_data=TEST,
        recipe=TINY,
        threads=1,
        progress=False,
    )
    assert out == tmp_path / "sub" / "tiny.pt" and out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name != "tiny.pt"]  # no temp files left
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == "dgconvert-backbone" and ckpt["version"] == 1
    assert ckpt["arch"] == {
        "factory": "dgconvert.zoo:resnet",
        "kwargs": {
            "in_channels": 1,
            "num_classes": 10,
            "widths": [4, 8, 16, 32],
            "blocks": [1, 1, 1, 1],
        },
    }
    assert ckpt["input"] == {
        "shape": [1, 28, 28],
        "normalization": {"scale": 255.0, "mean": [0.2860], "std": [0.3530]},
    }
    assert ckpt["classes"][0] == "T-shirt/top" and len(ckpt["classes"]) == 10
    m = ckpt["metrics"]
    assert m["train_steps"] == 2 * 32  # ceil(2000 / 64) steps per epoch
    assert m["epoch_loss"][1] < m["epoch_loss"][0] < m["first_loss"]  # loss decreases
    assert m["test_accuracy"] > 0.3  # chance is 0.1
    assert m["train_seconds"] > 0 and m["test_data"] == TEST
    assert ckpt["recipe"]["widths"] == [4, 8, 16, 32]

    # the checkpoint rebuilds the same network
    net = resnet(**ckpt["arch"]["kwargs"])
    net.load_state_dict(ckpt["state_dict"])
    assert all(t.is_contiguous() for t in ckpt["state_dict"].values())
    acc = evaluate(net, load_dataset(TEST))
    assert acc == pytest.approx(m["test_accuracy"])


@needs_fmnist
def test_fit_loss_decreases_and_is_seeded() -> None:
    train = load_dataset("fashion-mnist:train[:1024]")
    recipe = Recipe(widths=(4, 8, 16, 32), epochs=3, batch_size=64, max_steps=40)
    model = build_model(recipe)
    losses = fit(model, train, recipe, progress=False)
    assert len(losses) == 40  # max_steps stops mid-way through epoch 3
    assert np.mean(losses[-8:]) < 0.75 * np.mean(losses[:8])
    assert losses[0] == pytest.approx(np.log(10), rel=0.25)  # starts near chance
    again = fit(build_model(recipe), train, recipe, progress=False)
    assert again == pytest.approx(losses, rel=1e-4, abs=1e-5)  # fixed seed, same run
    conv = model.layer1[0].conv1[0].weight  # back in the default layout after training
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_normalization_constants() -> None:
    assert NORMALIZATION == {"scale": 255.0, "mean": [MEAN], "std": [STD]}
    x = torch.tensor([0, 73, 255], dtype=torch.uint8).reshape(1, 1, 1, 3)
    got = normalize_batch(x).flatten().tolist()
    want = [(v / 255 - 0.2860) / 0.3530 for v in (0, 73, 255)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)  # float32


def test_augment_crops_and_flips() -> None:
    from dgconvert.gating.augment import random_crop_flip

    x = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    same = random_crop_flip(x, 0, False, g)
    assert torch.equal(same, x)
    out = random_crop_flip(x, 1, False, g)
    assert out.shape == x.shape
    for b in range(2):  # each output is a shifted window of the zero-padded input
        padded = torch.nn.functional.pad(x[b, 0], (1, 1, 1, 1))
        windows = [padded[i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
        assert any(torch.equal(out[b, 0], w) for w in windows)
    flips = [random_crop_flip(x, 0, True, g) for _ in range(20)]
    assert any(torch.equal(f, x.flip(-1)) or torch.equal(f[0], x[0].flip(-1)) for f in flips)
    assert all(torch.equal(f[0], x[0]) or torch.equal(f[0], x[0].flip(-1)) for f in flips)


def test_fit_refuses_unusable_data() -> None:
    x = np.zeros((8, 1, 28, 28), np.uint8)
    with pytest.raises(DataError, match="training needs labelled data"):
        fit(build_model(TINY), Dataset(x, None), TINY, progress=False)
    with pytest.raises(DataError, match="float32; expected uint8"):
        fit(build_model(TINY), Dataset(x.astype(np.float32), np.zeros(8, np.int64)), TINY)
    with pytest.raises(DataError, match="has no samples"):
        evaluate(build_model(TINY), Dataset(x[:0], np.zeros(0, np.int64)))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"epochs": 0}, "epochs=0 \\(expected an integer >= 1\\)"),
        ({"widths": (4, 8, 16)}, "widths=\\(4, 8, 16\\)"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"crop_pad": -1}, "crop_pad=-1"),
    ],
)
def test_recipe_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid Recipe: " + pattern):
        Recipe(**kwargs)


def test_recipe_cache_key() -> None:
    base = Recipe()
    k = base.cache_key("fashion-mnist:train", "fashion-mnist:test")
    assert len(k) == 16 and k == Recipe().cache_key("fashion-mnist:train", "fashion-mnist:test")
    assert (
        Recipe(epochs=base.epochs + 1).cache_key("fashion-mnist:train", "fashion-mnist:test") != k
    )
    assert Recipe(lr=0.05).cache_key("fashion-mnist:train", "fashion-mnist:test") != k
    assert base.cache_key("fashion-mnist:train[:10]", "fashion-mnist:test") != k
    assert base.as_dict()["widths"] == list(base.widths)


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DGCONVERT_CACHE", str(tmp_path / "env"))
    assert dgtrain.resolve_cache_dir() == tmp_path / "env"
    assert dgtrain.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DGCONVERT_CACHE")
    assert dgtrain.resolve_cache_dir() == Path.home() / ".cache" / "dgconvert"


@needs_fmnist
def test_reference_checkpoint_trains_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    real = dgtrain.train_reference

    def counting(out: Path, **kw: object) -> Path:
        calls.append(Path(out))
        return real(out, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dgtrain, "train_reference", counting)
    recipe = Recipe(widths=(4, 8, 16, 32), epochs=1, batch_size=64, max_steps=3)
    monkeypatch.setenv("DGCONVERT_CACHE", str(tmp_path))
    kw = {"recipe": recipe, "data": TRAIN, "test_data": TEST, "threads": 1, "progress": False}
    p1 = reference_checkpoint(**kw)
    p2 = reference_checkpoint(**kw)
    assert p1 == p2 and p1.parent == tmp_path and len(calls) == 1
    assert recipe.cache_key(TRAIN, TEST) in p1.name
    assert torch.load(p1, weights_only=True)["metrics"]["train_steps"] == 3
    other = reference_checkpoint(tmp_path / "x", **kw)
    assert other.parent == tmp_path / "x" and len(calls) == 2


def test_narrow_convolutions_train_in_the_default_layout(caplog: pytest.LogCaptureFixture) -> None:
    """Channels-last only where every convolution has at least 8 channels (oneDNN's
    channels-last backward crashes on narrower ones on AVX2 EPYCs); the user is told."""
    wide = build_model(Recipe(widths=(8, 16, 24, 32)))
    narrow = build_model(Recipe(widths=(4, 8, 16, 32)))
    with caplog.at_level("WARNING", logger="dgconvert.train"):
        assert dgtrain.training_memory_format(wide) is torch.channels_last
        assert not caplog.records
        assert dgtrain.training_memory_format(narrow) is torch.contiguous_format
    assert "4 channels" in caplog.text and "channels-last" in caplog.text
