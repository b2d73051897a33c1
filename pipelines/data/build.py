"""`vaepipe data build`: turn an image source into WebDataset tar shards (`train/`, `val/`) and a
`manifest.json`, written with webdataset's own ShardWriter. The build happens in a temporary
folder beside the target and is renamed into place at the end, so an interrupted build never
leaves a manifest that lists missing or partial shards, and an old dataset is only replaced
(with --overwrite) once the new one is complete.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import webdataset as wds
from PIL import Image

from pipelines.data.manifest import FORMAT_VERSION, MANIFEST_NAME, file_sha256
from pipelines.data.sources import ImageSource, SourceError, check_image_size, open_source

ENCODE_CHUNK = 1024  # images fetched (rendered/resized) at a time


@dataclass(frozen=True)
class BuildConfig:
    source: str  # shapes | digits | mnist5k | imagefolder:PATH | npz:PATH
    out: str  # output folder (must be absent or empty unless overwrite)
    shard_size: int = 1000  # samples per tar shard (the last shard of a split may hold fewer)
    val_fraction: float = 0.1  # share of samples held out for validation
    seed: int = 0  # drives the sampling of procedural data and the train/val split
    limit: int | None = None  # at most this many samples in total across splits
    image_size: int | None = None  # resize every image to N x N
    overwrite: bool = False  # replace a non-empty `out`
    label: str | None = None  # tables: the class column (built-in tables have their own default)
    column_types: tuple[str, ...] = ()  # tables: NAME=KIND overrides of the inferred column kinds

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise SourceError(f"--shard-size must be >= 1, got {self.shard_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SourceError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (grayscale for C == 1). PIL's PNG output is deterministic."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


# How samples are ordered inside each split's shards; recorded in the manifest so that a reader
# (and `vaepipe data verify`) can tell a shuffled dataset from one built before shuffling existed.
SAMPLE_ORDER = {
    "shuffled": True,
    "method": "seeded permutation of the source indices (numpy default_rng(seed + 1)); "
              "each split keeps its slice of it in permuted order",
}


def split_indices(num_samples: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Source indices of each split, in the order they are written.

    The order is the seeded permutation itself, never sorted: sources often come ordered by
    class (mnist5k, an imagefolder), and sorted indices would give shards of one or two classes,
    which no reader-side shuffle buffer smaller than the split can repair.
    """
    order = np.random.default_rng(seed + 1).permutation(num_samples)
    num_val = int(round(num_samples * val_fraction))
    return {"train": order[num_val:], "val": order[:num_val]}


def _write_split(source: ImageSource, split: str, indices: np.ndarray, folder: Path,
                 shard_size: int) -> list[dict[str, Any]]:
    (folder / split).mkdir(parents=True)
    counts: dict[str, int] = {}
    pattern = str(folder / split / "shard-%06d.tar")
    # mtime=0 makes the tar bytes (and so the sha256 sums) depend only on the data
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0) as sink:
        for start in range(0, len(indices), ENCODE_CHUNK):
            chunk = indices[start:start + ENCODE_CHUNK]
            images, labels, factors = source.batch(chunk)
            for j, index in enumerate(chunk):
                key = int(index) if source.source_index is None else int(source.source_index[index])
                sample = {"__key__": f"{key:08d}", "png": encode_png(images[j]), "cls": int(labels[j])}
                if factors is not None:
                    sample["json"] = {"factors": factors[j].tolist()}
                sink.write(sample)
                counts[sink.fname] = counts.get(sink.fname, 0) + 1
            print(f"[data] {split}: {min(start + ENCODE_CHUNK, len(indices))}/{len(indices)} samples",
                  file=sys.stderr)
    if not len(indices):  # ShardWriter opened an empty first shard: a split with no samples has none
        for tar in (folder / split).glob("*.tar"):
            tar.unlink()
        return []
    return [
        {"name": f"{split}/{Path(name).name}", "num_samples": n, "sha256": file_sha256(name)}
        for name, n in sorted(counts.items())
    ]


# modality -> the builder of its sources ("module:function"); images are built here
BUILDERS = {"table": "pipelines.data.table_build:build_table_dataset"}


def source_modality(spec: str) -> str:
    """Which modality a --source string names: "table" for table sources, else "image"."""
    from pipelines.data.table_source import is_table_source

    return "table" if is_table_source(spec) else "image"


def build_dataset(config: BuildConfig) -> dict[str, Any]:
    """Build shards + manifest at `config.out`; returns the manifest dict."""
    modality = source_modality(config.source)
    if modality in BUILDERS:
        module, _, function = BUILDERS[modality].partition(":")
        return getattr(importlib.import_module(module), function)(config)
    if config.label is not None or config.column_types:
        raise SourceError(f"--label and --column-types are for tables; the image source {config.source} "
                          "takes its labels from the source")
    out = Path(config.out)
    check_out(config, out)
    check_image_size(config.image_size, ENCODE_CHUNK)
    source = open_source(config.source, config.limit, config.seed, config.image_size)
    splits = split_indices(source.num_samples, config.val_fraction, config.seed)

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": config.source,
        "seed": config.seed,
        "image_shape": list(source.image_shape),
        "class_names": source.class_names,
        "sample_order": SAMPLE_ORDER,
        "splits": {},
    }
    if source.factor_names:
        manifest["factors"] = {"names": source.factor_names, "values": source.factor_values}
    return write_staged(out, manifest, splits,
                        lambda split, indices, staging: _write_split(source, split, indices, staging, config.shard_size))


def write_staged(out: Path, manifest: dict[str, Any], splits: dict[str, np.ndarray],
                 write_split: Callable[[str, np.ndarray, Path], list[dict[str, Any]]]) -> dict[str, Any]:
    """The atomic build every modality shares: a staging folder beside `out`, each split's shards from
    `write_split(split, indices, staging)` (their manifest entries), the manifest written last, then
    the swap into place. On any failure the staging folder is removed and `out` is left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out, 'building')}-", dir=out.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: the dataset must be readable by others
        for split, indices in splits.items():
            manifest["splits"][split] = {"num_samples": int(len(indices)),
                                         "shards": write_split(split, indices, staging)}
        # the manifest is the last file written: its presence means every shard it lists is complete
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished build to `out`; an old `out` is removed only after the new one is in place."""
    if out.exists():
        retired = out.with_name(_staging_prefix(out, "old"))
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


# -- what --out may be, and the staging folders of killed builds ----------------------------------

DATASET_ENTRIES = {MANIFEST_NAME, "train", "val"}  # everything a build writes into its folder


def check_out(config: BuildConfig, out: Path) -> None:
    """Refuse an --out that would destroy data vaepipe did not write: the source itself or a folder
    holding it, or a non-empty folder that is not a vaepipe dataset (--overwrite replaces only those)."""
    if out.exists() and not out.is_dir():
        raise SourceError(f"--out {out} exists and is not a folder")
    kind, sep, path = config.source.partition(":")
    if sep and kind in ("imagefolder", "npz") and path:
        source, target = Path(path).resolve(), out.resolve()
        if source == target or target in source.parents:
            raise SourceError(f"--out {out} is or contains the source {path}; write the dataset to another folder")
        if kind == "imagefolder" and source in target.parents:
            raise SourceError(f"--out {out} is inside the imagefolder source {path}, where it would become a "
                              "class folder; write the dataset outside it")
    if not out.is_dir() or not any(out.iterdir()):
        return
    entries = sorted(p.name for p in out.iterdir())
    if not _is_dataset(out):
        raise SourceError(f"--out {out} is not empty and holds no vaepipe dataset (no vaepipe {MANIFEST_NAME}); "
                          "vaepipe only replaces folders it built: choose a new or empty folder")
    foreign = [name for name in entries if name not in DATASET_ENTRIES]
    if foreign:
        raise SourceError(f"--out {out} holds a vaepipe dataset but also {', '.join(foreign[:5])}, which the "
                          "build did not write; move them out or choose another folder")
    if not config.overwrite:
        raise SourceError(f"--out {out} already exists and is not empty; pass --overwrite to replace its "
                          "vaepipe dataset once the new build is complete")


def _is_dataset(folder: Path) -> bool:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and isinstance(data.get("splits"), dict)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _staging_prefix(out: Path, what: str) -> str:
    """`.NAME.building-HOST-PID` (and `.old-`): names a build's temporaries by who made them, so a
    later build can tell a killed build's leftovers from one still running."""
    return f".{out.name}.{what}-{socket.gethostname()}-{os.getpid()}"


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete what killed builds of `out` left beside it: only folders named like our staging
    folders, made on this host by a process that no longer runs. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(building|old)-{re.escape(socket.gethostname())}-(\d+)(-\w+)?$")
    removed = []
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _running(int(match.group(2))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        print(f"[data] removed {path.name}, left by a build that was killed", file=sys.stderr)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
