"""The training config: what `vaepipe train --config FILE` reads (YAML), validated once at the
edge. Sections mirror the YAML file; see configs/train-shapes.yaml for a complete example.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from pipelines.config import config_error, from_dict, to_dict


@dataclass(frozen=True)
class ModelSection:
    name: str = "vae"  # registry name (see `vaepipe models`)
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the family's config, e.g. latent_dim, beta


SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-3  # peak Adam learning rate (every optimizer group)
    weight_decay: float = 0.0  # AdamW-style decoupled weight decay
    # max global gradient norm per group (None = no clipping). Norms of pixel-summed losses are in
    # the hundreds early on, so 10 clips most early steps; raising it to 1000 measured worse
    # (MLP vae, mnist5k, 10 epochs: val IWAE -187 against -173 nats), so it stays
    grad_clip: float | None = 10.0
    # "cosine": linear warm-up over warmup_fraction of the run's steps, then cosine decay to
    # min_lr_ratio x lr at the last step (Loshchilov & Hutter 2017); "constant": lr throughout.
    # Constant is the default because it measured better on short CPU budgets: an MLP vae on
    # mnist5k, 10 epochs of batch 128, reached val IWAE -149 nats constant against -173 cosine
    schedule: str = "constant"
    warmup_fraction: float = 0.05  # share of all planned steps (epochs x batches) spent warming up
    min_lr_ratio: float = 0.05  # the cosine ends at this fraction of lr

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for optimizer step `step` (0-based) of a run planned for `total_steps`.

        A pure function of the step, so a resumed run continues the same curve with no saved state.
        """
        if self.schedule == "constant":
            return self.lr
        warmup = max(1, round(self.warmup_fraction * total_steps)) if self.warmup_fraction > 0 else 0
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 64  # per worker
    epochs: int = 5  # passes over the training split
    max_steps_per_epoch: int | None = None  # cap batches per epoch (quick runs); None = the whole split
    # optimizer steps between mid-epoch checkpoints (also one at every epoch end): at most a few
    # minutes of CPU work redone after a failure, without writing weights every few seconds
    checkpoint_every: int = 500
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
            (self.optim.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}"),
            (0.0 <= self.optim.warmup_fraction < 1.0, "optim.warmup_fraction must be in [0, 1)"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise config_error()(message)

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
            raise config_error()("tracking.tracking_uri is required when storage is a URI")
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
        raise config_error()(f"model: {exc}") from exc
