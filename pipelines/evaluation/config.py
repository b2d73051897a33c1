"""What `vaepipe evaluate` is asked to do: its typed config, validated once. Light on purpose (no
torch), so the CLI takes its flags' defaults from here."""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

from pipelines.batch.generate_config import DEFAULT_PIXEL_TEMPERATURE
from pipelines.config import config_error, from_dict

DEFAULT_FLOOR = 0.9  # reference val accuracy below which classifier-based metrics are not trusted


def fraction_key(fraction: float) -> str:
    """metrics.json key of the augmentation gain at a real-data fraction: 0.01 -> augmentation_gain_1pct."""
    return f"augmentation_gain_{fraction * 100:g}pct"


@dataclass(frozen=True)
class EvaluateConfig:
    model: str  # saved model folder (vaemodels.save_model layout; registry.pull gives one)
    data: str  # dataset manifest (or its folder) the model was trained on
    out: str  # output folder: metrics.json, report.html, figures
    synthetic: str | None = None  # generated dataset folder (`vaepipe generate` out); None = sample the model
    iwae_k: int = 1000  # importance samples per image for the IWAE log-likelihood
    iwae_subset: int = 256  # val images the IWAE estimate averages over (k forward passes each)
    seeds: int = 3  # seeds (subsets and initialisations) the augmentation gain averages over
    max_real: int = 5000  # at most this many real images per split are read
    num_synthetic: int = 2000  # samples drawn from the model (split evenly over classes when conditional),
    # or at most this many read from `synthetic`
    pixel_temperature: float = DEFAULT_PIXEL_TEMPERATURE  # samples drawn here: as `vaepipe generate` writes them
    classifier_steps: int = 2000  # at most this many Adam steps per classifier; early stopping on a split of
    # real train usually ends sooner (same rule for the reference, CAS and every augmentation arm)
    reliability_floor: float = DEFAULT_FLOOR  # reference val accuracy below this marks dependent metrics unreliable
    augmentation_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # shares of real train the gain is measured at
    early_stopping_fraction: float = 0.1  # share of real train held out (stratified) to stop classifiers on
    anomaly_steps: int = 2000  # steps of the family copy trained without the anomaly class (when needed)
    held_out_class: int | None = None  # a class the model never saw in training; None = it saw every class
    seed: int = 0  # sampling, classifier and subset seeds
    tracking_uri: str | None = None  # with run_id: log metrics and out/ to that MLflow run
    run_id: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (bool(self.model), "model must name a saved model folder"),
            (bool(self.data), "data must name a dataset manifest"),
            (bool(self.out), "out must name a folder"),
            (math.isfinite(self.pixel_temperature) and self.pixel_temperature > 0,
             f"pixel_temperature must be > 0, got {self.pixel_temperature}"),
            (self.iwae_k >= 1, f"iwae_k must be >= 1, got {self.iwae_k}"),
            (self.iwae_subset >= 1, f"iwae_subset must be >= 1, got {self.iwae_subset}"),
            (self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}"),
            (self.max_real >= 20, f"max_real must be >= 20, got {self.max_real}"),
            (self.num_synthetic >= 20, f"num_synthetic must be >= 20, got {self.num_synthetic}"),
            (self.classifier_steps >= 1, f"classifier_steps must be >= 1, got {self.classifier_steps}"),
            (self.anomaly_steps >= 1, f"anomaly_steps must be >= 1, got {self.anomaly_steps}"),
            (0 <= self.reliability_floor <= 1, f"reliability_floor must be in [0, 1], got {self.reliability_floor}"),
            (all(0 < f <= 1 for f in self.augmentation_fractions),
             f"augmentation_fractions must each be in (0, 1], got {list(self.augmentation_fractions)}"),
            (len(set(map(fraction_key, self.augmentation_fractions))) == len(self.augmentation_fractions),
             f"augmentation_fractions must be distinct, got {list(self.augmentation_fractions)}"),
            (0 < self.early_stopping_fraction < 0.5,
             f"early_stopping_fraction must be in (0, 0.5), got {self.early_stopping_fraction}"),
            (self.held_out_class is None or self.held_out_class >= 0,
             f"held_out_class must be >= 0, got {self.held_out_class}"),
            ((self.tracking_uri is None) == (self.run_id is None), "give tracking_uri and run_id together"),
        ]
        for ok, message in checks:
            if not ok:
                raise config_error()(message)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluateConfig":
        return from_dict(cls, data)

