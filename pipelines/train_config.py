"""The training config: what `vaepipe train --config FILE` reads (YAML), validated once at the
edge. Sections mirror the YAML file; see configs/train-shapes.yaml for a complete example.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from pipelines.config import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class ModelSection:
    name: str = "vae"  # registry name (see `vaepipe models`)
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the family's config, e.g. latent_dim, beta


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-3  # Adam learning rate (every optimizer group)
    weight_decay: float = 0.0  # AdamW-style decoupled weight decay
    grad_clip: float | None = 10.0  # max global gradient norm per group (None = no clipping)


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 64  # per worker
    epochs: int = 5  # passes over the training split
    max_steps_per_epoch: int | None = None  # cap batches per epoch (quick runs); None = the whole split
    checkpoint_every: int = 100  # optimizer steps between checkpoints (also one at every epoch end)
    seed: int = 0  # model init, shuffling and sampling
    loader_workers: int = 0  # DataLoader processes per worker (0 = read in the training process)
    shuffle_buffer: int = 1000  # samples held for shuffling
    open_shards: int = 4  # shards each reader slot draws from at once (mixes classes across shards)


@dataclass(frozen=True)
class ScalingSection:
    workers: int = 1  # Ray Train workers (DDP ranks); 0 = train in this process without Ray
    use_gpu: bool = False  # one GPU per worker, NCCL and bf16 autocast
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    max_failures: int = 1  # worker failures to recover from (restarting from the latest checkpoint)


@dataclass(frozen=True)
class TrackingSection:
    tracking_uri: str | None = None  # MLflow URI; None = sqlite:///<storage>/mlflow.db
    experiment: str = "vaepipe"  # MLflow experiment name


@dataclass(frozen=True)
class TrainConfig:
    data: str  # dataset manifest (path or URL) or the folder holding it
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    storage: str = "runs"  # Ray Train storage (local folder or s3:// URI): checkpoints live here
    name: str | None = None  # run name under storage; None = generated from model and time

    def __post_init__(self) -> None:
        checks = [
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
            (self.train.max_steps_per_epoch is None or self.train.max_steps_per_epoch >= 1,
             "train.max_steps_per_epoch must be >= 1"),
            (self.train.loader_workers >= 0, "train.loader_workers must be >= 0"),
            (self.train.open_shards >= 1, "train.open_shards must be >= 1"),
            (self.scaling.workers >= 0, "scaling.workers must be >= 0 (0 = in this process, without Ray)"),
            (self.scaling.max_failures >= -1, "scaling.max_failures must be >= -1 (-1 = unlimited)"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.grad_clip is None or self.optim.grad_clip > 0, "optim.grad_clip must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):  # e.g. the cluster's server (infra/kuberay: vaepipe-env)
            return os.environ["MLFLOW_TRACKING_URI"]
        if "://" in self.storage:
            raise ConfigError("tracking.tracking_uri is required when storage is a URI")
        from pathlib import Path

        return f"sqlite:///{Path(self.storage).resolve() / 'mlflow.db'}"

    def with_model_params(self, **params: Any) -> "TrainConfig":
        return replace(self, model=replace(self.model, params={**self.model.params, **params}))


def validate_model_params(config: TrainConfig, input_shape: tuple[int, int, int], num_classes: int | None) -> None:
    """Build the model once on the driver so bad model params fail before any worker starts."""
    import vaemodels

    try:
        vaemodels.build(config.model.name, input_shape, num_classes, **config.model.params)
    except vaemodels.ConfigError as exc:
        raise ConfigError(f"model: {exc}") from exc
