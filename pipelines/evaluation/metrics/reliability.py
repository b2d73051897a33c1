"""Can the reference classifier judge? Every metric read through it (FID/PRDC in its features,
CAS and TRTR, augmentation gains) is only as good as the classifier: one that cannot tell the
classes apart makes blank frames look real (the FID of issue 12). This module turns its held-out
accuracy into a verdict and names the metrics the verdict covers. Not here: training it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

CHANCE_MARGIN = 0.5  # ... nor when it closes less than half the gap between chance and perfect
# metrics.json keys (exact, or prefixes ending in "_") whose meaning depends on the reference classifier
DEPENDENT = ("fid", "precision", "recall", "density", "coverage", "cas", "cas_ratio", "cas_worst_class",
             "cas_per_class", "tstr_accuracy", "trtr_accuracy", "augmentation_gain", "augmentation_gain_")


@dataclass(frozen=True)
class Reliability:
    reliable: bool
    reason: str  # one sentence a user can act on
    reference_accuracy: float
    chance: float
    floor: float
    affected: tuple[str, ...]  # the metrics present in this evaluation that the verdict covers

    def to_dict(self) -> dict:
        return {**asdict(self), "affected": list(self.affected)}


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent class: what a classifier that learnt nothing scores."""
    labels = labels[labels >= 0]
    return float(torch.bincount(labels).max()) / len(labels) if len(labels) else float("nan")


def dependent_metrics(keys) -> tuple[str, ...]:
    return tuple(sorted(k for k in keys if k in DEPENDENT or any(k.startswith(p) for p in DEPENDENT if
                                                                   p.endswith("_"))))


def judge(reference_accuracy: float, chance: float, floor: float, metric_keys) -> Reliability:
    """Reliable when val accuracy >= floor and >= chance + CHANCE_MARGIN x (1 - chance)."""
    affected = dependent_metrics(metric_keys)
    margin_bar = chance + CHANCE_MARGIN * (1.0 - chance)
    if reference_accuracy < floor:
        reason = (f"the reference classifier reaches {reference_accuracy:.3f} on real val images, below the "
                  f"floor of {floor:.2f} (chance: {chance:.3f}): it cannot tell the classes apart well enough "
                  "to judge; raise classifier_steps (--classifier-steps) or give it more real training data")
    elif reference_accuracy < margin_bar:
        reason = (f"the reference classifier reaches {reference_accuracy:.3f} on real val images, within "
                  f"{CHANCE_MARGIN:.0%} of the gap above chance ({chance:.3f}): too close to guessing to judge")
    else:
        reason = (f"the reference classifier reaches {reference_accuracy:.3f} on real val images (floor "
                  f"{floor:.2f}, chance {chance:.3f})")
        return Reliability(True, reason, reference_accuracy, chance, floor, affected)
    return Reliability(False, reason, reference_accuracy, chance, floor, affected)
