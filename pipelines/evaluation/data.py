"""The images an evaluation reads: uniform samples of the real splits, a generated dataset's rows,
the early-stopping split every classifier stops on, and the model's codes of a split.
Not here: metrics (pipelines/evaluation/metrics/) or the report (pipelines/evaluation/report.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.config import ConfigError
from pipelines.data import open_stream
from pipelines.data.manifest import Manifest
from pipelines.data.reader import decode_png
from pipelines.evaluation.metrics import stratified_subset


MAX_EARLY_STOPPING = 1000  # images in the early-stopping split at most (each check scores all of them)


BATCH = 256  # images per forward pass (memory bound only)


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # N x C x H x W in [0, 1]
    labels: torch.Tensor  # N, long; -1 = unlabelled
    factors: torch.Tensor | None  # N x F factor values where the source knows them


def load_split(manifest: Manifest, split: str, limit: int, seed: int = 0) -> Split:
    """A uniform random sample of at most `limit` samples of a split (all of them, in shard order, when
    the split is smaller). Reservoir sampling: one streaming pass, memory for `limit` images only, and
    no bias from sources whose shards are sorted by class (imagefolder)."""
    rng = np.random.default_rng(seed)
    kept: list[dict[str, torch.Tensor]] = []
    for seen, sample in enumerate(open_stream(manifest, split, shuffle_buffer=0)):  # the modality's stream
        if len(kept) < limit:
            kept.append(sample)
        elif (slot := int(rng.integers(0, seen + 1))) < limit:
            kept[slot] = sample
    if len(kept) < 20:
        raise ConfigError(f"split {split!r} of {manifest.location} has {len(kept)} samples; evaluation needs >= 20")
    return Split(torch.stack([s["image"] for s in kept]), torch.stack([s["label"] for s in kept]),
                 torch.stack([s["factors"] for s in kept]) if "factors" in kept[0] else None)


def read_synthetic(folder: str | Path, image_shape: tuple[int, int, int], limit: int, seed: int) -> Split:
    """A generated dataset's Parquet rows (hive partition label=K, -1 = unlabelled): at most `limit`
    of them, chosen with `seed`, decoded."""
    import pyarrow.dataset as ds

    root = Path(folder) / "parquet"
    if not root.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} has no parquet/ folder (make one with `vaepipe generate`)")
    table = ds.dataset(str(root), format="parquet", partitioning="hive").to_table(columns=["image", "label"])
    if table.num_rows == 0:
        raise ConfigError(f"synthetic folder {folder} holds no rows")
    rows = np.arange(table.num_rows)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    pngs = table.column("image").take(rows).to_pylist()
    labels = torch.as_tensor(np.asarray(table.column("label").take(rows).to_numpy(), dtype=np.int64))
    images = torch.stack([decode_png(png) for png in pngs])
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ConfigError(f"synthetic images in {folder} have shape {tuple(images.shape[1:])}, the real data "
                          f"{tuple(image_shape)}")
    return Split(images, labels, None)


def early_stopping_split(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(fit, stop): a class-stratified `fraction` of real train (at most MAX_EARLY_STOPPING images) that
    every classifier stops on, and the rest it trains on. Val stays untouched: it is the test set."""
    stop = stratified_subset(train.labels, fraction, seed)
    if len(stop) > MAX_EARLY_STOPPING:
        stop = stop[torch.randperm(len(stop), generator=torch.Generator().manual_seed(seed))[:MAX_EARLY_STOPPING]]
    keep = torch.ones(len(train.labels), dtype=torch.bool)
    keep[stop] = False

    def take(mask_or_index):
        return Split(train.images[mask_or_index], train.labels[mask_or_index],
                     None if train.factors is None else train.factors[mask_or_index])

    return take(keep), take(stop)


@torch.no_grad()
def embed(model, split: Split) -> torch.Tensor:
    """Deterministic codes (posterior means) of a split, with labels for conditional models."""
    return torch.cat([model.embed(split.images[i:i + BATCH], model.condition_on(split.labels[i:i + BATCH], all_known=True))
                      for i in range(0, len(split.images), BATCH)])

