"""Dataset readers behind every ``--data`` option (torch-free: numpy only).

One spec string names a data set everywhere:

- ``fashion-mnist:train`` / ``fashion-mnist:test`` (and ``mnist:train|test``): the idx
  files of an installed copy (``apt-get install -y dataset-fashion-mnist``); the directory
  can be overridden with ``DGCONVERT_FASHION_MNIST_DIR`` / ``DGCONVERT_MNIST_DIR``.
- a path to an idx or idx.gz image file; its labels are read from the file beside it
  (``*-images-idx3-ubyte*`` -> ``*-labels-idx1-ubyte*``) when present, or given
  explicitly as ``IMAGES,LABELS``.
- a ``.npz`` with arrays ``x`` (images ``[N, H, W]`` or ``[N, C, H, W]``), optionally ``y``
  (int labels ``[N]``) and ``classes`` (names).
- an image folder: one sub-folder per class (names sorted; numerically when all are
  integers) holding PNG/JPEG files, or a flat folder of images (unlabelled). Pillow reads
  them when installed; without it 8-bit non-interlaced PNGs are decoded here.

Any spec may end in a slice, ``fashion-mnist:test[:1000]`` or ``[5000:6000]``.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DataError",
    "Dataset",
    "load_dataset",
    "read_idx",
]

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SPEC_HELP = (
    "fashion-mnist:train|test, mnist:train|test, an idx/idx.gz images file, "
    "IMAGES,LABELS (two idx files), a .npz with x (and y), or an image folder; "
    "optionally followed by a slice such as [:1000]"
)


@dataclass(frozen=True)
class _Named:
    env: str
    default_dir: str
    classes: list[str]
    install: str


_NAMED: dict[str, _Named] = {
    "fashion-mnist": _Named(
        env="DGCONVERT_FASHION_MNIST_DIR",
        default_dir="/usr/share/datasets/fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
        install="apt-get install -y dataset-fashion-mnist",
    ),
    "mnist": _Named(
        env="DGCONVERT_MNIST_DIR",
        default_dir="/usr/share/datasets/mnist",
        classes=[str(i) for i in range(10)],
        install="",
    ),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_SLICE_RE = re.compile(r"^(?P<base>.*)\[(?P<start>[+-]?\d*):(?P<stop>[+-]?\d*)\]$")
_SCHEME_RE = re.compile(r"^(?P<name>[A-Za-z][\w.-]+):(?P<rest>.*)$")


@dataclass
class Dataset:
    """Images (uint8 or float32 ``[N, C, H, W]``), optional int64 labels, class names."""

    images: np.ndarray
    labels: np.ndarray | None
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        x = self.images
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype not in (np.uint8, np.float32):
            got = f"{type(x).__name__} {getattr(x, 'dtype', '?')} {getattr(x, 'shape', '?')}"
            raise DataError(
                f"Dataset images are {got}; expected a uint8 or float32 numpy array "
                "[N, C, H, W]. Fix: add the channel axis (x[:, None]) and cast."
            )
        if self.labels is not None:
            y = self.labels
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                got = f"{type(y).__name__} {getattr(y, 'dtype', '?')} {getattr(y, 'shape', '?')}"
                raise DataError(
                    f"Dataset labels are {got}; expected int64 [{len(x)}] (one per image). "
                    "Fix: labels.astype(np.int64), with exactly one label per image."
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        lab = "unlabelled" if self.labels is None else f"{len(self.classes)} classes"
        return (
            f"Dataset({self.source!r}, {len(self)} x {list(self.sample_shape)} "
            f"{self.images.dtype}, {lab})"
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(C, H, W)``."""
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of class names (0 when unknown)."""
        return len(self.classes)

    def require_labels(self, purpose: str) -> np.ndarray:
        """Return the labels, or raise :class:`DataError` saying ``purpose`` needs them."""
        if self.labels is None:
            raise DataError(
                f"{purpose} needs labelled data, but {self.source!r} has no labels. Fix: "
                "pass IMAGES,LABELS for idx files, save y in the .npz, or use one "
                "sub-folder per class."
            )
        return self.labels

    def batches(
        self, batch_size: int, progress: bool | str = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield ``(images, labels)`` views of consecutive batches; a tqdm bar when
        ``progress`` (a string is used as the bar's description)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size is {batch_size!r}; expected a positive integer.")
        n = len(self)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            desc = progress if isinstance(progress, str) else self.source
            bar = tqdm(total=n, desc=desc, unit="img", dynamic_ncols=True)
        try:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                labels = None if self.labels is None else self.labels[start:stop]
                yield self.images[start:stop], labels
                if bar is not None:
                    bar.update(stop - start)
        finally:
            if bar is not None:
                bar.close()

    def subset(self, idx: slice | np.ndarray | list[int] | range) -> Dataset:
        """A new data set of the selected samples (slice, index array or boolean mask)."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            tag = f"[{start}:{stop}]" if step == 1 else f"[{start}:{stop}:{step}]"
            sel: Any = idx
        else:
            sel = np.asarray(idx)
            if sel.size == 0 and sel.dtype == np.float64:  # an empty list
                sel = sel.astype(np.int64)
            if sel.dtype == bool:
                if sel.shape != (len(self),):
                    raise DataError(
                        f"subset mask has shape {sel.shape}; expected ({len(self)},). "
                        "Fix: build the mask from this data set's labels or length."
                    )
            elif sel.dtype.kind not in "iu" or sel.ndim != 1:
                raise DataError(
                    f"subset index is {sel.dtype} {sel.shape}; expected a slice, a 1-D "
                    "integer index array or a boolean mask."
                )
            elif sel.size and (sel.min() < -len(self) or sel.max() >= len(self)):
                raise DataError(
                    f"subset indices span {int(sel.min())}..{int(sel.max())}; expected "
                    f"0..{len(self) - 1} for {self.source!r}."
                )
            tag = f"<{int(np.count_nonzero(sel)) if sel.dtype == bool else sel.size} picked>"
        labels = None if self.labels is None else self.labels[sel]
        return Dataset(self.images[sel], labels, list(self.classes), self.source + tag)

    def fingerprint(self) -> str:
        """SHA-256 of the images (dtype, shape, bytes) and labels: a cache key."""
        h = hashlib.sha256()
        x = np.ascontiguousarray(self.images, dtype=self.images.dtype.newbyteorder("<"))
        h.update(f"images {x.dtype.str} {list(x.shape)}\n".encode())
        h.update(memoryview(x).cast("B"))
        if self.labels is not None:
            y = np.ascontiguousarray(self.labels, dtype="<i8")
            h.update(b"labels\n")
            h.update(memoryview(y).cast("B"))
        return h.hexdigest()


def load_dataset(spec: str, num_classes: int | None = None) -> Dataset:
    """Resolve a ``--data`` spec (see the module docstring) into a :class:`Dataset`.

    With ``num_classes`` the labels are checked to lie in ``0 … num_classes-1``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec is {spec!r}; expected one of: {SPEC_HELP}.")
    spec = spec.strip()
    base, sl = _split_slice(spec)
    ds = _load_base(base, num_classes)
    if sl is not None:
        start, stop, _ = sl.indices(len(ds))
        if stop <= start:
            raise DataError(
                f"slice in {spec!r} selects no samples of the {len(ds)} in {base!r}; "
                f"expected [start:stop] with start < stop within 0..{len(ds)}."
            )
        labels = None if ds.labels is None else ds.labels[sl].copy()
        ds = Dataset(ds.images[sl].copy(), labels, ds.classes)
    ds.source = spec
    if num_classes is not None:
        _check_labels(ds, num_classes)
    return ds


def read_idx(path: str | os.PathLike[str], hint: str = "") -> np.ndarray:
    """Read an idx (or gzip-compressed idx) file into a native-endian numpy array.

    Raises :class:`DataError` on a bad magic number or a size that disagrees with the header.
    """
    path = Path(path)
    fix = hint or "Fix: re-create or re-download the file."
    raw = _read_bytes(path, fix)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an idx file: magic bytes {raw[:4].hex() or '(empty)'}, expected "
            "00 00 <type 08/09/0b/0c/0d/0e> <ndim>. " + fix
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: idx header needs {header} bytes for {ndim} dimensions, the file has "
            f"{len(raw)}; it is truncated. " + fix
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dt = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dt.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{path}: idx header says shape {list(dims)} ({expected} data bytes) but the file "
            f"holds {got} data bytes; it is {what}. " + fix
        )
    return np.frombuffer(raw, dtype=dt, offset=header).reshape(dims).astype(dt.newbyteorder("="))


# --------------------------------------------------------------------------- spec parsing


def _split_slice(spec: str) -> tuple[str, slice | None]:
    if Path(spec).expanduser().exists():
        return spec, None
    m = _SLICE_RE.match(spec)
    if m is None:
        if spec.endswith("]"):
            raise DataError(
                f"cannot parse the slice suffix of {spec!r}; expected [start:stop] with "
                "integers, e.g. fashion-mnist:test[:1000] or [5000:6000]."
            )
        return spec, None
    start = int(m["start"]) if m["start"] else None
    stop = int(m["stop"]) if m["stop"] else None
    return m["base"], slice(start, stop)


def _load_base(spec: str, num_classes: int | None) -> Dataset:
    m = _SCHEME_RE.match(spec)
    if m and m["name"].lower() in _NAMED:
        return _load_named(m["name"].lower(), m["rest"])
    path = Path(spec).expanduser()
    if path.exists():
        return _load_path(path, num_classes)
    if "," in spec:
        images, labels = (p.strip() for p in spec.split(",", 1))
        return _load_idx_pair(Path(images).expanduser(), Path(labels).expanduser(), num_classes)
    if m and not Path(m["name"]).exists() and "/" not in m["name"] and "\\" not in m["name"]:
        raise DataError(
            f"unknown data set name {m['name']!r} in {spec!r}; expected one of "
            f"{', '.join(sorted(_NAMED))} (or a path). Accepted specs: {SPEC_HELP}."
        )
    raise DataError(f"{spec!r}: no such file or directory. Expected one of: {SPEC_HELP}.")


def _load_named(name: str, split: str) -> Dataset:
    info = _NAMED[name]
    if split not in _SPLIT_PREFIX:
        raise DataError(f"{name}:{split} names no split; expected {name}:train or {name}:test.")
    env_value = os.environ.get(info.env)
    root = Path(env_value or info.default_dir).expanduser()
    if env_value:
        how = f"Fix: point {info.env} (now {env_value!r}) at the directory holding them"
    elif info.install:
        how = f"Fix: {info.install}, or set {info.env} to a directory holding them"
    else:
        how = f"Fix: set {info.env} to a directory holding them"
    prefix = _SPLIT_PREFIX[split]
    files = []
    for kind, n in (("images", 3), ("labels", 1)):
        stem = f"{prefix}-{kind}-idx{n}-ubyte"
        found = next((root / f for f in (stem + ".gz", stem) if (root / f).is_file()), None)
        if found is None:
            raise DataError(
                f"{name}:{split} needs {root / stem}.gz (or uncompressed) but it is missing. {how}."
            )
        files.append(found)
    fix = (
        f"Fix: reinstall ({info.install.replace('install', 'install --reinstall')})"
        if info.install and not env_value
        else f"Fix: replace the file (directory from {info.env})"
    )
    return _load_idx_pair(files[0], files[1], None, hint=fix + ".", classes=list(info.classes))


def _load_path(path: Path, num_classes: int | None) -> Dataset:
    if path.is_dir():
        return _load_folder(path, num_classes)
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix.lower() == ".npz" or head[:2] == b"PK":
        return _load_npz(path, num_classes)
    return _load_idx_pair(path, _labels_beside(path), num_classes)


def _labels_beside(images: Path) -> Path | None:
    """``train-images-idx3-ubyte.gz`` -> ``train-labels-idx1-ubyte(.gz)`` if it exists."""
    name = images.name
    if "images" not in name:
        return None
    stem = name.replace("images", "labels").replace("idx3", "idx1")
    for cand in dict.fromkeys((stem, stem.removesuffix(".gz"), stem.removesuffix(".gz") + ".gz")):
        if (images.parent / cand).is_file():
            return images.parent / cand
    return None


# --------------------------------------------------------------------------- readers


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != b"\x1f\x8b":
                return f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}. Fix: check the path and permissions.") from e
    try:
        with gzip.open(path, "rb") as g:
            return g.read()
    except EOFError as e:
        raise DataError(
            f"{path}: the gzip stream ends early ({e}); the file is truncated. " + fix
        ) from e
    except (OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({e}). " + fix) from e


def _load_idx_pair(
    images_path: Path, labels_path: Path | None, num_classes: int | None, hint: str = "",
    classes: list[str] | None = None,
) -> Dataset:
    """Images (and labels) from idx files; ``hint`` ends read errors (how to fix them)."""
    for p in (images_path, labels_path):
        if p is not None and not p.is_file():
            raise DataError(f"{p}: no such file. Expected IMAGES,LABELS paths of idx files.")
    images = _as_images(read_idx(images_path, hint), str(images_path))
    labels = None
    if labels_path is not None:
        labels = _as_labels(read_idx(labels_path, hint), str(labels_path))
        _check_lengths(images, labels, f"{images_path} and {labels_path}")
    return Dataset(images, labels,
                   classes if classes is not None else _default_classes(labels, num_classes))


def _load_npz(path: Path, num_classes: int | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if "x" not in keys:
                raise DataError(
                    f"{path} holds arrays {keys}; expected 'x' (images) and optionally 'y' "
                    "(labels) and 'classes'. Fix: np.savez(path, x=images, y=labels)."
                )
            x = z["x"]
            y = z["y"] if "y" in keys else None
            names = z["classes"] if "classes" in keys else None
    except DataError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile, zlib.error) as e:  # what zipfile and numpy raise on bad bytes
        raise DataError(
            f"{path}: unreadable .npz ({type(e).__name__}: {e}); truncated, corrupt, encrypted "
            "or it holds pickled objects. Fix: re-save it with np.savez(path, x=images, y=labels)."
        ) from e
    images = _as_images(x, f"{path}['x']")
    labels = None if y is None else _as_labels(y, f"{path}['y']")
    if labels is not None:
        _check_lengths(images, labels, f"{path}['x'] and ['y']")
    if names is None:
        classes = _default_classes(labels, num_classes)
    else:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(
                f"{path}['classes'] is {names.dtype} {names.shape}; expected a 1-D array of "
                "strings. Fix: np.savez(..., classes=np.array(['cat', 'dog']))."
            )
        classes = [str(c) for c in names.tolist()]
    return Dataset(images, labels, classes)


def _load_folder(root: Path, num_classes: int | None) -> Dataset:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
    if subdirs and loose:
        raise DataError(
            f"{root} mixes class sub-folders ({subdirs[0].name}, ...) with loose images "
            f"({loose[0].name}, ...); expected either one sub-folder per class or only "
            "images (unlabelled). Fix: move the loose images into their class folders."
        )
    if not subdirs and not loose:
        raise DataError(
            f"{root} holds no images and no class sub-folders; expected one sub-folder per "
            f"class with {'/'.join(sorted(_IMAGE_SUFFIXES))} files."
        )
    if loose:
        arrays = [_read_image(p) for p in loose]
        return Dataset(_stack_images(arrays, loose), None, _default_classes(None, num_classes))
    if all(re.fullmatch(r"\d+", d.name) for d in subdirs):
        subdirs.sort(key=lambda d: int(d.name))
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(subdirs):
        found = sorted(
            p
            for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not found:
            raise DataError(
                f"class folder {d} holds no images; expected "
                f"{'/'.join(sorted(_IMAGE_SUFFIXES))} files. Fix: add images or remove it."
            )
        files += found
        labels += [k] * len(found)
    images = _stack_images([_read_image(p) for p in files], files)
    return Dataset(images, np.asarray(labels, dtype=np.int64), [d.name for d in subdirs])


def _stack_images(arrays: list[np.ndarray], files: list[Path]) -> np.ndarray:
    color = any(a.ndim == 3 for a in arrays)
    out = []
    for a in arrays:
        if color and a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        out.append(a.transpose(2, 0, 1) if a.ndim == 3 else a[None])
    first = out[0].shape
    for a, p in zip(out, files, strict=True):
        if a.shape != first:
            raise DataError(
                f"{p} is {list(a.shape)} (C, H, W) but {files[0]} is {list(first)}; expected "
                "every image the same size. Fix: resize the images to one size."
            )
    return np.ascontiguousarray(np.stack(out))


def _read_image(path: Path) -> np.ndarray:
    """One image as uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]``."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None:
        if path.suffix.lower() != ".png":
            raise DataError(
                f"reading {path} needs Pillow, which is not installed; only PNG is decoded "
                "without it. Fix: pip install pillow (or convert the images to PNG)."
            )
        try:
            return _decode_png(path.read_bytes(), path)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}.") from e
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(
                    f"{path} is a {im.mode} (16-bit/float) image; expected 8-bit grayscale or "
                    "color. Fix: convert the images to 8-bit."
                )
            im = im.convert("L" if im.mode in ("1", "L", "LA") else "RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image ({e}). Fix: replace or remove the file.") from e


_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # color type -> samples per pixel


def _decode_png(data: bytes, where: Path | str = "<png>") -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG (gray, RGB, with or without alpha; alpha dropped)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise DataError(f"{where}: not a PNG file (bad signature). Fix: replace the file.")
    pos, ihdr, idat = 8, None, []
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise DataError(f"{where}: PNG chunk {ctype!r} is truncated. Fix: replace the file.")
        pos += 12 + length
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body[:13])
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if ihdr is None or not idat:
        raise DataError(f"{where}: PNG lacks IHDR or IDAT chunks (truncated?). Fix: replace it.")
    w, h, depth, color, _, _, interlace = ihdr
    if depth != 8 or color not in _PNG_CHANNELS or interlace:
        raise DataError(
            f"{where}: PNG with bit depth {depth}, color type {color}, interlace {interlace}; "
            "without Pillow only 8-bit non-interlaced gray/RGB(A) PNGs are decoded. "
            "Fix: pip install pillow."
        )
    bpp = _PNG_CHANNELS[color]
    stride = w * bpp
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise DataError(f"{where}: corrupt PNG data ({e}). Fix: replace the file.") from e
    if len(raw) != h * (stride + 1):
        raise DataError(
            f"{where}: PNG data holds {len(raw)} bytes, expected {h * (stride + 1)} for "
            f"{w}x{h}x{bpp}; it is truncated. Fix: replace the file."
        )
    rows = np.frombuffer(raw, np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int64)
    prev = np.zeros(stride, np.int64)
    for r in range(h):
        ftype, line = int(rows[r, 0]), rows[r, 1:].astype(np.int64)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub: running sum per channel
            cur = np.empty_like(line)
            for c in range(bpp):
                cur[c::bpp] = np.cumsum(line[c::bpp]) & 0xFF
        elif ftype == 2:  # Up
            cur = (line + prev) & 0xFF
        elif ftype in (3, 4):  # Average / Paeth: sequential along the row
            cur = line.copy()
            for i in range(stride):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(prev[i])
                if ftype == 3:
                    pred = (a + b) // 2
                else:
                    cc = int(prev[i - bpp]) if i >= bpp else 0
                    p = a + b - cc
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
                cur[i] = (cur[i] + pred) & 0xFF
        else:
            raise DataError(f"{where}: PNG row {r} has unknown filter {ftype}; corrupt file.")
        out[r] = cur
        prev = cur
    img = out.astype(np.uint8).reshape(h, w, bpp)
    if bpp in (2, 4):  # drop alpha
        img = img[:, :, : bpp - 1]
    return np.ascontiguousarray(img[:, :, 0] if img.shape[2] == 1 else img)


# --------------------------------------------------------------------------- checks


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{where} has shape {list(x.shape)}; expected images [N, H, W] or [N, C, H, W]."
        )
    if len(x) == 0:
        raise DataError(f"{where} holds no images (shape {list(x.shape)}); expected N >= 1.")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind == "f":
        return np.ascontiguousarray(x, dtype=np.float32)
    raise DataError(
        f"{where} has dtype {x.dtype}; expected uint8 pixels or float32 network input. "
        "Fix: convert with x.astype(np.uint8) (0..255 pixels) or x.astype(np.float32)."
    )


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"{where} is {y.dtype} with shape {list(y.shape)}; expected 1-D integer class "
            "indices. Fix: labels.astype(np.int64) (one class index per image)."
        )
    return y.astype(np.int64)


def _check_lengths(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if len(images) != len(labels):
        raise DataError(
            f"{where}: {len(images)} images but {len(labels)} labels; expected one label per "
            "image. Fix: pair the matching images and labels files."
        )


def _default_classes(labels: np.ndarray | None, num_classes: int | None) -> list[str]:
    if num_classes is not None:
        n = num_classes
    elif labels is not None and labels.size:
        n = int(labels.max()) + 1
    else:
        n = 0
    return [str(i) for i in range(max(n, 0))]


def _check_labels(ds: Dataset, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"num_classes is {num_classes!r}; expected a positive integer.")
    bad = None if ds.labels is None else (ds.labels < 0) | (ds.labels >= num_classes)
    if bad is not None and bad.any():
        values, counts = np.unique(ds.labels[bad], return_counts=True)
        listed = ", ".join(f"{v} ({c}x)" for v, c in zip(values[:10], counts[:10], strict=True))
        more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
        raise DataError(
            f"{ds.source!r}: {int(bad.sum())} of {len(ds)} labels lie outside 0..{num_classes - 1}: "
            f"{listed}{more}. Expected class indices below num_classes={num_classes}. "
            "Fix: use data labelled for this model, or the right --num-classes."
        )
    if ds.classes and len(ds.classes) != num_classes:
        raise DataError(
            f"{ds.source!r} has {len(ds.classes)} classes ({', '.join(ds.classes[:12])}); "
            f"expected {num_classes}. Fix: use data with the model's classes."
        )
