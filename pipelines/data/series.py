"""Series sources the data builder understands: labelled, fixed-length windows of uni- or multivariate
series (sensor signals, activity recordings) as float32 (N, C, T). `aeon:NAME` opens a classification
set bundled inside the aeon package (GunPoint, ItalyPowerDemand, BasicMotions, ...; nothing is
downloaded); `csv:PATH` / `parquet:PATH` read a table in the `wide` layout (one row per univariate
series, one column per time step) or the `long` layout (one row per time step: series id, optional
time, label, one column per channel). Series of unequal length are cut into `window`-step windows.

Not here: splitting, shards and the manifest (series_build.py); how a window is decoded (series_decode).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.sources import SourceError, limited

SERIES_KINDS = ("aeon", "csv", "parquet")  # `--source KIND:...` prefixes that name a series source
LAYOUTS = ("wide", "long")
SERIES_SOURCE_HELP = "aeon:NAME (a set bundled with aeon, e.g. aeon:GunPoint) | csv:PATH | parquet:PATH"


def is_series_source(spec: str) -> bool:
    kind, sep, rest = spec.partition(":")
    return bool(sep) and kind in SERIES_KINDS and bool(rest)


@dataclass(frozen=True)
class SeriesOptions:
    """How a table becomes series; the aeon sets need none of it (they come as series already)."""

    layout: str = "wide"  # "wide": a row per series, a column per step; "long": a row per step
    label_column: str = "label"  # the class of each series (long: constant within a series)
    id_column: str = "series_id"  # long layout: which series a row belongs to
    time_column: str | None = None  # long layout: rows are ordered by it within a series (default: file order)
    window: int | None = None  # cut every series into windows of this many steps (needed for unequal lengths)
    stride: int | None = None  # steps between window starts (default: the window, no overlap)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise SourceError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.window is not None and self.window < 2:
            raise SourceError(f"--window must be >= 2, got {self.window}")
        if self.stride is not None and (self.window is None or self.stride < 1):
            raise SourceError("--stride needs --window and must be >= 1" if self.window is None
                              else f"--stride must be >= 1, got {self.stride}")


@dataclass
class SeriesSource:
    """N labelled windows in memory: values float32 (N, C, T) in the source's own units."""

    name: str
    values: np.ndarray
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    channel_names: list[str]
    series_of: np.ndarray  # int64 (N,): the series each window was cut from (windows of one series share it)
    start_of: np.ndarray  # int64 (N,): the window's first step in its series
    source_index: np.ndarray | None = None  # with a --limit: each window's position in the whole source

    @property
    def num_samples(self) -> int:
        return len(self.values)


def _windows(series: list[np.ndarray], name: str, options: SeriesOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (N, C, window), series index, start) from series of shape (C, L_i)."""
    lengths = sorted({s.shape[1] for s in series})
    if options.window is None:
        if len(lengths) > 1:
            raise SourceError(f"source {name!r} has series of unequal lengths ({lengths[0]}..{lengths[-1]} steps); "
                              "pass --window N to cut them into windows of N steps")
        return (np.stack(series).astype(np.float32), np.arange(len(series), dtype=np.int64),
                np.zeros(len(series), dtype=np.int64))
    window, stride = options.window, options.stride or options.window
    if lengths[-1] < window:
        raise SourceError(f"--window {window} is longer than every series of {name!r} (longest: {lengths[-1]} steps)")
    values, series_of, start_of = [], [], []
    for i, s in enumerate(series):
        for start in range(0, s.shape[1] - window + 1, stride):
            values.append(s[:, start:start + window])
            series_of.append(i)
            start_of.append(start)
    return np.stack(values).astype(np.float32), np.asarray(series_of, np.int64), np.asarray(start_of, np.int64)


def _labelled(name: str, series: list[np.ndarray], raw_labels: list, channel_names: list[str],
              options: SeriesOptions, limit: int | None, seed: int) -> SeriesSource:
    if not series:
        raise SourceError(f"source {name!r} holds no series")
    for s in series:
        if not np.isfinite(s).all():
            raise SourceError(f"source {name!r} has missing or non-finite values inside a series; fill them first")
    class_names = sorted({str(v) for v in raw_labels}, key=_natural)
    index = {c: i for i, c in enumerate(class_names)}
    values, series_of, start_of = _windows(series, name, options)
    labels = np.asarray([index[str(raw_labels[i])] for i in series_of], dtype=np.int64)
    keep = limited(len(values), limit, seed)
    return SeriesSource(name, values[keep], labels[keep], class_names, channel_names, series_of[keep],
                        start_of[keep], keep if limit is not None else None)


def _natural(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def aeon_names() -> list[str]:
    """Classification sets bundled inside the installed aeon package (NAME/NAME_TRAIN.ts present)."""
    folder = _aeon_data_folder()
    return sorted(p.name for p in folder.iterdir() if (p / f"{p.name}_TRAIN.ts").is_file()) if folder else []


def _aeon_data_folder() -> Path | None:
    try:
        import aeon.datasets
    except ImportError:
        return None
    folder = Path(aeon.datasets.__file__).parent / "data"
    return folder if folder.is_dir() else None


def aeon_source(name: str, options: SeriesOptions, limit: int | None, seed: int) -> SeriesSource:
    """A classification set bundled with aeon: its TRAIN and TEST files together (vaepipe splits them itself)."""
    folder = _aeon_data_folder()
    if folder is None:
        raise SourceError("source 'aeon:...' needs the aeon package: pip install aeon")
    if not (folder / name / f"{name}_TRAIN.ts").is_file():
        raise SourceError(f"aeon:{name} is not a classification set bundled with aeon (nothing is downloaded); "
                          f"bundled: {', '.join(aeon_names())}")
    from aeon.datasets import load_from_ts_file

    series, raw_labels = [], []
    for split in ("TRAIN", "TEST"):
        file = folder / name / f"{name}_{split}.ts"
        if not file.is_file():
            continue
        x, y = load_from_ts_file(str(file))
        series += [np.asarray(s, dtype=np.float64) for s in x]
        raw_labels += [str(v) for v in y]
    channels = [f"dim_{c}" for c in range(series[0].shape[0])]
    return _labelled(f"aeon:{name}", series, raw_labels, channels, options, limit, seed)


def _read_table(kind: str, path: str):
    import pandas as pd

    file = Path(path)
    if not file.is_file():
        raise SourceError(f"{kind} source: no such file {path!r}")
    try:
        return pd.read_csv(file) if kind == "csv" else pd.read_parquet(file)
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        raise SourceError(f"{kind} source {path!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _require_columns(name: str, frame, columns: dict[str, str]) -> None:
    for flag, column in columns.items():
        if column not in frame.columns:
            raise SourceError(f"{flag} {column!r} is not a column of {name} (columns: "
                              f"{', '.join(map(str, list(frame.columns)[:20]))})")


def table_source(kind: str, path: str, options: SeriesOptions, limit: int | None, seed: int) -> SeriesSource:
    """A CSV/Parquet table in the wide or long layout (see the module docstring)."""
    frame = _read_table(kind, path)
    name = f"{kind}:{path}"
    _require_columns(name, frame, {"--label-column": options.label_column})
    if options.layout == "wide":
        value_columns = [c for c in frame.columns if c != options.label_column]
        if not value_columns:
            raise SourceError(f"wide source {name} has no value columns besides {options.label_column!r}")
        values = _numeric(name, frame[value_columns])
        # trailing missing values end a shorter series (wide tables pad unequal lengths with empty cells)
        series = []
        for row in values:
            finite = np.flatnonzero(~np.isnan(row))
            series.append(row[None, :finite[-1] + 1] if len(finite) else row[None, :0])
        return _labelled(name, series, frame[options.label_column].tolist(), ["value"], options, limit, seed)
    required = {"--label-column": options.label_column, "--id-column": options.id_column}
    if options.time_column is not None:
        required["--time-column"] = options.time_column
    _require_columns(name, frame, required)
    keys = {options.label_column, options.id_column, options.time_column}
    channels = [c for c in frame.columns if c not in keys]
    if not channels:
        raise SourceError(f"long source {name} has no value columns besides {', '.join(k for k in keys if k)}")
    if options.time_column is not None:
        frame = frame.sort_values([options.id_column, options.time_column], kind="stable")
    series, raw_labels = [], []
    for series_id, rows in frame.groupby(options.id_column, sort=True):
        labels = rows[options.label_column].unique()
        if len(labels) != 1:
            raise SourceError(f"series {series_id!r} of {name} has {len(labels)} labels "
                              f"({', '.join(map(str, labels[:5]))}); a series has one class")
        series.append(_numeric(name, rows[channels]).T)
        raw_labels.append(labels[0])
    return _labelled(name, series, raw_labels, [str(c) for c in channels], options, limit, seed)


def _numeric(name: str, frame) -> np.ndarray:
    try:
        return frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        bad = [str(c) for c in frame.columns if not np.issubdtype(frame[c].dtype, np.number)]
        raise SourceError(f"value column(s) {', '.join(bad[:5])} of {name} are not numeric") from None


def open_series_source(spec: str, options: SeriesOptions, limit: int | None = None, seed: int = 0) -> SeriesSource:
    """Parse a series `--source` string and open it; raises SourceError naming what is wrong."""
    if limit is not None and limit < 1:
        raise SourceError(f"--limit must be >= 1, got {limit}")
    kind, _, rest = spec.partition(":")
    if kind == "aeon":
        return aeon_source(rest, options, limit, seed)
    if kind in ("csv", "parquet") and rest:
        return table_source(kind, rest, options, limit, seed)
    raise SourceError(f"unknown series source {spec!r}; expected one of: {SERIES_SOURCE_HELP}")


# -- one window on disk and in a batch -------------------------------------------------------------

def encode_window(values: np.ndarray) -> bytes:
    """float32 (C, T) -> .npy bytes (no pickle; deterministic)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(values, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def decode_window(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def normalisation(manifest_data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of the train split, as the manifest records them: shape (C, 1)."""
    stats = manifest_data["series"]["normalisation"]
    return (np.asarray(stats["mean"], np.float32)[:, None], np.asarray(stats["std"], np.float32)[:, None])


class series_decoder:
    """The reader's decode for series samples: the stored window in source units, normalised per channel
    with the train split's statistics, as the model's C x 1 x T input. A class, not a closure, so loader
    worker processes can receive it."""

    def __init__(self, manifest_data: dict):
        self.mean, self.std = normalisation(manifest_data)

    def __call__(self, sample: dict):
        import torch

        window = (decode_window(sample["npy"]) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)[:, None, :])
