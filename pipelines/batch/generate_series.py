"""`vaepipe generate` for a series model (trained on a `"modality": "series"` dataset): synthetic windows
as hive-partitioned Parquet (`parquet/label=K/block-NNNNNN.parquet`, one row a window, the values a
list column C x T in the source's units) plus, with `plots_per_class`, PNG plots of a few windows per
class (`plots/<class>/block-NNNNNN.png`), on the same Ray Data skeleton, blocks, seeds, resume and
manifest as image generation (generate.py, whose planning it reuses).
Not here: images (generate.py) or resolving registry URIs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.batch.generate import (PARQUET_OPTIONS, check_request_fits, generation_request, plan_blocks,
                                      resolve_out, with_model_class_names)
from pipelines.batch.generate_config import GenerateConfig
from pipelines.batch.job import BatchJob, BlockWriter, run_batch_job
from pipelines.batch.model import UNLABELLED, label_folder, load_saved_model, load_worker_model
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
    """A block's compute: the model's seeded sampler -> windows in source units -> Parquet (+ plots)."""

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, temperature: float, seed: int,
                 provenance: dict[str, str], class_names: list[str] | None, series: dict[str, Any],
                 plots_per_class: int = 0):
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


def run_series_generation(config: GenerateConfig) -> dict[str, Any]:
    """Generate series windows per `config` into `out` (resuming an interrupted run)."""
    loaded, model = load_saved_model(config.model_dir)
    config = with_model_class_names(config, model)
    check_request_fits(config, loaded, config.model_dir)
    if config.filter_classifier is not None:
        raise ConfigError("filter_classifier (--filter-classifier) takes an image reference classifier; it does not "
                          "apply to series models")
    series = series_info(config.model_dir)
    out = resolve_out(config.out).resolve()
    # pixel_temperature does not apply to a Gaussian series decoder: left out so it never changes the request
    request = {k: v for k, v in generation_request(dataclasses.replace(config, pixel_temperature=1.0), model).items()}
    request["modality"] = "series"
    if config.plots_per_class:
        request["plots_per_class"] = config.plots_per_class
    job = BatchJob(
        name="generate",
        out=out,
        request=request,
        blocks=plan_blocks(config, model.num_classes),
        block_fn=SeriesGenerateBlock,
        block_fn_kwargs={
            "model_dir": str(Path(config.model_dir).resolve()), "use_gpu": config.use_gpu,
            "batch_size": config.batch_size, "temperature": config.temperature, "seed": config.seed,
            "provenance": request["model"], "series": series, "plots_per_class": config.plots_per_class,
            "class_names": list(config.class_names) if config.class_names is not None else None,
        },
        owned_dirs=("parquet", "plots"),
        workers=config.workers,
        use_gpu=config.use_gpu,
        metadata={"model_family": model.name, "modality": "series", "input_shape": list(model.input_shape),
                  "series": series, "num_classes": model.num_classes, "latent_dim": model.latent_dim,
                  "columns": [f.name for f in SCHEMA], "partitioning": "hive: label"},
        overwrite=config.overwrite,
    )
    result = run_batch_job(job)
    manifest = result.manifest
    return {
        "out": str(out),
        "total": manifest["total"],
        "per_class": manifest["counts"],
        "parquet": str(out / "parquet"),
        "images": str(out / "plots") if config.plots_per_class else None,  # series: the plots, when asked for
        "manifest": str(out / "manifest.json"),
        "skipped": result.skipped,
        "blocks_written": result.blocks_written,
        "acceptance_rate": None,
        "modality": "series",
    }
