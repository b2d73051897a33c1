"""Is a built dataset's sample order a fair mix of its classes? `vaepipe data verify --check-order`
reads the labels of every shard in stored order and tests two things a training run depends on:
consecutive samples change class as often as a random order would, and every shard holds the
split's class mix. Datasets built before shards were shuffled fail both when their source came
ordered by class (mnist5k, an imagefolder); rebuilding fixes them.

Not here: checksums (manifest.verify_shards) or decoding images (the reader).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import chi2_contingency

from pipelines.data.manifest import Manifest
from pipelines.data.reader import read_raw_samples

# A random order changes class between consecutive samples about (1 - sum p_k^2) of the time; a
# class-sorted one almost never does. Half the expected rate is far outside sampling noise for
# any split of more than a few dozen samples, and far above what sorted data shows (~0.01).
MIN_CHANGE_RATIO = 0.5
# Shard-by-class contingency test: a p-value this small means the shards hold different class
# mixes (sorted data gives p ~ 0; a shuffled split stays far above it).
MIN_HOMOGENEITY_P = 1e-6


@dataclass(frozen=True)
class OrderReport:
    num_samples: int
    num_classes: int
    label_change_ratio: float | None  # observed / expected class changes between neighbours (~1 when mixed)
    shard_homogeneity_p: float | None  # chi-square test that every shard has the split's class mix
    class_sorted: bool

    def to_dict(self) -> dict:
        return asdict(self)


# modality -> its shard-labels reader ("module:function"); images: shard_labels below
SHARD_LABELS = {"table": "pipelines.data.table_reader:shard_labels"}


def shard_labels(manifest: Manifest, split: str) -> list[np.ndarray]:
    """The labels of each shard of a split, in stored order (images are not decoded)."""
    if manifest.modality in SHARD_LABELS:
        import importlib

        module, _, function = SHARD_LABELS[manifest.modality].partition(":")
        return getattr(importlib.import_module(module), function)(manifest, split)
    labels = []
    for shard in manifest.shards(split):
        errors: list[str] = []
        labels.append(np.array([int(sample["cls"]) for sample in read_raw_samples(shard.url, errors)
                                if "cls" in sample], dtype=np.int64))
    return labels


def order_report(per_shard: list[np.ndarray]) -> OrderReport | None:
    """Mixing statistics of one split from its per-shard labels; None when there is nothing to mix
    (fewer than two labelled classes)."""
    labelled = [lab[lab >= 0] for lab in per_shard]
    everything = np.concatenate(labelled) if labelled else np.zeros(0, dtype=np.int64)
    classes = np.unique(everything)
    if len(classes) < 2:
        return None
    share = np.array([(everything == c).mean() for c in classes])
    pairs = sum(max(len(lab) - 1, 0) for lab in labelled)
    changes = sum(int((lab[1:] != lab[:-1]).sum()) for lab in labelled)
    expected_changes = pairs * (1.0 - float((share ** 2).sum()))
    change_ratio = changes / expected_changes if expected_changes > 0 else None
    homogeneity_p = None
    table = np.array([[(lab == c).sum() for c in classes] for lab in labelled if len(lab)])
    if len(table) >= 2:
        table = table[:, table.sum(0) > 0]
        homogeneity_p = float(chi2_contingency(table)[1])
    sorted_ = bool((change_ratio is not None and change_ratio < MIN_CHANGE_RATIO)
                   or (homogeneity_p is not None and homogeneity_p < MIN_HOMOGENEITY_P))
    return OrderReport(int(len(everything)), int(len(classes)),
                       None if change_ratio is None else round(change_ratio, 4), homogeneity_p, sorted_)


def check_order(manifest: Manifest) -> dict[str, dict | None]:
    """Order report per split (None for splits with nothing to check)."""
    return {split: (None if report is None else report.to_dict())
            for split in manifest.data["splits"]
            for report in [order_report(shard_labels(manifest, split))]}
