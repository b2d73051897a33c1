"""`vaepipe data build` for series sources: windows -> WebDataset tar shards (`train/`, `val/`) and a
`manifest.json` with `"modality": "series"`, the same atomic staging, overwrite rules and seeded
shard order as the image build (build.py), whose helpers it reuses.

Why WebDataset shards (KEY.npy + KEY.cls per window) rather than Parquet shards: the per-rank reader
(pipelines/data/reader.py) already gives every rank the same number of batches, reshuffles shards
per epoch, tallies corrupt shards and verifies sha256 sums; series reuse all of it by decoding
`.npy` instead of `.png`. The cost is the tar headers (~1 KB per window), small at these sizes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from pipelines.data.build import SAMPLE_ORDER, BuildConfig, check_out, split_indices, write_staged
from pipelines.data.manifest import FORMAT_VERSION, file_sha256
from pipelines.data.series import SeriesOptions, SeriesSource, encode_window, open_series_source
from pipelines.data.sources import SourceError

MODALITY = "series"
STD_FLOOR = 1e-6  # a constant channel keeps std 1 instead of dividing by ~0


@dataclass(frozen=True)
class SeriesBuildConfig:
    build: BuildConfig  # source, out, shard size, val fraction, seed, limit, overwrite (image_size must be unset)
    options: SeriesOptions = field(default_factory=SeriesOptions)

    def __post_init__(self) -> None:
        if self.build.image_size is not None:
            raise SourceError(f"--image-size applies to image sources, not the series source {self.build.source!r}")


def channel_statistics(values: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every step of every window (float64 sums)."""
    data = values.astype(np.float64)
    mean = data.mean(axis=(0, 2))
    std = data.std(axis=(0, 2))
    std = np.where(std < STD_FLOOR, 1.0, std)
    return mean.tolist(), std.tolist()


def _write_split(source: SeriesSource, split: str, indices: np.ndarray, folder: Path,
                 shard_size: int) -> list[dict[str, Any]]:
    (folder / split).mkdir(parents=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(folder / split / "shard-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        for index in indices:
            key = int(index) if source.source_index is None else int(source.source_index[index])
            sink.write({"__key__": f"{key:08d}", "npy": encode_window(source.values[index]),
                        "cls": int(source.labels[index]),
                        "json": {"series": int(source.series_of[index]), "start": int(source.start_of[index])}})
            counts[sink.fname] = counts.get(sink.fname, 0) + 1
    print(f"[data] {split}: {len(indices)} windows", file=sys.stderr)
    if not len(indices):
        for tar in (folder / split).glob("*.tar"):
            tar.unlink()
        return []
    return [{"name": f"{split}/{Path(name).name}", "num_samples": n, "sha256": file_sha256(name)}
            for name, n in sorted(counts.items())]


def series_split_indices(source: SeriesSource, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Like the image split, but by series: windows cut from one series all land in the same split, so
    val never holds a neighbour of a training window. Within a split the order is a seeded permutation."""
    groups = np.unique(source.series_of)
    by_group = split_indices(len(groups), val_fraction, seed)
    out = {}
    for split, chosen in by_group.items():
        members = np.flatnonzero(np.isin(source.series_of, groups[chosen]))
        out[split] = np.random.default_rng(seed + 2).permutation(members)
    return out


def build_series_dataset(config: SeriesBuildConfig) -> dict[str, Any]:
    """Build series shards + manifest at `config.build.out`; returns the manifest dict."""
    build = config.build
    out = Path(build.out)
    check_out(build, out)
    source = open_series_source(build.source, config.options, build.limit, build.seed)
    splits = series_split_indices(source, build.val_fraction, build.seed)
    if not len(splits["train"]):
        raise SourceError(f"source {build.source!r}: no windows left for the train split")
    mean, std = channel_statistics(source.values[splits["train"]])
    channels, length = source.values.shape[1:]

    options = config.options
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "modality": MODALITY,
        "source": build.source,
        "seed": build.seed,
        "input_shape": [int(channels), 1, int(length)],  # what a model sees: C x 1 x T
        "class_names": source.class_names,
        "series": {
            "channels": int(channels),
            "length": int(length),
            "channel_names": source.channel_names,
            "layout": options.layout if not build.source.startswith("aeon:") else None,
            "window": options.window,
            "stride": (options.stride or options.window) if options.window else None,
            "num_series": int(len(np.unique(source.series_of))),
            # the reader standardises each channel with these (train split); generation maps back
            "normalisation": {"mean": mean, "std": std},
        },
        "sample_order": {**SAMPLE_ORDER, "method": "seeded split by series, then a seeded permutation of "
                                                   "each split's windows (numpy default_rng(seed + 2))"},
        "splits": {},
    }
    return write_staged(out, manifest, splits,
                        lambda split, indices, staging: _write_split(source, split, indices, staging, build.shard_size))
