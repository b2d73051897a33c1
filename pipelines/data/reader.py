"""Streaming reader for training: a split's WebDataset shards as a torch IterableDataset, split
across (rank, loader worker) "slots" so that every rank yields exactly the same number of
samples per epoch (DDP hangs if one rank runs dry). Works for local paths and any URL fsspec
opens (s3://, gs://, http://).

How the split works: with S slots (world_size x loader workers), shards go to slots round-robin
after a per-epoch shuffle that every slot computes identically, so no two slots read the same
shard. Each slot then yields exactly floor(total / S) samples, cycling its own shards if they
hold fewer (shards differ by at most one partial shard). With fewer shards than slots, every
slot reads all shards and keeps every S-th sample. A slot reads several of its shards at once
(`open_shards`) and draws each sample from a random one of them, then a shuffle buffer mixes
further, so a batch is a fair mix even of shards that are ordered inside. Corrupt shards and undecodable images are
skipped, counted and warned about with the shard name; past `max_bad_fraction` it fails.

Decoded shards are kept in memory between epochs (up to `cache_bytes` per process, main process
only): the second epoch on reads no tar and decodes no PNG, yet yields the very same samples in the
same order, because only what a shard's pass yields is cached and the shuffles stay as they were.
"""
from __future__ import annotations

import io
import itertools
import json
import random
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data.manifest import Manifest, ShardInfo, read_manifest


class DataReadError(RuntimeError):
    """Too much of the data could not be read."""


@dataclass(frozen=True)
class ReaderConfig:
    batch_size: int = 64  # samples per batch on each rank
    num_loader_workers: int = 0  # DataLoader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 1000  # samples held for shuffling (0 = keep shard order)
    seed: int = 0  # shard and sample shuffling seed (combined with the epoch)
    max_bad_fraction: float = 0.05  # fail once more than this share of expected samples is unreadable
    open_shards: int = 4  # shards each slot reads at once, drawing from a random one per sample
    # decoded samples kept in memory across epochs, per process (0 = decode every epoch). Reading tar
    # members and decoding PNGs took ~40% of an MLP vae's epoch on mnist5k (2 CPU cores)
    cache_bytes: int = 1 << 30


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> float tensor (C, H, W) in [0, 1]."""
    array = np.array(Image.open(io.BytesIO(data)))  # a writable copy torch can own
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


def _open_stream(url: str):
    return fsspec.open(url, "rb").open()


def read_raw_samples(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of one tar shard; read errors are recorded in `errors`, not raised."""
    def record(exc: Exception) -> bool:
        errors.append(str(exc))
        return False  # stop this shard: a tar stream cannot resync after a bad block

    try:
        stream = _open_stream(url)
    except Exception as exc:
        errors.append(f"cannot open: {exc}")
        return
    try:
        source = [{"url": url, "stream": stream}]
        files = wds.tariterators.tar_file_expander(source, handler=record, eof_value=None)
        yield from wds.tariterators.group_by_keys(files, handler=record)
    except Exception as exc:  # a truncated gzip/tar may raise outside the handler
        errors.append(str(exc))
    finally:
        stream.close()


class _DecodedCache:
    """Decoded samples of fully and cleanly read shards, by (url, sha256, stride), within a byte budget.
    Lives for the process: a Ray Train worker or an in-process run keeps it across epochs and splits."""

    def __init__(self) -> None:
        self.entries: dict[tuple, list[dict[str, torch.Tensor]]] = {}
        self.nbytes = 0

    def get(self, key: tuple) -> list[dict[str, torch.Tensor]] | None:
        return self.entries.get(key)

    def put(self, key: tuple, samples: list[dict[str, torch.Tensor]], budget: int) -> None:
        size = sum(t.element_size() * t.nelement() for s in samples for t in s.values())
        if key not in self.entries and self.nbytes + size <= budget:
            self.entries[key] = samples
            self.nbytes += size


_CACHE = _DecodedCache()


def _share(shard: ShardInfo, stride: tuple[int, int] | None) -> int:
    """How many of a shard's samples one slot reads: all, or every stride[1]-th from stride[0]."""
    return shard.num_samples if stride is None else len(range(stride[0], shard.num_samples, stride[1]))


class _BadTally:
    """Unreadable samples of one pass over a split: warns per shard, fails past max_bad_fraction."""

    def __init__(self, split: str, max_bad_fraction: float):
        self.split, self.max_bad_fraction = split, max_bad_fraction
        self.expected = self.bad = 0

    def opened(self, share: int) -> None:
        """Count a shard's share as expected when it is opened: several are read at once."""
        self.expected += share

    def finished(self, shard: ShardInfo, share: int, good: int, errors: list[str]) -> None:
        missing = share - good
        if missing <= 0:
            return
        self.bad += missing
        print(f"[data] warning: shard {shard.name}: {missing} of {share} samples unreadable "
              f"({'; '.join(errors[:3]) or 'truncated'})", file=sys.stderr)
        if self.bad > self.max_bad_fraction * max(self.expected, 1):
            raise DataReadError(
                f"{self.bad} of {self.expected} samples in the shards opened so far from split {self.split!r} were unreadable "
                f"(more than max_bad_fraction={self.max_bad_fraction}); last bad shard: {shard.url}"
            )


class ShardStream(IterableDataset):
    """One split of a dataset as decoded samples: {"image", "label", "index"[, "factors"]}.

    Call `set_epoch(e)` before each epoch to reshuffle shards and samples identically on every rank.
    """

    def __init__(self, manifest: Manifest | str, split: str, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, seed: int = 0, max_bad_fraction: float = 0.05,
                 num_loader_workers: int = 1, open_shards: int = 4, cache_bytes: int = 0):
        super().__init__()
        self.manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
        self.split = split
        self.shards = self.manifest.shards(split)
        self.total = self.manifest.num_samples(split)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.max_bad_fraction = shuffle_buffer, seed, max_bad_fraction
        self.num_loader_workers = max(1, num_loader_workers)
        if open_shards < 1:
            raise ValueError(f"open_shards must be >= 1, got {open_shards}")
        self.open_shards = open_shards
        self.cache_bytes = cache_bytes
        self.has_factors = bool(self.manifest.factor_names)
        self.epoch = 0
        if self.total < world_size * self.num_loader_workers:
            raise DataReadError(
                f"split {split!r} has {self.total} samples, fewer than ranks x loader workers "
                f"({world_size} x {self.num_loader_workers}): every reader needs at least one"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def samples_per_rank(self) -> int:
        """Exactly what one rank yields per epoch (same on every rank)."""
        slots = self.world_size * self.num_loader_workers
        return (self.total // slots) * self.num_loader_workers

    # -- iteration ----------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != self.num_loader_workers:
            raise ValueError(f"ShardStream was built for {self.num_loader_workers} loader workers, "
                             f"the DataLoader runs {workers}")
        worker = info.id if info is not None else 0
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        quota = self.total // slots
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))  # identical on every slot: same seed and epoch
        shards = [self.shards[i] for i in order]
        if len(shards) >= slots:
            mine, stride = shards[slot::slots], None
        else:
            mine, stride = shards, (slot, slots)
        samples = self._mixed_samples(mine, stride, quota, random.Random(f"mix-{self.seed}-{self.epoch}-{slot}"))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{slot}")
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        yield from samples

    def _mixed_samples(self, shards: list[ShardInfo], stride: tuple[int, int] | None, quota: int,
                       rng: random.Random) -> Iterator[dict[str, Any]]:
        """Exactly `quota` decoded samples, drawn at random from up to `open_shards` shards at once.

        Each draw picks one of the open shards at random, so consecutive samples come from
        different shards even when a shard itself is ordered (datasets built before shuffled
        shards existed). A slot whose shards hold fewer than the quota starts another pass over
        them only once the current pass is done, so no sample repeats within a pass.
        """
        tally = _BadTally(self.split, self.max_bad_fraction)
        pending, open_streams, emitted, good_this_pass = list(shards), [], 0, 0
        try:
            while emitted < quota:
                while pending and len(open_streams) < self.open_shards:
                    shard = pending.pop(0)
                    tally.opened(_share(shard, stride))
                    open_streams.append(self._shard_samples(shard, stride, tally))
                if not open_streams:  # a pass is over: start the next one
                    if good_this_pass == 0:
                        raise DataReadError(f"no readable samples in shards {[s.name for s in shards]}")
                    pending, good_this_pass = list(shards), 0
                    continue
                pick = rng.randrange(len(open_streams))
                try:
                    sample = next(open_streams[pick])
                except StopIteration:
                    open_streams.pop(pick)
                    continue
                good_this_pass += 1
                yield sample
                emitted += 1
        finally:
            for stream in open_streams:
                stream.close()  # closes the tar streams of shards left half-read

    def _shard_samples(self, shard: ShardInfo, stride: tuple[int, int] | None, tally: "_BadTally"):
        """Decoded samples of one shard (this slot's share of it); unreadable ones go to `tally`."""
        # DataLoader worker processes end with the epoch: caching there would only cost memory
        caching = self.cache_bytes > 0 and get_worker_info() is None
        key = (shard.url, shard.sha256, stride, self.has_factors)
        cached = _CACHE.get(key) if caching else None
        if cached is not None:
            yield from cached
            tally.finished(shard, _share(shard, stride), len(cached), [])
            return
        good, errors, kept, share = 0, [], [], _share(shard, stride)
        for position, sample in enumerate(read_raw_samples(shard.url, errors)):
            if stride is not None and position % stride[1] != stride[0]:
                continue
            try:
                decoded = self._decode(sample)
            except Exception as exc:  # PIL raises many error types on broken PNGs
                errors.append(f"sample {sample.get('__key__')}: {exc}")
                continue
            good += 1
            if caching:
                kept.append(decoded)
                # a clean, complete share only; stored before the last yield, as a reader that has its
                # quota closes this generator there
                if good == share and not errors:
                    _CACHE.put(key, kept, self.cache_bytes)
            yield decoded
        tally.finished(shard, share, good, errors)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = {
            "image": self._decode_input(sample),  # the model's input (series streams: a window C x 1 x T)
            "label": torch.tensor(int(sample["cls"]), dtype=torch.long),
            "index": torch.tensor(int(sample["__key__"]), dtype=torch.long),  # position in the source
        }
        if self.has_factors:
            out["factors"] = torch.tensor(json.loads(sample["json"])["factors"], dtype=torch.float32)
        return out

    def _decode_input(self, sample: dict[str, Any]) -> torch.Tensor:
        """A sample's model input; streams of other image-shaped modalities (series) override it."""
        return decode_png(sample["png"])


# modality -> its stream class ("module:Class"), each keeping ShardStream's per-rank contract
STREAMS = {"image": "pipelines.data.reader:ShardStream", "table": "pipelines.data.table_reader:TableStream",
           "series": "pipelines.data.series_reader:SeriesStream"}


def open_stream(manifest: Manifest | str, split: str, *args: Any, **kwargs: Any) -> ShardStream:
    """The stream of the dataset's modality over one split (ShardStream's arguments)."""
    import importlib

    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    module, _, name = STREAMS[manifest.modality].partition(":")
    return getattr(importlib.import_module(module), name)(manifest, split, *args, **kwargs)


def make_loader(manifest: Manifest | str, split: str, config: ReaderConfig, rank: int = 0,
                world_size: int = 1, epoch: int = 0) -> DataLoader:
    """A DataLoader over one split for one rank: `len(loader)` batches, equal on every rank."""
    dataset = open_stream(manifest, split, rank, world_size, config.shuffle_buffer, config.seed,
                          config.max_bad_fraction, max(1, config.num_loader_workers), config.open_shards,
                          config.cache_bytes)
    dataset.set_epoch(epoch)
    per_worker = dataset.samples_per_rank() // max(1, config.num_loader_workers)
    if per_worker < config.batch_size:
        raise DataReadError(f"split {split!r}: each loader worker gets {per_worker} samples per epoch, "
                            f"fewer than batch_size={config.batch_size}; lower the batch size or the workers")
    return DataLoader(dataset, batch_size=config.batch_size, drop_last=True,
                      num_workers=config.num_loader_workers,
                      persistent_workers=False)


def batches_per_epoch(loader: DataLoader) -> int:
    """drop_last applies per loader worker, so count per worker."""
    dataset: ShardStream = loader.dataset
    workers = max(1, loader.num_workers)
    return workers * ((dataset.samples_per_rank() // workers) // loader.batch_size)
