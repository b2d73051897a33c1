"""`vaepipe generate` for a series model (trained on a `"modality": "series"` dataset): synthetic windows
as hive-partitioned Parquet (`parquet/label=K/block-NNNNNN.parquet`, one row a window, the values a
list column C x T in the source's units) plus, with `plots_per_class`, PNG plots of a few windows per
class (`plots/<class>/block-NNNNNN.png`), on the same Ray Data skeleton, blocks, seeds, resume and
manifest as image generation: generate.plan_generation plans it through generate.BLOCK_FNS.
Not here: images (generate.py) or resolving registry URIs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.batch.generate import PARQUET_OPTIONS, generation_request
from pipelines.batch.generate_config import GenerateConfig
from pipelines.batch.job import BlockWriter
from pipelines.batch.model import UNLABELLED, label_folder, load_worker_model
from pipelines.config import ConfigError

SCHEMA = pa.schema([
    ("series", pa.list_(pa.list_(pa.float32()))),  # C lists of T values, in the training data's units
    ("latent", pa.list_(pa.float32())),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_uri", pa.string()),
    ("block_seed", pa.int64()),
    ("sample_index", pa.int64()),
    ("id", pa.string()),
    ("class_name", pa.string()),
])


def series_info(model_dir: str) -> dict[str, Any]:
    """The model's dataset.json series section (channels, length, channel names, normalisation)."""
    from pipelines.registry.tracking import read_dataset_info

    info = (read_dataset_info(model_dir) or {}).get("series")
    if not info or "normalisation" not in info:
        raise ConfigError(f"model_dir {model_dir}: dataset.json has no series normalisation, so generated "
                          "windows cannot be mapped back to the data's units (train the model with vaepipe)")
    return info


class SeriesGenerateBlock:
    """A block's compute: the model's seeded sampler -> windows in source units -> Parquet (+ plots).
    Registered in generate.BLOCK_FNS for models whose `modality` is "series"."""

    owned_dirs = ("parquet", "plots")
    takes_filter = False  # --filter-classifier takes an image reference classifier

    @classmethod
    def plan(cls, config: GenerateConfig, info, model, request: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """generate.plan_generation's series part: the request (without pixel_temperature, which a Gaussian
        series decoder ignores), the block's normalisation and plots, and the manifest's series keys."""
        series = series_info(config.model_dir)
        request = generation_request(dataclasses.replace(config, pixel_temperature=1.0), info)
        request["modality"] = "series"
        if config.plots_per_class:
            request["plots_per_class"] = config.plots_per_class
        metadata = {"modality": "series", "input_shape": list(info.input_shape), "series": series,
                    "columns": [f.name for f in SCHEMA]}
        return request, {"series": series, "plots_per_class": config.plots_per_class}, metadata

    @staticmethod
    def result_keys(plan) -> dict[str, Any]:
        """What a series generation's result adds: the plots folder (when asked for) and the modality."""
        return {"images": str(plan.job.out / "plots") if plan.config.plots_per_class else None,
                "modality": "series"}

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, temperature: float, seed: int,
                 provenance: dict[str, str], class_names: list[str] | None, series: dict[str, Any],
                 plots_per_class: int = 0, **_: Any):
        self.model = load_worker_model(model_dir, use_gpu)
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed
        self.provenance, self.class_names = provenance, class_names
        self.mean = np.asarray(series["normalisation"]["mean"], np.float32)[None, :, None]
        self.std = np.asarray(series["normalisation"]["std"], np.float32)[None, :, None]
        self.channel_names = series.get("channel_names")
        self.plots_per_class = plots_per_class

    def sample(self, n: int, labels: Any, generator: Any) -> tuple[np.ndarray, np.ndarray]:
        """(z (n, latent), windows float32 (n, C, T) in source units), `batch_size` at a time."""
        import torch

        latents, windows = [], []
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                count = min(self.batch_size, n - i)
                x, z = self.model.sample_with_latent(count, None if labels is None else labels[i:i + count],
                                                     generator, self.temperature)
                windows.append(x[:, :, 0].float().cpu().numpy())
                latents.append(z.float().cpu().numpy())
        return np.concatenate(latents), (np.concatenate(windows) * self.std + self.mean).astype(np.float32)

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        import torch

        from pipelines.series_figures import plot_windows

        n = block["count"]
        generator = torch.Generator().manual_seed(block["seed"])
        labels = None if block["labels"] is None else torch.tensor(block["labels"], dtype=torch.long)
        latents, windows = self.sample(n, labels, generator)
        label_of = np.full(n, UNLABELLED, np.int64) if labels is None else labels.numpy()
        sample_index = np.arange(block["start"], block["start"] + n, dtype=np.int64)
        counts = {}
        for label in np.unique(label_of).tolist():
            rows = np.flatnonzero(label_of == label)
            name = self.class_names[label] if self.class_names and label != UNLABELLED else None
            channels, steps = windows.shape[1:]
            inner = pa.FixedSizeListArray.from_arrays(windows[rows].reshape(-1), steps)
            series = pa.FixedSizeListArray.from_arrays(inner, channels).cast(SCHEMA.field("series").type)
            latent = pa.FixedSizeListArray.from_arrays(latents[rows].reshape(-1), latents.shape[1]).cast(
                SCHEMA.field("latent").type)
            table = pa.table({
                "series": series,
                "latent": latent,
                "model_name": pa.array([self.provenance["name"]] * len(rows), pa.string()),
                "model_version": pa.array([self.provenance["version"]] * len(rows), pa.string()),
                "model_uri": pa.array([self.provenance["uri"]] * len(rows), pa.string()),
                "block_seed": pa.array(np.full(len(rows), block["seed"], np.int64)),
                "sample_index": pa.array(sample_index[rows]),
                "id": pa.array([f"{self.seed}-{s:08d}" for s in sample_index[rows]], pa.string()),
                "class_name": pa.array([name] * len(rows), pa.string()),
            }, schema=SCHEMA)
            writer.write_parquet(f"parquet/label={label}/block-{block['index']:06d}.parquet", table, **PARQUET_OPTIONS)
            if self.plots_per_class:
                folder = label_folder(label, self.class_names)
                png = _plot_bytes(plot_windows, {folder: windows[rows[:self.plots_per_class]]}, self.channel_names)
                writer.write_bytes(f"plots/{folder}/block-{block['index']:06d}.png", png,
                                   rows=min(len(rows), self.plots_per_class))
            counts[str(label)] = len(rows)
        return counts


def _plot_bytes(plot, groups, channel_names) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return plot(groups, Path(tmp) / "plot.png", channel_names).read_bytes()
