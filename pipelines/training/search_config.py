"""The search config: what `vaepipe tune --config FILE` reads (YAML), validated once at the edge.
`base` is a whole training config (see configs/train-shapes.yaml); `search` names the grid axes
laid over it; `scheduler` tunes ASHA. See configs/tune-shapes.yaml for a complete example.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import config_error, from_dict, to_dict
from pipelines.training.config import TrainConfig

# grid axes with their own field in `search`, and the training-config key each one sets
AXES = {"beta": "model.params.beta", "latent_dim": "model.params.latent_dim"}
# keys that must be the same for every trial, so they cannot be a grid axis
FIXED_PREFIXES = ("data", "storage", "name", "tracking.", "scaling.", "train.epochs")


@dataclass(frozen=True)
class SearchSection:
    beta: list[float] = field(default_factory=list)  # grid over model.params.beta; empty = the base value
    latent_dim: list[int] = field(default_factory=list)  # grid over model.params.latent_dim; empty = the base value
    extra: dict[str, list[Any]] = field(default_factory=dict)  # more axes by dotted key, e.g. {"optim.lr": [1e-3, 3e-4]}
    num_samples: int = 1  # repeats of the whole grid; repeat i trains with seed base.train.seed + i
    max_concurrent: int = 2  # trials running at once
    metric: str = "val_elbo"  # what ASHA and the best-trial pick compare (a metric the loop reports per epoch)
    mode: str = "max"  # max | min


@dataclass(frozen=True)
class SchedulerSection:
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # at each rung ASHA keeps the best 1/reduction_factor of trials


@dataclass(frozen=True)
class TuneConfig:
    base: TrainConfig  # the training run every trial starts from (workers must be 1: one process per trial)
    search: SearchSection = field(default_factory=SearchSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    cpus_per_trial: float = 1.0  # CPUs Ray reserves per trial (plus one GPU when base.scaling.use_gpu)
    storage: str | None = None  # where Tune keeps trials, checkpoints and search_result.json; None = base.storage
    name: str | None = None  # search name under storage; None = generated from model and time

    def __post_init__(self) -> None:
        search = self.search
        checks = [
            (search.mode in ("max", "min"), f"search.mode must be max or min, got {search.mode!r}"),
            (bool(search.metric), "search.metric must not be empty"),
            (search.num_samples >= 1, "search.num_samples must be >= 1"),
            (search.max_concurrent >= 1, "search.max_concurrent must be >= 1"),
            (self.scheduler.grace_period >= 1, "scheduler.grace_period must be >= 1"),
            (self.scheduler.reduction_factor >= 2, "scheduler.reduction_factor must be >= 2"),
            (self.cpus_per_trial > 0, "cpus_per_trial must be > 0"),
            (self.base.scaling.workers == 1,
             "base.scaling.workers must be 1: each trial is one training process (a Tune function trainable)"),
            (bool(search.beta or search.latent_dim or search.extra),
             "search needs at least one axis: beta, latent_dim or extra"),
        ]
        for ok, message in checks:
            if not ok:
                raise config_error()(message)
        for key, values in search.extra.items():
            _check_axis_key(key, self)
            if not isinstance(values, list) or not values:
                raise config_error()(f"search.extra.{key} must be a non-empty list of values, got {values!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneConfig":
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def axes(self) -> dict[str, list[Any]]:
        """Every grid axis as dotted training-config key -> values (seed last, when repeated)."""
        axes = {AXES[name]: list(values) for name in AXES if (values := getattr(self.search, name))}
        axes.update({key: list(values) for key, values in self.search.extra.items()})
        if self.search.num_samples > 1:
            axes["train.seed"] = [self.base.train.seed + i for i in range(self.search.num_samples)]
        return axes


def _check_axis_key(key: str, config: TuneConfig) -> None:
    """An extra axis must name one leaf of the training config (model.params.* is free-form)."""
    for name, dotted in AXES.items():
        if key == dotted:
            raise config_error()(f"search.extra.{key}: use search.{name} for this axis")
    if key == "train.seed" and config.search.num_samples > 1:
        raise config_error()("search.extra.train.seed: num_samples > 1 already repeats the grid over seeds")
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in FIXED_PREFIXES):
        raise config_error()(f"search.extra.{key}: this key is the same for every trial and cannot be a grid axis")
    node: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            raise config_error()(f"search.extra: unknown config key {key!r}")
        node = hints[part]
        if typing.get_origin(node) is dict:  # model.params: the model family validates its own keys
            if len(parts) != i + 2:
                raise config_error()(f"search.extra: {key!r} must name one key inside {'.'.join(parts[:i + 1])}")
            return
    if dataclasses.is_dataclass(node):
        raise config_error()(f"search.extra: {key!r} is a section, not a value")
