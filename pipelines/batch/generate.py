"""`vaepipe generate`: a saved model -> synthetic augmentation data, as hive-partitioned Parquet
(`parquet/label=K/block-NNNNNN.parquet`: PNG bytes, latent z, provenance) plus the images as one PNG
file per sample (`images/<class>/<id>.png`), one WebDataset tar per block (`images/shard-NNNNNN.tar`)
or not at all (`image_format`), on the shared Ray Data skeleton (pipelines/batch/job.py).
The request is cut into seeded blocks, so the same request gives byte-identical files and an
interrupted run resumes where it stopped. Not here: resolving registry URIs to a model folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.batch.job import BatchJob, BatchResult, BlockWriter, block_seed, run_batch_job
from pipelines.batch.model import (UNLABELLED, ModelInfo, label_folder, load_saved_model, load_worker_model,
                                   model_class_names, model_request, to_uint8)
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
# model modality -> its block function ("module:Class", with `owned_dirs` and `plan(config, info, model,
# request) -> (request, block kwargs, manifest metadata)`; optionally `result_keys(plan)`); images:
# GenerateBlock below
BLOCK_FNS = {"table": "pipelines.batch.table_generate:TableGenerateBlock",
             "series": "pipelines.batch.generate_series:SeriesGenerateBlock"}


DATE_PLACEHOLDER = "{date}"
SEED_BITS = 31  # date-derived seeds fit any int32 / numpy seed consumer


def resolve_out(out: str, today: datetime.date | None = None) -> Path:
    return Path(out.replace(DATE_PLACEHOLDER, (today or datetime.date.today()).isoformat()))


def date_seed(config: GenerateConfig, day: str) -> int:
    """The seed of a scheduled run without an explicit seed: sha256 of the JSON of the day and the request's
    identifying fields (model uri, counts, the out template), first 4 bytes big-endian, reduced to 31 bits.
    Another day gives other samples; the same day (a rerun, a resume) gives the same request again."""
    identity = {"date": day, "model_uri": config.model_uri or str(Path(config.model_dir).resolve()),
                "num_samples": config.num_samples, "per_class": config.per_class, "out": config.out}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:4], "big") & ((1 << SEED_BITS) - 1)


def resolve_schedule(config: GenerateConfig, today: datetime.date | None = None
                     ) -> tuple[GenerateConfig, dict[str, Any]]:
    """(config with `{date}` replaced and the seed set, what the manifest records about it). The seed is the
    given one, else date_seed when out holds {date}, else 0 (what unscheduled requests always used)."""
    if DATE_PLACEHOLDER not in config.out:
        source = "given" if config.seed is not None else "default"
        seed = config.seed if config.seed is not None else 0
        return dataclasses.replace(config, seed=seed), {"date": None, "seed": seed, "seed_source": source}
    day = config.date or (today or datetime.date.today()).isoformat()
    source = "given" if config.seed is not None else "date"
    seed = config.seed if config.seed is not None else date_seed(config, day)
    resolved = dataclasses.replace(config, out=config.out.replace(DATE_PLACEHOLDER, day), seed=seed, date=None)
    return resolved, {"date": day, "seed": seed, "seed_source": source}


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


def generation_request(config: GenerateConfig, model: ModelInfo, sample_filter: FilterInfo | None = None,
                       latent_prior: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that fixes the output bytes. Not in it: out, model_dir (a pulled model may land
    anywhere; its sha256 identifies it), workers and overwrite. batch_size and use_gpu are in it
    because float rounding can differ with the batch shape and the device. A filter is in it by its
    classifier's sha256 and confidence (only when set: unfiltered requests are what they always were)."""
    if config.seed is None:
        config, _ = resolve_schedule(config)
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
    if config.image_format != "png":  # likewise: PNG-file requests are what they always were
        request["image_format"] = config.image_format
    if sample_filter is not None:
        request["filter"] = {"classifier_sha256": sample_filter.sha256, "confidence": sample_filter.confidence}
    if latent_prior is not None:  # likewise: the mixture's fit, by its sha256 (pipelines/batch/latent_prior.py)
        request["latent_prior"] = latent_prior
    return request


def plan_blocks(config: GenerateConfig, num_classes: int | None) -> list[dict[str, Any]]:
    """The request as blocks: block i holds samples start..start+count-1, their labels (None for an
    unconditional model) and its seed. per_class goes class by class, so most files hold one class."""
    if config.seed is None:  # never SeedSequence(None), which is fresh OS entropy: the seed the run would use
        config, _ = resolve_schedule(config)
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
    With a fitted `latent_prior` (pipelines/batch/latent_prior.py) the codes come from that mixture
    instead, on the same generator, and the model decodes them.
    """

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, temperature: float, seed: int,
                 provenance: dict[str, str], class_names: list[str] | None, filter_classifier: str | None = None,
                 filter_confidence: float | None = None, pixel_temperature: float = 1.0,
                 image_format: str = "png", latent_prior: dict[str, Any] | None = None):
        self.model = load_worker_model(model_dir, use_gpu)
        self.latent_prior = None
        if latent_prior is not None:
            from vaemodels.mixture_prior import MixturePrior

            self.latent_prior = MixturePrior.from_dict(latent_prior)
        self.batch_size = batch_size
        self.temperature = temperature
        self.pixel_temperature = pixel_temperature
        self.image_format = image_format
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
        all_pngs: list[bytes | None] = [None] * n
        for label in np.unique(label_of).tolist():
            rows = np.flatnonzero(label_of == label)
            pngs = [encode_png(pixels[r]) for r in rows]
            for r, png in zip(rows, pngs):
                all_pngs[r] = png
                if self.image_format == "png":
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
        if self.image_format == "shards":
            writer.write_bytes(f"images/shard-{block['index']:06d}.tar",
                               self.shard(ids, all_pngs, label_of, sample_index), rows=n)
        return counts

    def shard(self, ids: list[str], pngs: list[bytes], labels: np.ndarray, sample_index: np.ndarray) -> bytes:
        """The block as one WebDataset tar, samples in sample order: ID.png, ID.cls (the label; -1 for an
        unconditional model) and ID.json (id, class_name, sample_index). mtime=0: same block, same bytes."""
        import io

        import webdataset as wds

        buffer = io.BytesIO()
        with wds.TarWriter(buffer, mtime=0) as sink:
            for i, key in enumerate(ids):
                label = int(labels[i])
                class_name = self.class_names[label] if self.class_names and label != UNLABELLED else None
                sink.write({"__key__": key, "png": pngs[i], "cls": label,
                            "json": {"id": key, "class_name": class_name, "sample_index": int(sample_index[i])}})
        return buffer.getvalue()

    def sample(self, n: int, labels: Any, generator: Any) -> tuple[Any, np.ndarray]:
        """n samples (labels: n class ids, or None) -> (z, uint8 pixels (N, H, W, C)), `batch_size` at a time."""
        import torch

        latents, pixels = [], []
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                count = min(self.batch_size, n - i)
                chunk_labels = None if labels is None else labels[i:i + count]
                if self.latent_prior is None:
                    x, z = self.model.sample_with_latent(count, chunk_labels, generator, self.temperature)
                else:  # codes from the fitted mixture (on the CPU generator), decoded by the model
                    z = self.latent_prior.sample(count, chunk_labels, generator, self.temperature).to(self.model.device)
                    x = self.model.decode(z, self.model.condition_on(chunk_labels))
                x = self.model.temper_pixels(x, self.pixel_temperature)
                pixels.append(to_uint8(x))
                latents.append(z.cpu())
        return torch.cat(latents), np.concatenate(pixels)


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """A checked request, before anything is written: the resolved config (out without {date}, the seed
    set, class names from the model), the model it samples and the batch job that writes it."""

    config: GenerateConfig
    model: ModelInfo
    schedule: dict[str, Any]  # {"date", "seed", "seed_source": given | date | default}, kept in the manifest
    job: BatchJob


def plan_generation(config: GenerateConfig, today: datetime.date | None = None) -> GenerationPlan:
    """Resolve and check `config` against its model; ConfigError names any problem. Writes nothing."""
    config, schedule = resolve_schedule(config, today)
    loaded, model = load_saved_model(config.model_dir)
    config = with_model_class_names(config, model)
    check_request_fits(config, loaded, config.model_dir)
    block_fn, owned_dirs, metadata = GenerateBlock, ("parquet", "images"), {
        "image_shape": list(model.input_shape), "columns": [f.name for f in SCHEMA]}
    if loaded.modality in BLOCK_FNS:
        module, _, name = BLOCK_FNS[loaded.modality].partition(":")
        block_fn = getattr(importlib.import_module(module), name)
        owned_dirs = block_fn.owned_dirs
        if config.image_format != "png":
            raise ConfigError(f"image_format={config.image_format!r} is for image models; the {model.name!r} model "
                              f"in {config.model_dir} makes {loaded.modality} data (Parquet only)")
        if config.filter_classifier is not None and not getattr(block_fn, "takes_filter", True):
            raise ConfigError(f"filter_classifier (--filter-classifier) takes an image reference classifier; it "
                              f"does not apply to {loaded.modality} models")
    if config.plots_per_class and "plots" not in owned_dirs:
        raise ConfigError(f"plots_per_class (--plots-per-class) applies to series models; the {model.name!r} "
                          f"model in {config.model_dir} makes {loaded.modality} data")
    sample_filter = None
    if config.filter_classifier is not None:
        sample_filter = inspect_filter(config.filter_classifier, config.filter_confidence, model.name,
                                       model.input_shape, model.num_classes, model_class_names(config.model_dir))
    prior, prior_entry = None, None
    if config.latent_prior == "mixture":
        if block_fn is not GenerateBlock:
            raise ConfigError(f"latent_prior=mixture is for image models; the {model.name!r} model in "
                              f"{config.model_dir} makes {loaded.modality} data")
        from pipelines.batch.latent_prior import fit_latent_prior

        prior, prior_entry = fit_latent_prior(loaded, config.prior_data, config.prior_components,
                                              config.prior_images, config.seed)
    out = Path(config.out).resolve()
    request = generation_request(config, model, sample_filter, prior_entry)
    extra_kwargs: dict[str, Any] = {}
    if block_fn is not GenerateBlock:
        request, extra_kwargs, metadata = block_fn.plan(config, model, loaded, request)
    job = BatchJob(
        name="generate",
        out=out,
        request=request,
        blocks=plan_blocks(config, model.num_classes),
        block_fn=block_fn,
        block_fn_kwargs={
            "model_dir": str(Path(config.model_dir).resolve()), "use_gpu": config.use_gpu,
            "batch_size": config.batch_size, "temperature": config.temperature, "seed": config.seed,
            "pixel_temperature": config.pixel_temperature, "image_format": config.image_format,
            "provenance": request["model"],
            "class_names": list(config.class_names) if config.class_names is not None else None,
            **({"filter_classifier": sample_filter.classifier, "filter_confidence": sample_filter.confidence}
               if sample_filter is not None else {}),
            **({"latent_prior": prior.to_dict()} if prior is not None else {}),
            **extra_kwargs,
        },
        owned_dirs=owned_dirs,
        workers=config.workers,
        use_gpu=config.use_gpu,
        metadata={"model_family": model.name, **metadata,
                  "num_classes": model.num_classes, "latent_dim": model.latent_dim,
                  "partitioning": "hive: label", "schedule": schedule,
                  **({"image_format": config.image_format} if "images" in owned_dirs else {})},
        overwrite=config.overwrite,
        summarize=functools.partial(summarize, sample_filter) if sample_filter is not None else None,
    )
    return GenerationPlan(config, model, schedule, job)


def run_plan(plan: GenerationPlan, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the plan's data; `lineage` (the MLflow run that records it) goes into the manifest."""
    job = plan.job if lineage is None else dataclasses.replace(plan.job, metadata={**plan.job.metadata,
                                                                                    "lineage": lineage})
    return generation_result(plan, run_batch_job(job))


def generation_result(plan: GenerationPlan, result: BatchResult) -> dict[str, Any]:
    out, manifest = plan.job.out, result.manifest
    return {
        "out": str(out),
        "total": manifest["total"],
        "per_class": manifest["counts"],
        "parquet": str(out / "parquet"),
        # None: tables write no images, nor does --image-format none
        "images": str(out / "images") if "images" in plan.job.owned_dirs and plan.config.image_format != "none"
        else None,
        "image_format": plan.config.image_format if "images" in plan.job.owned_dirs else None,
        "manifest": str(out / "manifest.json"),
        "skipped": result.skipped,
        "blocks_written": result.blocks_written,
        # accepted / drawn under --filter-classifier (per class in the manifest); None without a filter
        "acceptance_rate": manifest["filter"]["acceptance_rate"] if "filter" in manifest else None,
        "seed": manifest["request"]["seed"],
        "date": (manifest.get("schedule") or {}).get("date"),
        # the MLflow run that recorded this dataset (a skipped rerun: the first run's); None when untracked
        "lineage_run_id": (manifest.get("lineage") or {}).get("run_id"),
        **(plan.job.block_fn.result_keys(plan) if hasattr(plan.job.block_fn, "result_keys") else {}),
    }


def run_generation(config: GenerateConfig) -> dict[str, Any]:
    """Generate per `config` into `out` (resuming an interrupted run); returns where things are.
    No MLflow here: pipelines.workflows.generate_with_lineage records the run around it."""
    return run_plan(plan_generation(config))
