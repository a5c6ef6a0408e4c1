"""Dataset readers: real Fashion-MNIST slices and small files written here, good and bad."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from dgconvert import data as dgdata
from dgconvert.core.errors import DGConvertError
from dgconvert.data import FASHION_MNIST_CLASSES, DataError, Dataset, load_dataset, read_idx

FMNIST_DIR = Path(
    os.environ.get("DGCONVERT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)
# The first test labels of Fashion-MNIST (t10k-labels-idx1-ubyte).
FIRST_TEST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def write_idx(path: Path, arr: np.ndarray, *, gz: bool | None = None) -> Path:
    """Write ``arr`` (uint8 or int32) as an idx file; gzip when the name ends in .gz."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[arr.dtype]
    blob = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if gz if gz is not None else path.suffix == ".gz":
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def write_pair(root: Path, n: int = 12, labels_n: int | None = None, prefix: str = "train"):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = (np.arange(labels_n if labels_n is not None else n) % 10).astype(np.uint8)
    xi = write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
    yi = write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return x, y, xi, yi


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode_png(img: np.ndarray, filters: list[int]) -> bytes:
    """A minimal 8-bit PNG encoder applying the given row filters in turn."""
    h, w = img.shape[:2]
    bpp = 1 if img.ndim == 2 else img.shape[2]
    color = {1: 0, 2: 4, 3: 2, 4: 6}[bpp]
    rows = img.reshape(h, w * bpp).astype(int)
    out = bytearray()
    prev = np.zeros(w * bpp, int)
    for r in range(h):
        f, line = filters[r % len(filters)], rows[r]
        out.append(f)
        for i in range(w * bpp):
            a = int(line[i - bpp]) if i >= bpp else 0
            b = int(prev[i])
            c = int(prev[i - bpp]) if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, paeth(a, b, c)][f]
            out.append((int(line[i]) - pred) & 0xFF)
        prev = line

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(out)))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``from PIL import Image`` fail, as on an install without Pillow."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)


# --------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_test_slice() -> None:
    ds = load_dataset("fashion-mnist:test[:1000]", num_classes=10)
    assert ds.images.shape == (1000, 1, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels is not None and ds.labels.dtype == np.int64
    assert ds.labels[:10].tolist() == FIRST_TEST_LABELS
    assert ds.classes == FASHION_MNIST_CLASSES and ds.classes[9] == "Ankle boot"
    assert ds.source == "fashion-mnist:test[:1000]" and len(ds) == 1000
    assert set(ds.labels.tolist()) == set(range(10))
    assert 0.2 < ds.images.mean() / 255 < 0.4  # real pixels, not zeros
    assert ds.images.flags.writeable and ds.images.flags.c_contiguous


@needs_fmnist
def test_fashion_mnist_full_splits_and_slices() -> None:
    test = load_dataset("fashion-mnist:test")
    train = load_dataset("fashion-mnist:train")
    assert len(test) == 10000 and len(train) == 60000
    assert np.bincount(train.labels).tolist() == [6000] * 10
    mid = load_dataset("fashion-mnist:test[5000:6000]")
    np.testing.assert_array_equal(mid.images, test.images[5000:6000])
    np.testing.assert_array_equal(mid.labels, test.labels[5000:6000])
    tail = load_dataset("fashion-mnist:test[-10:]")
    np.testing.assert_array_equal(tail.labels, test.labels[-10:])
    # pixel statistics behind dgconvert.train.MEAN / STD
    assert abs(train.images.mean() / 255 - 0.2860) < 1e-3
    assert abs(train.images.std() / 255 - 0.3530) < 1e-3


@needs_fmnist
def test_idx_path_finds_labels_beside_and_pair_spec() -> None:
    images = FMNIST_DIR / "t10k-images-idx3-ubyte.gz"
    ds = load_dataset(f"{images}[:100]", num_classes=10)
    assert ds.labels is not None and ds.labels[:10].tolist() == FIRST_TEST_LABELS
    assert ds.classes == [str(i) for i in range(10)]
    pair = load_dataset(f"{images},{FMNIST_DIR / 't10k-labels-idx1-ubyte.gz'}[:100]")
    np.testing.assert_array_equal(pair.images, ds.images)
    np.testing.assert_array_equal(pair.labels, ds.labels)


@needs_fmnist
def test_named_dataset_labels_checked_against_num_classes() -> None:
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist:test[:1000]", num_classes=5)
    msg = str(e.value)
    assert "outside 0..4" in msg and "num_classes=5" in msg
    n9 = int((load_dataset("fashion-mnist:test[:1000]").labels == 9).sum())
    assert f"9 ({n9}x)" in msg


# --------------------------------------------------------------------------- named sets


def test_missing_package_dir_via_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("DGCONVERT_FASHION_MNIST_DIR", str(missing))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist:train")
    msg = str(e.value)
    assert "DGCONVERT_FASHION_MNIST_DIR" in msg and str(missing) in msg
    assert "train-images-idx3-ubyte" in msg


def test_missing_default_dir_names_apt_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DGCONVERT_FASHION_MNIST_DIR", raising=False)
    info = dataclasses.replace(dgdata._NAMED["fashion-mnist"], default_dir=str(tmp_path / "x"))
    monkeypatch.setitem(dgdata._NAMED, "fashion-mnist", info)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist:test")


def test_mnist_from_env_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    x, y, _, _ = write_pair(tmp_path, n=12, prefix="t10k")
    monkeypatch.setenv("DGCONVERT_MNIST_DIR", str(tmp_path))
    ds = load_dataset("mnist:test", num_classes=10)
    np.testing.assert_array_equal(ds.images[:, 0], x)
    assert ds.labels.tolist() == y.tolist() and ds.classes == [str(i) for i in range(10)]
    with pytest.raises(DataError, match="DGCONVERT_MNIST_DIR"):
        load_dataset("mnist:train")  # only t10k files were written


def test_corrupt_file_in_package_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, _, xi, _ = write_pair(tmp_path, prefix="t10k")
    xi.write_bytes(xi.read_bytes()[:-30])
    monkeypatch.setenv("DGCONVERT_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="truncated") as e:
        load_dataset("fashion-mnist:test")
    assert "DGCONVERT_FASHION_MNIST_DIR" in str(e.value)


# --------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5) - 7
    p = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr)
    out = read_idx(p)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_idx_pair_written_here(tmp_path: Path) -> None:
    x, y, xi, yi = write_pair(tmp_path, n=12)
    ds = load_dataset(str(xi), num_classes=10)
    np.testing.assert_array_equal(ds.images[:, 0], x)
    assert ds.labels.tolist() == y.tolist()
    ds2 = load_dataset(f"{xi},{yi}[2:5]")
    assert ds2.labels.tolist() == y[2:5].tolist() and ds2.source.endswith("[2:5]")


def test_idx_without_labels_is_unlabelled(tmp_path: Path) -> None:
    x = np.zeros((4, 8, 8), np.uint8)
    p = write_idx(tmp_path / "pics.idx", x)
    ds = load_dataset(str(p))
    assert ds.labels is None and ds.images.shape == (4, 1, 8, 8)
    with pytest.raises(DataError, match="calibration needs labelled data.*IMAGES,LABELS"):
        ds.require_labels("calibration")


def test_truncated_gzip(tmp_path: Path) -> None:
    _, _, xi, _ = write_pair(tmp_path)
    xi.write_bytes(xi.read_bytes()[: len(xi.read_bytes()) // 2])
    with pytest.raises(DataError, match="gzip stream ends early.*truncated"):
        load_dataset(str(xi))


def test_corrupt_gzip(tmp_path: Path) -> None:
    _, _, xi, _ = write_pair(tmp_path)
    blob = bytearray(xi.read_bytes())
    blob[-6] ^= 0xFF  # CRC/size trailer no longer matches
    xi.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt gzip"):
        load_dataset(str(xi))


def test_wrong_magic(tmp_path: Path) -> None:
    p = tmp_path / "x-images-idx3-ubyte"
    p.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataError, match="not an idx file: magic bytes 12340803"):
        load_dataset(str(p))
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"magic bytes \(empty\)"):
        read_idx(p)


def test_size_mismatch_vs_header(tmp_path: Path) -> None:
    x = np.zeros((10, 4, 4), np.uint8)
    p = tmp_path / "x.idx"
    write_idx(p, x)
    p.write_bytes(p.read_bytes()[:-16])  # one image short
    with pytest.raises(DataError, match=r"shape \[10, 4, 4\] \(160 data bytes\).*144.*truncated"):
        read_idx(p)
    write_idx(p, x)
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # header itself cut
    with pytest.raises(DataError, match="header needs 16 bytes"):
        read_idx(p)


def test_mismatched_counts(tmp_path: Path) -> None:
    _, _, xi, _ = write_pair(tmp_path, n=10, labels_n=9)
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load_dataset(str(xi))


def test_bad_labels_named_with_counts(tmp_path: Path) -> None:
    x = np.zeros((6, 4, 4), np.uint8)
    xi = write_idx(tmp_path / "a-images-idx3-ubyte", x)
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([0, 1, 12, 12, 3, 200], np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(str(xi), num_classes=10)
    msg = str(e.value)
    assert "3 of 6 labels lie outside 0..9" in msg
    assert "12 (2x)" in msg and "200 (1x)" in msg
    assert load_dataset(str(xi), num_classes=201).num_classes == 201


def test_labels_file_must_be_1d_int(tmp_path: Path) -> None:
    xi = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match="expected 1-D integer class indices"):
        load_dataset(str(xi))


# --------------------------------------------------------------------------- npz


def test_npz_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 255, (5, 3, 6, 6), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0], np.int32)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y, classes=np.array(["cat", "dog", "eel"]))
    ds = load_dataset(str(p), num_classes=3)
    np.testing.assert_array_equal(ds.images, x)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == y.tolist()
    assert ds.classes == ["cat", "dog", "eel"]
    with pytest.raises(DataError, match="has 3 classes \\(cat, dog, eel\\); expected 4"):
        load_dataset(str(p), num_classes=4)


def test_npz_unlabelled_float(tmp_path: Path) -> None:
    p = tmp_path / "u.npz"
    np.savez(p, x=np.ones((4, 28, 28), np.float64))
    ds = load_dataset(str(p))
    assert ds.labels is None and ds.images.dtype == np.float32
    assert ds.images.shape == (4, 1, 28, 28)


def test_npz_bad_inputs(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"holds arrays \['images'\]; expected 'x'"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(3, np.float32))
    with pytest.raises(DataError, match="float32.*expected 1-D integer"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError, match=r"shape \[3, 4\]; expected images"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((3, 4, 4), np.int16))
    with pytest.raises(DataError, match="dtype int16; expected uint8"):
        load_dataset(str(p))
    np.savez(p, x=np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(str(p))
    np.savez(p, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="pickled"):
        load_dataset(str(p))


def test_npz_truncated(tmp_path: Path) -> None:
    p = tmp_path / "t.npz"
    np.savez(p, x=np.zeros((50, 28, 28), np.uint8), y=np.zeros(50, np.int64))
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(DataError, match="unreadable .npz"):
        load_dataset(str(p))


# --------------------------------------------------------------------------- image folders


def make_folder(root: Path, classes: list[str], per_class: int = 2, size: int = 8) -> dict:
    Image = pytest.importorskip("PIL.Image")
    expected = {}
    rng = np.random.default_rng(3)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
            expected[(name, i)] = img
    return expected


def test_image_folder_labels_and_numeric_order(tmp_path: Path) -> None:
    names = ["0", "1", "2", "10"]  # numeric names sort numerically, not "10" < "2"
    expected = make_folder(tmp_path, names)
    (tmp_path / "2" / "notes.txt").write_text("ignored")
    ds = load_dataset(str(tmp_path), num_classes=4)
    assert ds.classes == ["0", "1", "2", "10"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.images.shape == (8, 1, 8, 8) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[6, 0], expected[("10", 0)])
    sub = load_dataset(f"{tmp_path}[2:4]")
    assert sub.labels.tolist() == [1, 1]


def test_image_folder_unlabelled_and_color(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.full((5, 6), 7, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((5, 6, 3), (1, 2, 3), np.uint8)).save(tmp_path / "b.png")
    ds = load_dataset(str(tmp_path))
    assert ds.labels is None and ds.images.shape == (2, 3, 5, 6)
    assert ds.images[0, :, 0, 0].tolist() == [7, 7, 7]  # gray broadcast to RGB
    assert ds.images[1, :, 0, 0].tolist() == [1, 2, 3]


def test_image_folder_bad_layouts(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    make_folder(tmp_path / "mixed", ["a"])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "mixed" / "loose.png")
    with pytest.raises(DataError, match="mixes class sub-folders"):
        load_dataset(str(tmp_path / "mixed"))
    make_folder(tmp_path / "sizes", ["a"])
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "sizes" / "a" / "z.png")
    with pytest.raises(DataError, match=r"z.png is \[1, 9, 8\].*expected every image the same"):
        load_dataset(str(tmp_path / "sizes"))
    make_folder(tmp_path / "empty", ["a"])
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataError, match="class folder .*b holds no images"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no images and no class sub-folders"):
        load_dataset(str(tmp_path / "nothing"))
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png"):
        load_dataset(str(tmp_path / "broken"))
    make_folder(tmp_path / "one", ["a"])
    with pytest.raises(DataError, match=r"has 1 classes \(a\); expected 3"):
        load_dataset(str(tmp_path / "one"), num_classes=3)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_fallback_decoder_all_filters(channels: int) -> None:
    rng = np.random.default_rng(channels)
    shape = (11, 7) if channels == 1 else (11, 7, channels)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img[3:6] = 200  # smooth rows exercise the predictors too
    png = encode_png(img, filters=[0, 1, 2, 3, 4])
    out = dgdata._decode_png(png)
    want = {1: img, 2: img[..., 0], 3: img, 4: img[..., :3]}[channels]  # alpha dropped
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, want)
    try:  # the test encoder agrees with Pillow when it is there
        from PIL import Image
    except ImportError:
        return
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), img)


def test_png_fallback_matches_pillow_files(tmp_path: Path) -> None:
    expected = make_folder(tmp_path, ["a", "b"], size=28)
    for (name, i), img in expected.items():
        np.testing.assert_array_equal(
            dgdata._decode_png((tmp_path / name / f"{i}.png").read_bytes()), img
        )


def test_png_fallback_rejects_corrupt_and_unsupported() -> None:
    png = encode_png(np.zeros((4, 4), np.uint8), [0])
    with pytest.raises(DataError, match="not a PNG"):
        dgdata._decode_png(b"GIF89a" + png[6:])
    with pytest.raises(DataError, match="chunk b'IDAT' is truncated"):
        dgdata._decode_png(png[:45])
    with pytest.raises(DataError, match="lacks IHDR or IDAT"):
        dgdata._decode_png(png[:30])
    sixteen = png.replace(struct.pack(">IIBB", 4, 4, 8, 0), struct.pack(">IIBB", 4, 4, 16, 0))
    with pytest.raises(DataError, match="bit depth 16.*pip install pillow"):
        dgdata._decode_png(sixteen)


def test_folder_without_pillow(tmp_path: Path, no_pillow: None) -> None:
    img = np.arange(36, dtype=np.uint8).reshape(6, 6)
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "a.png").write_bytes(encode_png(img, [4]))
    ds = load_dataset(str(tmp_path))
    np.testing.assert_array_equal(ds.images[0, 0], img)
    (tmp_path / "c0" / "b.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match="needs Pillow.*pip install pillow"):
        load_dataset(str(tmp_path))


# --------------------------------------------------------------------------- Dataset API


def small_dataset(n: int = 10) -> Dataset:
    x = np.arange(n * 4, dtype=np.uint8).reshape(n, 1, 2, 2)
    return Dataset(x, np.arange(n, dtype=np.int64) % 3, ["a", "b", "c"], "mem")


def test_batches_cover_everything_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    ds = small_dataset(10)
    got = list(ds.batches(4, progress="scan"))
    assert [len(x) for x, _ in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), ds.images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), ds.labels)
    assert "scan" in capsys.readouterr().err
    unl = Dataset(ds.images, None)
    assert all(y is None for _, y in unl.batches(3))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="expected a positive integer"):
            next(ds.batches(bad))  # type: ignore[arg-type]


def test_subset_and_fingerprint() -> None:
    ds = small_dataset(10)
    s = ds.subset(slice(2, 5))
    assert s.labels.tolist() == [2, 0, 1] and s.source == "mem[2:5]"
    assert ds.subset([9, 0]).images[0, 0, 0, 0] == ds.images[9, 0, 0, 0]
    assert len(ds.subset([])) == 0
    mask = ds.labels == 0
    assert len(ds.subset(mask)) == int(mask.sum()) == 4
    with pytest.raises(DataError, match=r"mask has shape \(3,\); expected \(10,\)"):
        ds.subset(np.array([True, False, True]))
    with pytest.raises(DataError, match="span 0..10; expected 0..9"):
        ds.subset(np.array([0, 10]))
    fp = ds.fingerprint()
    assert len(fp) == 64 and fp == small_dataset(10).fingerprint()
    changed = small_dataset(10)
    changed.images[3, 0, 1, 1] += 1
    assert changed.fingerprint() != fp
    relabelled = small_dataset(10)
    relabelled.labels[0] = 2
    assert relabelled.fingerprint() != fp
    assert Dataset(ds.images, None).fingerprint() != fp
    assert Dataset(ds.images.astype(np.float32), ds.labels).fingerprint() != fp


def test_dataset_validates_arrays() -> None:
    with pytest.raises(DataError, match=r"uint8 \(10, 2, 2\); expected .*\[N, C, H, W\]"):
        Dataset(np.zeros((10, 2, 2), np.uint8), None)
    with pytest.raises(DataError, match=r"int64 \(9,\); expected int64 \[10\]"):
        Dataset(np.zeros((10, 1, 2, 2), np.uint8), np.zeros(9, np.int64))
    with pytest.raises(DataError, match=r"int32 \(10,\)"):
        Dataset(np.zeros((10, 1, 2, 2), np.uint8), np.zeros(10, np.int32))
    assert small_dataset().sample_shape == (1, 2, 2)
    assert "mem" in repr(small_dataset())


# --------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "expected one of"),
        ("fashion-mnist:val", "expected fashion-mnist:train or fashion-mnist:test"),
        ("cifar10:train", "unknown data set name 'cifar10'"),
        ("does/not/exist.npz", "no such file or directory"),
        ("fashion-mnist:test[abc]", "cannot parse the slice suffix"),
        ("fashion-mnist:test[1:x]", "cannot parse the slice suffix"),
        ("fashion-mnist:test[7:7]", "selects no samples"),
        ("a.idx,b.idx", "a.idx: no such file"),
    ],
)
def test_spec_errors(spec: str, pattern: str) -> None:
    if "fashion-mnist:test[7" in spec and not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    with pytest.raises(DataError, match=pattern) as e:
        load_dataset(spec)
    assert isinstance(e.value, DGConvertError) and isinstance(e.value, ValueError)


def test_bad_num_classes(tmp_path: Path) -> None:
    _, _, xi, _ = write_pair(tmp_path)
    with pytest.raises(DataError, match="num_classes is 0; expected a positive integer"):
        load_dataset(str(xi), num_classes=0)
