"""`vaepipe generate`: a saved model -> synthetic augmentation data, as hive-partitioned Parquet
(`parquet/label=K/block-NNNNNN.parquet`: PNG bytes, latent z, provenance) plus one PNG file per
sample (`images/<class>/<id>.png`), on the shared Ray Data skeleton (pipelines/batch/job.py).
The request is cut into seeded blocks, so the same request gives byte-identical files and an
interrupted run resumes where it stopped. Not here: resolving registry URIs to a model folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.batch.job import BatchJob, BlockWriter, block_seed, run_batch_job
from pipelines.batch.model import (UNLABELLED, ModelInfo, label_folder, load_saved_model, load_worker_model,
                                   model_class_names, model_modality, model_request, to_uint8)
from pipelines.batch.generate_config import GenerateConfig
from pipelines.config import ConfigError
from pipelines.batch.sample_filter import FilterInfo, SampleFilter, inspect_filter, summarize

LABELS_STREAM = 0  # SeedSequence spawn key of the labels (block noise is BLOCKS_STREAM, pipelines/batch/job.py)
# label is not a column in the files: it is the hive partition (label=K in the path), and readers
# (pandas, pyarrow.dataset, Ray) refuse a column that is both in the files and in the path
SCHEMA = pa.schema([
    ("image", pa.binary()),  # PNG bytes, uint8 gray (C=1) or RGB (C=3)
    ("latent", pa.list_(pa.float32())),  # the z that was decoded (prior noise times temperature)
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_uri", pa.string()),
    ("block_seed", pa.int64()),
    ("sample_index", pa.int64()),  # 0..total-1 across the request
    ("id", pa.string()),  # f"{seed}-{sample_index:08d}": also the PNG's file name
    ("class_name", pa.string()),  # the label's class name (the images/ folder); null when the model has none
])
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": ["block_seed", "sample_index", "id"]}


def resolve_out(out: str, today: datetime.date | None = None) -> Path:
    return Path(out.replace("{date}", (today or datetime.date.today()).isoformat()))


def check_request_fits(config: GenerateConfig, model, folder: str) -> None:
    """The request against the model it samples; ConfigError names the problem."""
    if not model.is_generative:
        raise ConfigError(f"model_dir {folder} holds a {model.name!r} model, which is not generative "
                          "(it has no prior to sample from)")
    conditional = model.is_conditional
    if config.per_class is not None and not conditional:
        raise ConfigError(f"per_class needs a conditional model; {model.name!r} in {folder} is unconditional: "
                          "use num_samples")
    if config.class_names is not None and (not conditional or len(config.class_names) != model.num_classes):
        raise ConfigError(f"class_names has {len(config.class_names)} names but the {model.name!r} model has "
                          f"{model.num_classes if conditional else 'no'} classes")


def with_model_class_names(config: GenerateConfig, info: ModelInfo) -> GenerateConfig:
    """Without explicit class_names, a model trained by vaepipe names its classes itself (its
    dataset.json, registered with it); models saved without one keep numeric folders."""
    if config.class_names is not None:
        return config
    names = model_class_names(config.model_dir)
    if not names or info.num_classes is None or len(names) != info.num_classes:
        return config
    return dataclasses.replace(config, class_names=tuple(names))


def generation_request(config: GenerateConfig, model: ModelInfo, sample_filter: FilterInfo | None = None
                       ) -> dict[str, Any]:
    """Everything that fixes the output bytes. Not in it: out, model_dir (a pulled model may land
    anywhere; its sha256 identifies it), workers and overwrite. batch_size and use_gpu are in it
    because float rounding can differ with the batch shape and the device. A filter is in it by its
    classifier's sha256 and confidence (only when set: unfiltered requests are what they always were)."""
    request = {
        "model": model_request(config, model),
        "num_samples": config.num_samples,
        "per_class": config.per_class,
        "seed": config.seed,
        "temperature": config.temperature,
        "batch_size": config.batch_size,
        "block_size": config.block_size,
        "use_gpu": config.use_gpu,
        "class_names": list(config.class_names) if config.class_names is not None else None,
    }
    if config.pixel_temperature != 1.0:  # only when set: plain-mean requests are what they always were
        request["pixel_temperature"] = config.pixel_temperature
    if sample_filter is not None:
        request["filter"] = {"classifier_sha256": sample_filter.sha256, "confidence": sample_filter.confidence}
    return request


def plan_blocks(config: GenerateConfig, num_classes: int | None) -> list[dict[str, Any]]:
    """The request as blocks: block i holds samples start..start+count-1, their labels (None for an
    unconditional model) and its seed. per_class goes class by class, so most files hold one class."""
    if config.per_class is not None:
        total = config.per_class * num_classes
        labels = np.repeat(np.arange(num_classes), config.per_class)
    else:
        total = config.num_samples
        labels = None
        if num_classes is not None:
            rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(LABELS_STREAM,)))
            labels = rng.integers(0, num_classes, size=total)
    blocks = []
    for index, start in enumerate(range(0, total, config.block_size)):
        count = min(config.block_size, total - start)
        blocks.append({
            "index": index,
            "seed": block_seed(config.seed, index),
            "start": start,
            "count": count,
            "labels": None if labels is None else labels[start:start + count].tolist(),
        })
    return blocks


class GenerateBlock:
    """A block's compute (see batch_job.BlockFn): the model's own seeded sampler -> PNG -> files.

    `model.sample_with_latent` draws from the model's prior (a cvae's per-class one, every layer of
    a hierarchy) `batch_size` samples at a time from one CPU generator seeded per block, so a block's
    bytes depend on (seed, block, batch_size, temperature), not on the device; each row keeps its z.
    """

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, temperature: float, seed: int,
                 provenance: dict[str, str], class_names: list[str] | None, filter_classifier: str | None = None,
                 filter_confidence: float | None = None, pixel_temperature: float = 1.0):
        self.model = load_worker_model(model_dir, use_gpu)
        self.batch_size = batch_size
        self.temperature = temperature
        self.pixel_temperature = pixel_temperature
        self.seed = seed
        self.provenance = provenance
        self.class_names = class_names
        self.filter = None if filter_classifier is None else \
            SampleFilter(filter_classifier, filter_confidence, self.model.device, class_names)

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        import torch

        from pipelines.data.build import encode_png

        n = block["count"]
        generator = torch.Generator().manual_seed(block["seed"])
        labels = None if block["labels"] is None else torch.tensor(block["labels"], dtype=torch.long)
        if self.filter is None:
            z, pixels = self.sample(n, labels, generator)
        else:  # the driver allows a filter for conditional models only, so labels is set
            drawn = self.filter.draw(labels.numpy(), functools.partial(self.sample, generator=generator),
                                     self.batch_size)
            z, pixels = drawn.z, drawn.pixels
            for label in drawn.drawn:
                writer.tally("drawn", str(label), drawn.drawn[label])
                writer.tally("accepted", str(label), drawn.accepted[label])
        latents = z.float().cpu().numpy()
        label_of = np.full(n, UNLABELLED, np.int64) if labels is None else labels.numpy()
        sample_index = np.arange(block["start"], block["start"] + n, dtype=np.int64)
        ids = [f"{self.seed}-{s:08d}" for s in sample_index]

        counts = {}
        for label in np.unique(label_of).tolist():
            rows = np.flatnonzero(label_of == label)
            pngs = [encode_png(pixels[r]) for r in rows]
            for r, png in zip(rows, pngs):
                writer.write_bytes(f"images/{label_folder(label, self.class_names)}/{ids[r]}.png", png)
            latent = pa.FixedSizeListArray.from_arrays(latents[rows].reshape(-1), latents.shape[1]).cast(
                SCHEMA.field("latent").type)
            table = pa.table({
                "image": pa.array(pngs, pa.binary()),
                "latent": latent,
                "model_name": pa.array([self.provenance["name"]] * len(rows), pa.string()),
                "model_version": pa.array([self.provenance["version"]] * len(rows), pa.string()),
                "model_uri": pa.array([self.provenance["uri"]] * len(rows), pa.string()),
                "block_seed": pa.array(np.full(len(rows), block["seed"], np.int64)),
                "sample_index": pa.array(sample_index[rows]),
                "id": pa.array([ids[r] for r in rows], pa.string()),
                "class_name": pa.array([self.class_names[label] if self.class_names and label != UNLABELLED
                                        else None] * len(rows), pa.string()),
            }, schema=SCHEMA)
            writer.write_parquet(f"parquet/label={label}/block-{block['index']:06d}.parquet", table,
                                 **PARQUET_OPTIONS)
            counts[str(label)] = len(rows)
        return counts

    def sample(self, n: int, labels: Any, generator: Any) -> tuple[Any, np.ndarray]:
        """n samples (labels: n class ids, or None) -> (z, uint8 pixels (N, H, W, C)), `batch_size` at a time."""
        import torch

        latents, pixels = [], []
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                count = min(self.batch_size, n - i)
                chunk_labels = None if labels is None else labels[i:i + count]
                x, z = self.model.sample_with_latent(count, chunk_labels, generator, self.temperature)
                x = self.model.temper_pixels(x, self.pixel_temperature)
                pixels.append(to_uint8(x))
                latents.append(z.cpu())
        return torch.cat(latents), np.concatenate(pixels)


def _series_generation(config: GenerateConfig) -> dict[str, Any]:
    from pipelines.batch.generate_series import run_series_generation

    return run_series_generation(config)


# what a model trained on another modality generates with (its dataset.json's "modality"); images: below
MODALITY_GENERATORS = {"series": _series_generation}


def run_generation(config: GenerateConfig) -> dict[str, Any]:
    """Generate per `config` into `out` (resuming an interrupted run); returns where things are."""
    modality = model_modality(config.model_dir) if Path(config.model_dir).is_dir() else "image"
    if modality in MODALITY_GENERATORS:
        return MODALITY_GENERATORS[modality](config)
    if modality != "image":
        raise ConfigError(f"model_dir {config.model_dir} was trained on {modality!r} data, which generate does "
                          f"not know (known: image, {', '.join(MODALITY_GENERATORS)})")
    if config.plots_per_class:
        raise ConfigError("plots_per_class (--plots-per-class) applies to series models; image models write "
                          "every sample as a PNG already")
    loaded, model = load_saved_model(config.model_dir)
    config = with_model_class_names(config, model)
    check_request_fits(config, loaded, config.model_dir)
    sample_filter = None
    if config.filter_classifier is not None:
        sample_filter = inspect_filter(config.filter_classifier, config.filter_confidence, model.name,
                                       model.input_shape, model.num_classes, model_class_names(config.model_dir))
    out = resolve_out(config.out).resolve()
    request = generation_request(config, model, sample_filter)
    job = BatchJob(
        name="generate",
        out=out,
        request=request,
        blocks=plan_blocks(config, model.num_classes),
        block_fn=GenerateBlock,
        block_fn_kwargs={
            "model_dir": str(Path(config.model_dir).resolve()), "use_gpu": config.use_gpu,
            "batch_size": config.batch_size, "temperature": config.temperature, "seed": config.seed,
            "pixel_temperature": config.pixel_temperature,
            "provenance": request["model"],
            "class_names": list(config.class_names) if config.class_names is not None else None,
            **({"filter_classifier": sample_filter.classifier, "filter_confidence": sample_filter.confidence}
               if sample_filter is not None else {}),
        },
        owned_dirs=("parquet", "images"),
        workers=config.workers,
        use_gpu=config.use_gpu,
        metadata={"model_family": model.name, "image_shape": list(model.input_shape),
                  "num_classes": model.num_classes, "latent_dim": model.latent_dim,
                  "columns": [f.name for f in SCHEMA], "partitioning": "hive: label"},
        overwrite=config.overwrite,
        summarize=functools.partial(summarize, sample_filter) if sample_filter is not None else None,
    )
    result = run_batch_job(job)
    manifest = result.manifest
    return {
        "out": str(out),
        "total": manifest["total"],
        "per_class": manifest["counts"],
        "parquet": str(out / "parquet"),
        "images": str(out / "images"),
        "manifest": str(out / "manifest.json"),
        "skipped": result.skipped,
        "blocks_written": result.blocks_written,
        # accepted / drawn under --filter-classifier (per class in the manifest); None without a filter
        "acceptance_rate": manifest["filter"]["acceptance_rate"] if "filter" in manifest else None,
    }

