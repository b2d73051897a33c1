"""What the batch jobs that read a dataset (embed, score, denoise, interpolate) share on top of the
Ray Data skeleton (pipelines/batch/job.py) and its model side (pipelines/batch/model.py): their common
config, one block per input shard, reading a shard exactly (sha256 and sample count checked against
the manifest), and the checks that a model and a dataset fit together, done once on the driver.
Not here: what a job computes or which columns it writes (each job's own module).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.config import ConfigError, from_dict
from pipelines.batch.job import BatchJob
from pipelines.batch.model import UNLABELLED, load_saved_model, model_request
from pipelines.data.manifest import Manifest, read_manifest



@dataclass(frozen=True)
class DatasetJobConfig:
    model_dir: str  # a saved model folder (vaemodels.save_model: config.json + model.safetensors)
    data: str  # the dataset: manifest.json or its folder (local path or fsspec URL)
    split: str  # which split of the dataset to process ("train" or "val")
    out: str  # output folder
    model_uri: str = ""  # where the model came from (e.g. models:/NAME@ALIAS), kept in the request; "" = model_dir
    model_name: str = ""  # registered model name (provenance)
    model_version: str = ""  # registered model version (provenance)
    batch_size: int = 256  # images through the model at once on a worker
    workers: int = 2  # Ray Data actor pool size (one model copy each)
    use_gpu: bool = False  # one GPU per worker
    overwrite: bool = False  # replace another request's data in out (a finished same request is a no-op)

    def __post_init__(self) -> None:
        for ok, message in [
            (bool(self.model_dir), "model_dir must name a saved model folder"),
            (bool(self.data), "data must name a dataset manifest or its folder"),
            (bool(self.split), "split must name a split of the dataset (train or val)"),
            (bool(self.out), "out must name a folder"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
        ]:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def open_dataset(location: str, split: str) -> Manifest:
    """The manifest, once the split is known to exist and hold samples (ManifestError/ConfigError otherwise)."""
    manifest = read_manifest(location)
    if manifest.num_samples(split) == 0:  # raises ManifestError naming the splits there are
        raise ConfigError(f"split {split!r} of {manifest.location} holds no samples")
    return manifest


def open_model(config: DatasetJobConfig, manifest: Manifest):
    """Load the model on the driver and check it fits the dataset; returns (model, ModelInfo)."""
    model, info = load_saved_model(config.model_dir)
    check_fits(model, manifest)
    return model, info


def check_fits(model, manifest: Manifest) -> None:
    if manifest.modality != "image" or model.modality != "image":
        raise ConfigError(f"embed, score, denoise and interpolate read image datasets with image models; "
                          f"{manifest.location} is a {manifest.modality} dataset and {model.name!r} reads "
                          f"{model.modality}s")
    if tuple(model.input_shape) != tuple(manifest.image_shape):
        raise ConfigError(f"the {model.name!r} model takes images of shape {tuple(model.input_shape)} but the "
                          f"dataset {manifest.location} holds {tuple(manifest.image_shape)}")
    if model.is_conditional and manifest.num_classes and manifest.num_classes != model.num_classes:
        raise ConfigError(f"the {model.name!r} model has {model.num_classes} classes but the dataset "
                          f"{manifest.location} has {manifest.num_classes}")


def check_unlabelled(model, manifest: Manifest, what: str,
                     call: Callable[[Any, torch.Tensor, torch.Tensor], Any]) -> None:
    """A conditional model on a dataset without classes gets label -1: some families guess the class
    (ssvae), others cannot (cvae). Try the job's own `call` on one blank image now, so the problem
    is one clear error here instead of a failure in every worker."""
    if not model.is_conditional or manifest.num_classes:
        return
    try:
        with torch.no_grad():
            call(model, torch.zeros(1, *model.input_shape), torch.full((1,), UNLABELLED))
    except ValueError as exc:
        raise ConfigError(f"the {model.name!r} model is conditional and the dataset {manifest.location} has no "
                          f"class labels, so it cannot {what}: {exc}") from None


def shard_blocks(manifest: Manifest, split: str) -> list[dict[str, Any]]:
    """One block per input shard: its files follow the shard, and rows keep the shard's order."""
    return [{"index": i, "shard": s.name, "num_samples": s.num_samples, "sha256": s.sha256}
            for i, s in enumerate(manifest.shards(split))]


def shard_urls(manifest: Manifest, split: str) -> dict[str, str]:
    """Block shard name -> URL; handed to workers apart from the blocks, so a moved dataset keeps its blocks."""
    return {s.name: s.url for s in manifest.shards(split)}


def output_name(shard: str, suffix: str) -> str:
    """'train/shard-000003.tar' -> 'shard-000003' + suffix: an output file is named after its input."""
    return Path(shard).name.removesuffix(".tar") + suffix


@dataclass(frozen=True)
class ShardSamples:
    images: torch.Tensor  # N x C x H x W floats in [0, 1]
    labels: np.ndarray  # int64 class ids, -1 = unlabelled
    indices: np.ndarray  # int64 positions in the source (the shard keys): unique across splits


def read_shard(url: str, block: dict[str, Any]) -> ShardSamples:
    """Every sample of one shard, in order, or an error: a batch job writes exact row counts, so a
    shard that changed since the manifest was written, or lost samples, stops the job."""
    import fsspec
    import webdataset as wds

    from pipelines.data.reader import DataReadError, decode_png

    with fsspec.open(url, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != block["sha256"]:
        raise DataReadError(f"shard {url} does not match its sha256 in the dataset manifest (changed since the "
                            "build?); check it with `vaepipe data verify`")
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    samples = list(wds.tariterators.group_by_keys(files))
    if len(samples) != block["num_samples"]:
        raise DataReadError(f"shard {url} holds {len(samples)} samples, its manifest says {block['num_samples']}")
    return ShardSamples(torch.stack([decode_png(s["png"]) for s in samples]),
                        np.array([int(s["cls"]) for s in samples], dtype=np.int64),
                        np.array([int(s["__key__"]) for s in samples], dtype=np.int64))


def shard_job(name: str, config: DatasetJobConfig, manifest: Manifest, info, block_fn: type,
              request: dict[str, Any], block_fn_kwargs: dict[str, Any], owned_dirs: tuple[str, ...],
              metadata: dict[str, Any]) -> BatchJob:
    """The BatchJob of a job over `config.split`, one block per input shard: the request starts with the
    model and the data, every block function gets the model folder, device, batch size and shard URLs,
    and the manifest's metadata names the model family, image shape, data and split."""
    return BatchJob(
        name=name,
        out=Path(config.out).resolve(),
        request={"model": model_request(config, info), "data": {"sha256": manifest.sha256(), "split": config.split},
                 **request},
        blocks=shard_blocks(manifest, config.split),
        block_fn=block_fn,
        block_fn_kwargs={"model_dir": str(Path(config.model_dir).resolve()), "use_gpu": config.use_gpu,
                         "batch_size": config.batch_size, "shard_urls": shard_urls(manifest, config.split),
                         **block_fn_kwargs},
        owned_dirs=owned_dirs,
        workers=config.workers,
        use_gpu=config.use_gpu,
        metadata={"model_family": info.name, "image_shape": list(info.input_shape), "data": manifest.location,
                  "split": config.split, **metadata},
        overwrite=config.overwrite,
    )


def summary(out: Path, result) -> dict[str, Any]:
    """The JSON line every dataset job prints (each job adds its own keys)."""
    manifest = result.manifest
    return {"out": str(out), "total": manifest["total"], "counts": manifest["counts"],
            "manifest": str(out / "manifest.json"), "skipped": result.skipped,
            "blocks_written": result.blocks_written}
