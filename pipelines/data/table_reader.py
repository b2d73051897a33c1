"""Streaming reader for table datasets: the image reader's contract (pipelines/data/reader.py) over
Parquet shards. Shards are dealt to (rank x loader worker) slots after the same per-epoch shuffle,
every slot yields exactly floor(total / slots) rows, several shards are read at once and a shuffle
buffer mixes further; only reading a shard differs: the whole Parquet file is read and encoded by the
dataset's column transformer at once (and kept, per process, for the next epochs), then yielded row by
row as {"row", "label", "index"}.
"""
from __future__ import annotations

from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.data.manifest import ShardInfo
from pipelines.data.reader import ShardStream, _BadTally, _share
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

    def _shard_samples(self, shard: ShardInfo, stride: tuple[int, int] | None, tally: _BadTally
                       ) -> Iterator[dict[str, Any]]:
        errors: list[str] = []
        rows = labels = index = None
        try:
            rows, labels, index = _encoded_shard(shard, self.manifest)
        except Exception as exc:  # a truncated or foreign file: counted as unreadable, like a bad tar
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        good = 0
        if rows is not None:
            positions = range(len(rows)) if stride is None else range(stride[0], len(rows), stride[1])
            for position in positions:
                good += 1
                yield {"row": rows[position], "label": labels[position], "index": index[position]}
        tally.finished(shard, _share(shard, stride), good, errors)

