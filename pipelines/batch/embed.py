"""`vaepipe embed`: every image of a dataset split -> its deterministic latent code (`model.embed`:
the posterior mean for variational models), as Parquet (`parquet/shard-NNNNNN.parquet`, one file
per input shard, rows in shard order) on the shared Ray Data skeleton (pipelines/batch/job.py).
For nearest-neighbour search, clustering or a downstream classifier. Not here: resolving registry
URIs to a model folder (the CLI pulls first).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from pipelines.batch.job import BlockWriter, run_batch_job
from pipelines.batch.dataset import (DatasetJobConfig, shard_job, check_unlabelled, open_dataset, open_model,
                                     output_name, read_shard, summary)
from pipelines.batch.model import absolute, load_worker_model, model_request

SCHEMA = pa.schema([
    ("index", pa.int64()),  # the sample's position in the dataset's source (its shard key)
    ("label", pa.int64()),  # class id, -1 = unlabelled
    ("latent", pa.list_(pa.float32())),  # model.embed(image[, label]): latent_dim floats
    ("model_uri", pa.string()),
])
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": ["index", "label"]}


@dataclass(frozen=True)
class EmbedConfig(DatasetJobConfig):
    """Only the common fields (see DatasetJobConfig): the code of an image has no knobs."""


def codes(model, images: torch.Tensor, labels) -> torch.Tensor:
    """The deterministic code; conditional models (cvae) encode the image together with its class."""
    return model.embed(images, model.condition_on(labels))


class EmbedBlock:
    """A block's compute (see batch_job.BlockFn): one input shard -> its codes -> one Parquet file."""

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, shard_urls: dict[str, str], model_uri: str):
        self.model = load_worker_model(model_dir, use_gpu)
        self.batch_size = batch_size
        self.shard_urls = shard_urls
        self.model_uri = model_uri

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        samples = read_shard(self.shard_urls[block["shard"]], block)
        n, step = len(samples.indices), self.batch_size
        with torch.inference_mode():
            latents = torch.cat([
                codes(self.model, samples.images[i:i + step].to(self.model.device), samples.labels[i:i + step]).cpu()
                for i in range(0, n, step)]).float().numpy()
        table = pa.table({
            "index": pa.array(samples.indices),
            "label": pa.array(samples.labels),
            "latent": pa.FixedSizeListArray.from_arrays(latents.reshape(-1), latents.shape[1]).cast(
                SCHEMA.field("latent").type),
            "model_uri": pa.array([self.model_uri] * n, pa.string()),
        }, schema=SCHEMA)
        writer.write_parquet(f"parquet/{output_name(block['shard'], '.parquet')}", table, **PARQUET_OPTIONS)
        return {str(label): count for label, count in sorted(Counter(samples.labels.tolist()).items())}


def run_embedding(config: EmbedConfig) -> dict[str, Any]:
    """Embed split `config.split` of `config.data` into `config.out` (resuming an interrupted run)."""
    manifest = open_dataset(absolute(config.data), config.split)
    model, info = open_model(config, manifest)
    check_unlabelled(model, manifest, "embed its images", codes)
    job = shard_job("embed", config, manifest, info, EmbedBlock,
                    # float rounding can differ with the batch shape and the device
                    request={"batch_size": config.batch_size, "use_gpu": config.use_gpu},
                    block_fn_kwargs={"model_uri": model_request(config, info)["uri"]}, owned_dirs=("parquet",),
                    metadata={"latent_dim": info.latent_dim, "columns": [f.name for f in SCHEMA]})
    out = job.out
    result = run_batch_job(job)
    return {**summary(out, result), "parquet": str(out / "parquet"), "latent_dim": info.latent_dim}
