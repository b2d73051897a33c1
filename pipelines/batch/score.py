"""`vaepipe score`: a per-sample anomaly score (`model.anomaly_score`: -ELBO for variational models,
reconstruction error otherwise) for every image of a dataset split, flagged against a threshold
chosen on a reference dataset's validation split, as Parquet (`parquet/shard-NNNNNN.parquet`) on the
shared Ray Data skeleton (pipelines/batch/job.py). The threshold is the (1 - target_fpr) quantile of
the reference val scores, so about target_fpr of normal data is flagged. Not here: AUROC and other
detection quality metrics (pipelines/evaluation/metrics/anomaly.py, `vaepipe evaluate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.batch.job import BlockWriter, block_seed, run_batch_job
from pipelines.config import ConfigError
from pipelines.data.manifest import Manifest
from pipelines.evaluation.metrics.anomaly import anomaly_scores
from pipelines.batch.dataset import (DatasetJobConfig, shard_job, check_fits, open_dataset, open_model, output_name, read_shard,
                                     shard_blocks, shard_urls, summary)
from pipelines.batch.model import absolute, load_worker_model

THRESHOLD_SPLIT = "val"  # the threshold is set on held-out normal data, never on what it judges in training
SCHEMA = pa.schema([
    ("index", pa.int64()),  # the sample's position in the dataset's source (its shard key)
    ("label", pa.int64()),  # class id, -1 = unlabelled
    ("score", pa.float64()),  # model.anomaly_score: larger = more anomalous
    ("flagged", pa.bool_()),  # score > threshold (the manifest's "threshold")
])
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": ["index", "label", "score", "flagged"]}


@dataclass(frozen=True)
class ScoreConfig(DatasetJobConfig):
    target_fpr: float = 0.05  # share of normal (reference val) samples the threshold flags
    reference: str = ""  # dataset whose val split sets the threshold: normal data (the model's training set); "" = data
    seed: int = 0  # variational scores average sampled ELBOs: fixes the noise per block

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.target_fpr) and 0 < self.target_fpr < 1):
            raise ConfigError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


def score_split(model, manifest: Manifest, split: str, seed: int, batch_size: int) -> np.ndarray:
    """Every score of a split, block by block exactly as the job computes them, in block order."""
    urls = shard_urls(manifest, split)
    return np.concatenate([
        anomaly_scores(model, read_shard(urls[block["shard"]], block).images, block_seed(seed, block["index"]),
                     batch_size)
        for block in shard_blocks(manifest, split)])


class ScoreBlock:
    """A block's compute (see batch_job.BlockFn): one input shard -> scores and flags -> one Parquet file."""

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, shard_urls: dict[str, str], seed: int,
                 threshold: float):
        self.model = load_worker_model(model_dir, use_gpu)
        self.batch_size = batch_size
        self.shard_urls = shard_urls
        self.seed = seed
        self.threshold = threshold

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        samples = read_shard(self.shard_urls[block["shard"]], block)
        scores = anomaly_scores(self.model, samples.images, block_seed(self.seed, block["index"]), self.batch_size)
        flagged = scores > self.threshold
        table = pa.table({"index": pa.array(samples.indices), "label": pa.array(samples.labels),
                          "score": pa.array(scores), "flagged": pa.array(flagged)}, schema=SCHEMA)
        writer.write_parquet(f"parquet/{output_name(block['shard'], '.parquet')}", table, **PARQUET_OPTIONS)
        return {"flagged": int(flagged.sum()), "normal": int((~flagged).sum())}


def choose_threshold(model, reference: Manifest, config: ScoreConfig) -> dict[str, Any]:
    """The (1 - target_fpr) quantile of the reference val scores, with what it was computed from."""
    scores = score_split(model, reference, THRESHOLD_SPLIT, config.seed, config.batch_size)
    if not np.isfinite(scores).all():
        raise ConfigError(f"the model gives non-finite anomaly scores on {reference.location} ({THRESHOLD_SPLIT}): "
                          "no threshold can be chosen")
    threshold = float(np.quantile(scores, 1.0 - config.target_fpr))
    return {"value": threshold, "target_fpr": config.target_fpr, "reference": reference.location,
            "reference_split": THRESHOLD_SPLIT, "reference_samples": len(scores),
            "reference_flagged_fraction": float((scores > threshold).mean())}


def run_scoring(config: ScoreConfig) -> dict[str, Any]:
    """Score split `config.split` of `config.data` into `config.out` (resuming an interrupted run)."""
    manifest = open_dataset(absolute(config.data), config.split)
    model, info = open_model(config, manifest)
    reference = open_dataset(absolute(config.reference or config.data), THRESHOLD_SPLIT)
    check_fits(model, reference)
    # computed before the job (every rerun too: the reference val split is small) and kept in the manifest
    threshold = choose_threshold(model, reference, config)
    job = shard_job("score", config, manifest, info, ScoreBlock,
                    request={"reference": {"sha256": reference.sha256(), "split": THRESHOLD_SPLIT},
                             "target_fpr": config.target_fpr, "seed": config.seed,
                             # the sampled ELBO noise is drawn per batch
                             "batch_size": config.batch_size, "use_gpu": config.use_gpu},
                    block_fn_kwargs={"seed": config.seed, "threshold": threshold["value"]}, owned_dirs=("parquet",),
                    metadata={"threshold": threshold, "columns": [f.name for f in SCHEMA]})
    out = job.out
    result = run_batch_job(job)
    counts = result.manifest["counts"]
    return {**summary(out, result), "parquet": str(out / "parquet"),
            "threshold": result.manifest["threshold"]["value"],
            "flagged_fraction": counts.get("flagged", 0) / result.manifest["total"]}
