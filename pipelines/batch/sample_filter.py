"""Classifier-filtered sampling (`vaepipe generate --filter-classifier DIR --filter-confidence P`):
keep only the samples that a saved reference classifier (`save_classifier`, e.g. `vaepipe evaluate`'s
OUT/reference_classifier/) assigns to their conditioning label with probability >= P, drawing more
in seeded rounds until each label of a block has its count. Not here: training a classifier (generate
never does) or writing files (pipelines/batch/generate.py does, through the batch-job skeleton).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.batch.job import BlockRefused
from pipelines.config import ConfigError

MIN_ACCEPTANCE = 1e-3  # a label whose draws pass less often than this is given up on, with an error ...
JUDGE_DRAWS = 5000  # ... once it has had this many draws (enough to tell 1 in 1000 from nothing)
GROWTH = 4  # a round draws at most this many times what a label drew before: early rate estimates are rough
MARGIN = 1.2  # draw 20% more than the estimated shortfall, so most labels finish in the round after the first
MAX_ROUNDS = 16  # a backstop only: GROWTH and MARGIN reach JUDGE_DRAWS or the count in far fewer rounds


class FilterRejectedError(BlockRefused):
    """Too few draws of a label pass the filter: a user's choice (confidence, model) to revisit."""


@dataclass(frozen=True)
class FilterInfo:
    """The filter as the driver checked it: what the request and the manifest record."""

    classifier: str  # the classifier folder, resolved
    sha256: str  # of its config.json + model.safetensors: its identity in the request
    confidence: float
    val_accuracy: float | None  # what `vaepipe evaluate` measured on real val (None when not recorded)

    def manifest_entry(self) -> dict[str, Any]:
        return {"classifier": self.classifier, "classifier_sha256": self.sha256, "confidence": self.confidence,
                "classifier_val_accuracy": self.val_accuracy}


def classifier_sha256(folder: str | Path) -> str:
    from pipelines.data.manifest import file_sha256
    from pipelines.evaluation.metrics.classifier import CONFIG_FILE, WEIGHTS_FILE

    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(file_sha256(str(Path(folder) / name)).encode())
    return digest.hexdigest()


def inspect_filter(classifier_dir: str, confidence: float, model_name: str, input_shape: tuple[int, int, int],
                   num_classes: int | None, class_names: list[str] | None) -> FilterInfo:
    """Load the classifier once on the driver and check it fits the model; ConfigError names the problem.
    `class_names` are the model's own (its dataset.json), compared with the classifier's when both have them."""
    from safetensors import SafetensorError

    from pipelines.evaluation.metrics.classifier import WEIGHTS_FILE, load_classifier

    folder = Path(classifier_dir)
    if num_classes is None:
        raise ConfigError(f"filter_classifier needs a conditional model (a label to check each sample against); "
                          f"{model_name!r} is unconditional: drop --filter-classifier/--filter-confidence")
    if not folder.is_dir():
        raise ConfigError(f"filter_classifier {folder}: no such folder; give a saved reference classifier "
                          "(`vaepipe evaluate` writes one to OUT/reference_classifier/)")
    model = _saved_model_name(folder)
    if model is not None:  # the likeliest mix-up: the model's own folder
        raise ConfigError(f"filter_classifier {folder} holds a saved {model!r} model, not a reference classifier: "
                          "give the folder `vaepipe evaluate` wrote to OUT/reference_classifier/")
    try:
        _, spec = load_classifier(folder)
    except SafetensorError as exc:
        raise ConfigError(f"filter_classifier {folder}: its {WEIGHTS_FILE} is damaged ({exc}); save the "
                          "classifier again (rerun `vaepipe evaluate`)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"filter_classifier {folder}: {exc}") from exc
    shape, classes = tuple(spec["input_shape"]), int(spec["num_classes"])
    if shape != tuple(input_shape) or classes != num_classes:
        raise ConfigError(f"filter_classifier {folder} scores {classes} classes of {list(shape)} images but the "
                          f"{model_name!r} model draws {num_classes} classes of {list(input_shape)} images: use the "
                          "classifier evaluated on the model's own dataset")
    theirs = spec.get("class_names")
    if class_names and theirs and list(theirs) != list(class_names):
        raise ConfigError(f"filter_classifier {folder} was trained on classes {list(theirs)} but the model on "
                          f"{list(class_names)}: use the classifier evaluated on the model's own dataset")
    accuracy = spec.get("val_accuracy")
    return FilterInfo(str(folder.resolve()), classifier_sha256(folder), confidence,
                      float(accuracy) if isinstance(accuracy, (int, float)) else None)


def _saved_model_name(folder: Path) -> str | None:
    """The registry name in a saved model's config.json (vaemodels.save_model), None for anything else."""
    import json

    try:
        spec = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return spec["name"] if isinstance(spec, dict) and "kind" not in spec and isinstance(spec.get("name"), str) else None


def summarize(info: FilterInfo, tallies: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The manifest's "filter" entry: the filter and its acceptance rates (accepted / drawn), overall
    and per class, from the blocks' summed tallies. `accepted` counts every draw that passed, including
    any beyond a block's need in its last round; the kept counts are the manifest's `counts`."""
    drawn, accepted = tallies.get("drawn", {}), tallies.get("accepted", {})
    total_drawn, total_accepted = sum(drawn.values()), sum(accepted.values())
    per_class = {label: {"drawn": n, "accepted": accepted.get(label, 0),
                         "acceptance_rate": round(accepted.get(label, 0) / n, 6)}
                 for label, n in sorted(drawn.items(), key=lambda kv: int(kv[0]))}
    return {"filter": {**info.manifest_entry(), "drawn": total_drawn, "accepted": total_accepted,
                       "acceptance_rate": round(total_accepted / total_drawn, 6) if total_drawn else None,
                       "per_class": per_class}}


@dataclass
class FilteredDraw:
    z: Any  # torch.Tensor (n, latent): the kept samples' latents, in the block's slot order
    pixels: np.ndarray  # (n, H, W, C) uint8, same order
    drawn: dict[int, int]  # per label: candidates decoded and scored
    accepted: dict[int, int]  # per label: candidates that passed (>= kept)
    rounds: int


class SampleFilter:
    """A saved reference classifier and a confidence, loaded once per actor."""

    def __init__(self, classifier_dir: str, confidence: float, device: str = "cpu",
                 class_names: list[str] | None = None):
        from pipelines.evaluation.metrics.classifier import load_classifier

        self.classifier = load_classifier(classifier_dir)[0].to(device)
        self.confidence = confidence
        self.device = device
        self.class_names = class_names

    def label_probability(self, pixels: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Probability the classifier gives each image's label. It reads the uint8 pixels that are
        written (PNG is lossless), so anyone can recompute the decision from the files."""
        import torch

        from pipelines.evaluation.metrics.classifier import predict_proba

        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).to(self.device)
        probabilities = predict_proba(self.classifier, images).cpu().numpy()
        return probabilities[np.arange(len(labels)), labels]

    def draw(self, labels: np.ndarray, sample: Callable[[int, Any], tuple[Any, np.ndarray]],
             batch_size: int) -> FilteredDraw:
        """Fill every slot of a block (`labels[i]` is slot i's label) with an accepted sample.

        Each round draws, label by label in label order, the candidates its shortfall calls for: round 0
        the shortfall itself, later rounds the shortfall over the rate seen so far (times MARGIN, at most
        GROWTH times the draws so far). `sample(n, labels)` -> (z, uint8 pixels) draws from the block's one
        seeded generator, so the same block gives the same candidates, the same decisions and the same bytes. The first accepted
        candidates of a label, in draw order, fill its slots.
        """
        import torch

        need = {int(label): int(n) for label, n in zip(*np.unique(labels, return_counts=True))}
        drawn = dict.fromkeys(need, 0)
        kept_z: dict[int, list] = {label: [] for label in need}
        kept_pixels: dict[int, list] = {label: [] for label in need}
        rounds = 0
        while short := [label for label in need if len(kept_z[label]) < need[label]]:
            if rounds == MAX_ROUNDS:
                raise self._rejected(short[0], drawn, kept_z, f"after {MAX_ROUNDS} rounds")
            sizes = {label: self._round_size(need[label] - len(kept_z[label]), drawn[label], len(kept_z[label]))
                     for label in short}
            round_labels = torch.cat([torch.full((sizes[label],), label, dtype=torch.long) for label in short])
            for start in range(0, len(round_labels), batch_size):
                chunk_labels = round_labels[start:start + batch_size]
                chunk_z, pixels = sample(len(chunk_labels), chunk_labels)
                passed = self.label_probability(pixels, chunk_labels.numpy()) >= self.confidence
                for row in np.flatnonzero(passed):
                    label = int(chunk_labels[row])
                    kept_z[label].append(chunk_z[row])
                    kept_pixels[label].append(pixels[row])
            for label in short:
                drawn[label] += sizes[label]
            rounds += 1
            for label in short:
                if len(kept_z[label]) < need[label] and drawn[label] >= JUDGE_DRAWS \
                        and len(kept_z[label]) < MIN_ACCEPTANCE * drawn[label]:
                    raise self._rejected(label, drawn, kept_z, "fewer than 1 in 1000")

        accepted = {label: len(kept_z[label]) for label in need}
        taken = dict.fromkeys(need, 0)  # slot i takes the next accepted sample of its label
        rows_z, rows_pixels = [], []
        for label in labels.tolist():
            rows_z.append(kept_z[label][taken[label]])
            rows_pixels.append(kept_pixels[label][taken[label]])
            taken[label] += 1
        return FilteredDraw(torch.stack(rows_z), np.stack(rows_pixels), drawn, accepted, rounds)

    @staticmethod
    def _round_size(shortfall: int, drawn: int, accepted: int) -> int:
        if drawn == 0:
            return shortfall
        rate = max(accepted / drawn, MIN_ACCEPTANCE)
        return max(shortfall, min(math.ceil(MARGIN * shortfall / rate), GROWTH * drawn))

    def _rejected(self, label: int, drawn: dict[int, int], kept: dict[int, list], why: str) -> FilterRejectedError:
        name = self.class_names[label] if self.class_names else str(label)
        passed, tried = len(kept[label]), drawn[label]
        return FilterRejectedError(
            f"filter: class {name!r} (label {label}): {passed} of {tried} draws ({passed / tried:.3%}) reached "
            f"probability >= {self.confidence} under the filter classifier, {why}; lower --filter-confidence "
            "or train the model further")
