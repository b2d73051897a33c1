"""Streaming reader for table datasets: the image reader's contract (pipelines/data/reader.py) over
Parquet shards. Shards are dealt to (rank x loader worker) slots after the same per-epoch shuffle,
every slot yields exactly floor(total / slots) rows and the shuffle buffer mixes further. What differs
is vectorised: a Parquet shard is read and encoded by the dataset's column transformer whole (and kept,
per process, for the next epochs), and a slot's rows are fully permuted (seeded by slot and epoch) per
pass instead of drawn from a few open shards; rows come out as {"row", "label", "index"}.
"""
from __future__ import annotations

from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.data.manifest import ShardInfo
from pipelines.data.reader import DataReadError, ShardStream, _BadTally, _share
from pipelines.data.table_transform import encode


CACHE_BYTES = 1 << 30  # encoded shards kept per process (tables are small; epochs re-read the same shards)
_ENCODED: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _encoded_shard(shard: ShardInfo, manifest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, labels, index) of one shard, encoded once per process: a shard is identified by its sha256
    in the manifest, so a rebuilt dataset is never served from the cache."""
    key = (shard.url, shard.sha256)
    if key in _ENCODED:
        return _ENCODED[key]
    spec = manifest.data["table"]
    frame = read_table_shard(shard.url)
    rows = torch.from_numpy(encode(frame, spec["columns"]))
    classes = {name: i for i, name in enumerate(manifest.class_names)}
    labels = torch.tensor([classes[str(v)] for v in frame[spec["label"]]], dtype=torch.long)
    index = torch.from_numpy(frame[spec["index_column"]].to_numpy(np.int64))
    if sum(r.numel() * 4 for r, _, _ in _ENCODED.values()) + rows.numel() * 4 <= CACHE_BYTES:
        _ENCODED[key] = (rows, labels, index)
    return rows, labels, index


def shard_labels(manifest, split: str) -> list[np.ndarray]:
    """The class index of every row of each shard of a split, in stored order (`data verify --check-order`)."""
    return [_encoded_shard(shard, manifest)[1].numpy() for shard in manifest.shards(split)]


def read_table_shard(url: str):
    """One Parquet shard as a pandas DataFrame (local path or any fsspec URL)."""
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f).to_pandas()


class TableStream(ShardStream):
    """One split of a table dataset as encoded rows: {"row": float32 (width,), "label", "index"}."""

    def _mixed_samples(self, shards: list[ShardInfo], stride: tuple[int, int] | None, quota: int,
                       rng) -> Iterator[dict[str, Any]]:
        """Exactly `quota` rows of this slot's shards (ShardStream's contract), vectorised: every pass reads
        all of the slot's shards (encoded once per process), permutes their rows with the slot's seeded rng
        (a full shuffle, so rows mix across shards as ShardStream's open shards do) and yields them until the
        quota is met, starting another pass only when the current one is done."""
        tally = _BadTally(self.split, self.max_bad_fraction)
        emitted = 0
        while emitted < quota:
            parts = []
            for shard in shards:
                tally.opened(_share(shard, stride))
                part = self._shard_rows(shard, stride, tally)
                if part is not None:
                    parts.append(part)
            if not parts or sum(len(p[0]) for p in parts) == 0:
                raise DataReadError(f"no readable samples in shards {[s.name for s in shards]}")
            rows, labels, index = (torch.cat([p[k] for p in parts]) for k in range(3))
            order = torch.from_numpy(np.random.default_rng(rng.getrandbits(63)).permutation(len(rows)))
            take = order[:quota - emitted]
            for row, label, key in zip(rows[take].unbind(0), labels[take].unbind(0), index[take].unbind(0)):
                yield {"row": row, "label": label, "index": key}
            emitted += len(take)

    def _shard_rows(self, shard: ShardInfo, stride: tuple[int, int] | None, tally: _BadTally):
        """(rows, labels, index) of this slot's share of one shard, or None when it cannot be read."""
        try:
            rows, labels, index = _encoded_shard(shard, self.manifest)
        except Exception as exc:  # a truncated or foreign file: counted as unreadable, like a bad tar
            tally.finished(shard, _share(shard, stride), 0, [str(exc).splitlines()[0] if str(exc) else type(exc).__name__])
            return None
        if stride is not None:
            rows, labels, index = rows[stride[0]::stride[1]], labels[stride[0]::stride[1]], index[stride[0]::stride[1]]
        tally.finished(shard, _share(shard, stride), len(rows), [])
        return rows, labels, index
