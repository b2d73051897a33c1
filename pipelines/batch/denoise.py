"""`vaepipe denoise`: corrupt every image of a dataset split with seeded noise (or take it as it is,
for data that is noisy already), pass it through `model.reconstruct` (a `dae` is made for this; any
model works) and write the noisy and the denoised image as Parquet (`parquet/shard-NNNNNN.parquet`)
plus the denoised PNGs (`images/<label>/<index>.png`), on the shared Ray Data skeleton
(pipelines/batch/job.py). Not here: measuring how good the denoising is (compare with the dataset).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from pipelines.batch.job import BlockWriter, block_seed, run_batch_job
from pipelines.config import ConfigError
from pipelines.batch.dataset import (DatasetJobConfig, shard_job, check_unlabelled, open_dataset, open_model,
                                     output_name, read_shard, summary)
from pipelines.batch.model import absolute, label_folder, load_worker_model, to_uint8
from vaemodels.dae import CORRUPTIONS, DAEConfig

NOISES = (*CORRUPTIONS, "none")  # "none": the dataset is noisy already; denoise it as it is
SCHEMA = pa.schema([
    ("index", pa.int64()),  # the sample's position in the dataset's source (its shard key)
    ("label", pa.int64()),  # class id, -1 = unlabelled
    ("noisy", pa.binary()),  # PNG bytes: the image the model was given
    ("denoised", pa.binary()),  # PNG bytes: model.reconstruct(noisy); also images/<label>/<index>.png
])
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": ["index", "label"]}


@dataclass(frozen=True)
class DenoiseConfig(DatasetJobConfig):
    noise: str = "masking"  # gaussian | masking | salt_and_pepper (as a dae trains) | none (already noisy)
    noise_level: float | None = None  # std (gaussian) or share of pixels hit; None = the dae's default for the kind
    seed: int = 0  # fixes the noise: same request -> byte-identical files

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise not in NOISES:
            raise ConfigError(f"noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        if self.noise == "none" and self.noise_level is not None:
            raise ConfigError("noise_level has no meaning with noise none (the images are taken as they are)")
        level = self.level
        if self.noise == "gaussian" and not (math.isfinite(level) and level >= 0):
            raise ConfigError(f"noise_level (the gaussian std) must be >= 0, got {level}")
        if self.noise in ("masking", "salt_and_pepper") and not 0 <= level < 1:
            raise ConfigError(f"noise_level (the share of pixels hit by {self.noise}) must be in [0, 1), got {level}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")

    @property
    def level(self) -> float:
        """noise_level, or the dae's own default for the kind (Vincent et al. 2010's ranges)."""
        if self.noise_level is not None:
            return self.noise_level
        if self.noise == "none":
            return 0.0
        return DAEConfig().noise_std if self.noise == "gaussian" else DAEConfig().corruption_fraction


# Copied from vaemodels.dae.DAE.corrupt (kind and level as arguments, noise always drawn on the CPU)
def corrupt(x: torch.Tensor, noise: str, level: float, generator: torch.Generator) -> torch.Tensor:
    """x corrupted by `noise` at `level` (same generator seed -> same corruption), still in [0, 1]."""
    if noise == "gaussian":
        # clipped so a corrupted image is still a valid image (and a valid BCE input)
        return (x + level * torch.randn(x.shape, generator=generator, dtype=x.dtype)).clamp(0.0, 1.0)
    hit = torch.rand(x.shape, generator=generator, dtype=x.dtype) < level
    if noise == "masking":
        return x.masked_fill(hit, 0.0)
    # salt and pepper: each hit pixel goes to 0 or 1 with equal probability
    salt = (torch.rand(x.shape, generator=generator, dtype=x.dtype) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def denoise_images(model, images: torch.Tensor, labels) -> torch.Tensor:
    return model.reconstruct(images, model.condition_on(labels))


class DenoiseBlock:
    """A block's compute (see batch_job.BlockFn): one input shard -> seeded noise -> reconstruct ->
    one Parquet file and a PNG per sample."""

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, shard_urls: dict[str, str], noise: str,
                 level: float, seed: int):
        self.model = load_worker_model(model_dir, use_gpu)
        self.batch_size = batch_size
        self.shard_urls = shard_urls
        self.noise, self.level, self.seed = noise, level, seed

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        from pipelines.data.build import encode_png

        samples = read_shard(self.shard_urls[block["shard"]], block)
        noisy = samples.images
        if self.noise != "none":
            # the whole block's noise at once on the CPU: it does not depend on batch_size or device
            generator = torch.Generator().manual_seed(block_seed(self.seed, block["index"]))
            noisy = corrupt(noisy, self.noise, self.level, generator)
        # the model sees the noisy image as stored (8-bit), so the Parquet row reproduces its output
        noisy_pixels = to_uint8(noisy)
        noisy = torch.from_numpy(noisy_pixels).permute(0, 3, 1, 2).float().div_(255.0)
        n, step = len(samples.indices), self.batch_size
        with torch.inference_mode():
            denoised = torch.cat([
                denoise_images(self.model, noisy[i:i + step].to(self.model.device), samples.labels[i:i + step]).cpu()
                for i in range(0, n, step)])
        denoised_pixels = to_uint8(denoised)
        noisy_pngs = [encode_png(p) for p in noisy_pixels]
        denoised_pngs = [encode_png(p) for p in denoised_pixels]
        for index, label, png in zip(samples.indices.tolist(), samples.labels.tolist(), denoised_pngs):
            writer.write_bytes(f"images/{label_folder(label)}/{index:08d}.png", png)
        table = pa.table({"index": pa.array(samples.indices), "label": pa.array(samples.labels),
                          "noisy": pa.array(noisy_pngs, pa.binary()),
                          "denoised": pa.array(denoised_pngs, pa.binary())}, schema=SCHEMA)
        writer.write_parquet(f"parquet/{output_name(block['shard'], '.parquet')}", table, **PARQUET_OPTIONS)
        return {str(label): count for label, count in sorted(Counter(samples.labels.tolist()).items())}


def run_denoising(config: DenoiseConfig) -> dict[str, Any]:
    """Denoise split `config.split` of `config.data` into `config.out` (resuming an interrupted run)."""
    manifest = open_dataset(absolute(config.data), config.split)
    model, info = open_model(config, manifest)
    check_unlabelled(model, manifest, "reconstruct its images", denoise_images)
    job = shard_job("denoise", config, manifest, info, DenoiseBlock,
                    request={"noise": config.noise, "noise_level": config.level, "seed": config.seed,
                             # float rounding can differ with the batch shape and the device
                             "batch_size": config.batch_size, "use_gpu": config.use_gpu},
                    block_fn_kwargs={"noise": config.noise, "level": config.level, "seed": config.seed},
                    owned_dirs=("parquet", "images"), metadata={"columns": [f.name for f in SCHEMA]})
    out = job.out
    result = run_batch_job(job)
    return {**summary(out, result), "parquet": str(out / "parquet"), "images": str(out / "images")}
