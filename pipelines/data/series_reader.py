"""The reader of series datasets (`"modality": "series"`): ShardStream's shards, per-rank contract, shuffles
and decoded-shard cache, with each .npy window normalised per channel into the model's C x 1 x T input
(under the batch key "image", which the series families read). Not here: building series shards
(series_build.py).
"""
from __future__ import annotations

from typing import Any

import torch

from pipelines.data.reader import ShardStream
from pipelines.data.series import series_decoder


class SeriesStream(ShardStream):
    """ShardStream over series shards; only how a sample becomes the model's input differs."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._series_decode = series_decoder(self.manifest.data)

    def _decode_input(self, sample: dict[str, Any]) -> torch.Tensor:
        return self._series_decode(sample)
