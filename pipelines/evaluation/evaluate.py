"""`vaepipe evaluate`: one saved model (and optionally a generated dataset) against the real data
it was trained on -> `metrics.json` (flat numbers), `report.html` and PNG figures in one folder,
optionally logged to an MLflow run. The metrics themselves live in pipelines/evaluation/metrics/; this module
loads the data, decides which metrics apply to the model, and writes the results.
Not here: resolving models:/ URIs (pipelines.registry.pull gives the folder).
"""
from __future__ import annotations

import html
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vaemodels
from pipelines.config import ConfigError, from_dict
from pipelines.data import ShardStream, read_manifest
from pipelines.data.manifest import Manifest
from pipelines.data.reader import decode_png
from pipelines.figures import display_scale, save_grid
from pipelines.evaluation.metrics import (accuracy, anomaly_scores, augmentation_gain, detection_metrics, features,
                               fit_classifier, frechet_distance, held_out_class_detection, memorisation,
                               mutual_information_gap, per_class_accuracy, precision_recall_density_coverage,
                               save_classifier, stratified_subset)
from pipelines.evaluation.metrics.reliability import DEFAULT_FLOOR, Reliability, chance_accuracy, judge
from pipelines.registry.tracking import write_figures
from vaemodels.common import active_units

METRICS_NAME, REPORT_NAME = "metrics.json", "report.html"
CLASSIFIER_DIR = "reference_classifier"  # OUT/<this>: the reference classifier (generate --filter-classifier takes it)
MAX_EARLY_STOPPING = 1000  # images in the early-stopping split at most (each check scores all of them)
ARTIFACT_PATH = "evaluation"  # where out/ lands in the MLflow run's artifacts
BATCH = 256  # images per forward pass (memory bound only)
IWAE_BATCH = 16  # images per IWAE pass: k samples each, so k x 16 decodes at once

# metrics.json key -> the line the report shows beside it; the report shows them in this order
METRIC_HELP = {
    "cas": "Classification Accuracy Score (Ravuri & Vinyals 2019): a classifier trained on the synthetic set "
           "alone, tested on real val images (higher is better; read against trtr_accuracy).",
    "cas_ratio": "cas / trtr_accuracy: the share of real data's usefulness the synthetic set delivers (1 = as good "
                 "as the real training set).",
    "cas_worst_class": "The lowest per-class CAS (recall on real val images of the class the model renders worst).",
    "tstr_accuracy": "Train on synthetic, test on real val: the same number as cas (kept for existing scripts).",
    "trtr_accuracy": "Train on real train, test on real val: the ceiling CAS is read against (the reference "
                     "classifier itself).",
    "augmentation_gain": "Accuracy(10% of real train + synthetic) - accuracy(the 10% alone) on real val, mean over "
                         "seeds (> 0: the synthetic data helps).",
    "augmentation_gain_std": "Standard deviation of the 10% augmentation gain over seeds.",
    "memorisation_ratio": "Median distance (pixels) of synthetic samples to their nearest real train image / the "
                          "same for real val images (~1: no closer than unseen real data; -> 0: copies).",
    "copy_fraction": "Share of synthetic samples closer to a train image than 0.1 x the val median distance "
                     "(near-exact copies); read against val_copy_fraction.",
    "val_copy_fraction": "The same share for real val images: duplicates the dataset itself holds (the base rate).",
    "nearest_train_distance": "Median pixel distance of synthetic samples to their nearest real train image.",
    "val_nearest_train_distance": "Median pixel distance of real val images to their nearest real train image.",
    "reference_accuracy": "Val accuracy of the reference classifier every classifier-based metric is read through "
                          "(FID/PRDC features, CAS, gains): below the floor they are unreliable.",
    "reference_chance": "Chance level: val accuracy of always answering the most frequent class.",
    "reference_reliable": "1 when the reference classifier can judge (accuracy >= floor, well above chance), else 0.",
    "reference_steps": "Adam steps the reference classifier took before early stopping (on a split of real train).",
    "fid": "Fréchet distance between real held-out and synthetic features of the reference classifier "
           "(lower is better, 0 = same Gaussian statistics).",
    "precision": "Share of synthetic samples inside the real data's k-NN manifold (fidelity; Kynkäänniemi 2019).",
    "recall": "Share of real samples inside the synthetic data's k-NN manifold (diversity; Kynkäänniemi 2019).",
    "density": "Real k-NN balls holding each synthetic sample, / k (fidelity, ~1 when the sets match; Naeem 2020).",
    "coverage": "Share of real k-NN balls holding a synthetic sample (diversity, robust to outliers; Naeem 2020).",
    "iwae_log_likelihood": "IWAE estimate of log p(x) on real val images, nats per image (higher is better; "
                           "conditional models: log p(x|y)).",
    "elbo": "Evidence lower bound on real val images, nats per image (higher is better; <= log p(x)).",
    "recon": "Reconstruction term of the model's own loss on real val images (lower is better).",
    "kl": "KL(q(z|x) || p(z)) on real val images, nats per image: information the code carries.",
    "active_units": "Latent dimensions whose posterior mean varies over the data (Burda et al. 2016); "
                    "the rest have collapsed.",
    "anomaly_auroc": "AUROC of anomaly_score separating a held-out class from the others (0.5 = chance).",
    "anomaly_average_precision": "Average precision of the same separation (chance = share of anomalies).",
    "mig": "Mutual Information Gap of the posterior means against the known factors (Chen et al. 2018; 1 = each "
           "factor in exactly one dimension).",
}
# report sections, in order: usefulness first; a key goes to the first section whose test it passes
SECTIONS = (
    ("Usefulness: does the synthetic data help a classifier?",
     lambda k: k.startswith(("cas", "tstr", "trtr", "augmentation_gain"))),
    ("Memorisation: does the model copy its training data?",
     lambda k: k in ("memorisation_ratio", "copy_fraction", "val_copy_fraction", "nearest_train_distance",
                     "val_nearest_train_distance")),
    ("Reference classifier: can the evaluator judge?", lambda k: k.startswith("reference_")),
    ("Fidelity and diversity (reference classifier features)",
     lambda k: k in ("fid", "precision", "recall", "density", "coverage")),
    ("The model itself", lambda k: True),
)


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
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluateConfig":
        return from_dict(cls, data)


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # N x C x H x W in [0, 1]
    labels: torch.Tensor  # N, long; -1 = unlabelled
    factors: torch.Tensor | None  # N x F factor values where the source knows them


def _log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate per `config`; returns the metrics, where the files are and how each part was measured."""
    started = time.perf_counter()
    model = vaemodels.load_model(config.model)  # eval mode, CPU
    manifest = read_manifest(config.data)
    num_classes = _check_fits(model, manifest, config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_split(manifest, "train", config.max_real, config.seed)
    val = load_split(manifest, "val", config.max_real, config.seed)
    _log(f"{model.name} on {manifest.location}: {len(train.images)} train / {len(val.images)} val images")
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    details: dict[str, Any] = {}  # the non-numeric parts of metrics.json (per-class CAS, omissions)
    omitted: dict[str, str] = {}

    torch.manual_seed(config.seed)
    metrics.update(likelihood_metrics(model, val, config.iwae_k, config.iwae_subset))
    _log(f"likelihood metrics done ({time.perf_counter() - started:.1f}s)")

    synthetic, reliability = None, None
    if num_classes >= 2:
        fit, stop = early_stopping_split(train, config.early_stopping_fraction, config.seed)
        holdout = (stop.images, stop.labels)
        reference, fit_report = fit_classifier(fit.images, fit.labels, num_classes, config.classifier_steps,
                                               seed=config.seed, holdout=holdout)
        metrics["reference_accuracy"] = metrics["trtr_accuracy"] = accuracy(reference, val.images, val.labels)
        metrics["reference_chance"] = chance_accuracy(val.labels)
        metrics["reference_steps"] = float(fit_report.steps)
        save_classifier(reference, out / CLASSIFIER_DIR, val_accuracy=metrics["reference_accuracy"],
                        chance=metrics["reference_chance"], class_names=list(manifest.class_names),
                        data=manifest.location, steps=fit_report.steps, seed=config.seed)
        notes["reference_classifier"] = (
            f"trained on {len(fit.images)} real train images, stopped on {len(stop.images)} more "
            f"({fit_report.steps} steps, best at {fit_report.best_step}, {fit_report.seconds:.1f}s; cap "
            f"{config.classifier_steps}); saved to {CLASSIFIER_DIR}/ for `vaepipe generate --filter-classifier`")
        _log(f"reference classifier: val accuracy {metrics['reference_accuracy']:.3f} after {fit_report.steps} "
             f"steps ({time.perf_counter() - started:.1f}s)")
        synthetic, notes["synthetic"] = synthetic_set(model, config, num_classes)
        if synthetic is not None:
            # real reference features from images the feature network never took a gradient step on
            unseen = torch.cat([val.images, stop.images])
            metrics.update(fidelity_metrics(reference, unseen, synthetic.images, config.seed))
            notes["fidelity"] = (f"{len(synthetic.images)} synthetic vs {len(unseen)} real images the reference "
                                 "classifier did not train on (val + its early-stopping split)")
            metrics.update(memorisation(synthetic.images, train.images, val.images))
            useful, per_class, notes_useful, omitted_useful = usefulness_metrics(
                synthetic, fit, val, holdout, num_classes, manifest.class_names, metrics["trtr_accuracy"], config)
            metrics.update(useful)
            if per_class:
                details["cas_per_class"] = per_class
            notes.update(notes_useful)
            omitted.update(omitted_useful)
        _log(f"classifier metrics done ({time.perf_counter() - started:.1f}s)")
        anomaly, notes["anomaly"] = anomaly_metrics(model, train, val, num_classes, config)
        metrics.update(anomaly)
        _log(f"anomaly metrics done ({time.perf_counter() - started:.1f}s)")
    else:
        notes["classifier"] = "the dataset has no class labels: classifier, synthetic and anomaly metrics omitted"
    if train.factors is not None and model.config.latent_dim >= 2:
        metrics["mig"] = mutual_information_gap(embed(model, train).numpy(), train.factors.numpy())

    if "reference_accuracy" in metrics:
        reliability = judge(metrics["reference_accuracy"], metrics["reference_chance"], config.reliability_floor,
                            [*metrics, *details])
        metrics["reference_reliable"] = float(reliability.reliable)
        if not reliability.reliable:
            print(f"[evaluate] WARNING: {', '.join(reliability.affected)} are unreliable: {reliability.reason}",
                  file=sys.stderr, flush=True)

    non_finite = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if k not in non_finite}
    figures = write_evaluation_figures(model, train, val, synthetic, manifest, out, config.seed)
    document = {**metrics, **details, "omitted": omitted,
                "reliability": reliability.to_dict() if reliability is not None else None}
    (out / METRICS_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    write_report(out / REPORT_NAME, model, manifest, config, metrics, non_finite, notes, figures, reliability,
                 details, omitted)
    if config.tracking_uri:
        log_to_mlflow(config.tracking_uri, config.run_id, metrics, out)
    seconds = time.perf_counter() - started
    _log(f"done in {seconds:.1f}s: {out / REPORT_NAME}")
    return {"metrics": metrics, "out": str(out.resolve()), "metrics_path": str((out / METRICS_NAME).resolve()),
            "report": str((out / REPORT_NAME).resolve()), "figures": [f.name for f in figures],
            "non_finite": non_finite, "notes": notes, "seconds": round(seconds, 2),
            "reliability": document["reliability"], "omitted": omitted, **details,
            "reference_classifier": str((out / CLASSIFIER_DIR).resolve()) if num_classes >= 2 else None}


def _check_fits(model: vaemodels.AutoEncoderModel, manifest: Manifest, config: EvaluateConfig) -> int:
    """The dataset's class count, once the model, the dataset and the request are known to fit together."""
    if tuple(model.input_shape) != tuple(manifest.image_shape):
        raise ConfigError(f"the model takes images of shape {tuple(model.input_shape)} but the dataset "
                          f"{manifest.location} holds {tuple(manifest.image_shape)}")
    if model.is_conditional and manifest.num_classes != model.num_classes:
        raise ConfigError(f"the {model.name!r} model has {model.num_classes} classes but the dataset has "
                          f"{manifest.num_classes}")
    if config.held_out_class is not None and config.held_out_class >= manifest.num_classes:
        raise ConfigError(f"held_out_class {config.held_out_class} is not a class of the dataset "
                          f"({manifest.num_classes} classes)")
    return manifest.num_classes


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_split(manifest: Manifest, split: str, limit: int, seed: int = 0) -> Split:
    """A uniform random sample of at most `limit` samples of a split (all of them, in shard order, when
    the split is smaller). Reservoir sampling: one streaming pass, memory for `limit` images only, and
    no bias from sources whose shards are sorted by class (imagefolder)."""
    rng = np.random.default_rng(seed)
    kept: list[dict[str, torch.Tensor]] = []
    for seen, sample in enumerate(ShardStream(manifest, split, shuffle_buffer=0)):
        if len(kept) < limit:
            kept.append(sample)
        elif (slot := int(rng.integers(0, seen + 1))) < limit:
            kept[slot] = sample
    if len(kept) < 20:
        raise ConfigError(f"split {split!r} of {manifest.location} has {len(kept)} samples; evaluation needs >= 20")
    return Split(torch.stack([s["image"] for s in kept]), torch.stack([s["label"] for s in kept]),
                 torch.stack([s["factors"] for s in kept]) if "factors" in kept[0] else None)


def read_synthetic(folder: str | Path, image_shape: tuple[int, int, int], limit: int, seed: int) -> Split:
    """A generated dataset's Parquet rows (hive partition label=K, -1 = unlabelled): at most `limit`
    of them, chosen with `seed`, decoded."""
    import pyarrow.dataset as ds

    root = Path(folder) / "parquet"
    if not root.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} has no parquet/ folder (make one with `vaepipe generate`)")
    table = ds.dataset(str(root), format="parquet", partitioning="hive").to_table(columns=["image", "label"])
    if table.num_rows == 0:
        raise ConfigError(f"synthetic folder {folder} holds no rows")
    rows = np.arange(table.num_rows)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    pngs = table.column("image").take(rows).to_pylist()
    labels = torch.as_tensor(np.asarray(table.column("label").take(rows).to_numpy(), dtype=np.int64))
    images = torch.stack([decode_png(png) for png in pngs])
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ConfigError(f"synthetic images in {folder} have shape {tuple(images.shape[1:])}, the real data "
                          f"{tuple(image_shape)}")
    return Split(images, labels, None)


def synthetic_set(model, config: EvaluateConfig, num_classes: int) -> tuple[Split | None, str]:
    """The synthetic samples the fidelity and usefulness metrics judge, with a note on where they came from.
    Unlabelled samples (unconditional models) stay unlabelled (-1): labelling them with a classifier and
    then scoring classifiers trained on those labels would measure that classifier, not the data."""
    if config.synthetic is not None:
        synthetic = read_synthetic(config.synthetic, model.input_shape, config.num_synthetic, config.seed)
        source = f"{len(synthetic.images)} samples read from {config.synthetic}"
        low, high = int(synthetic.labels.min()), int(synthetic.labels.max())
        if low < -1 or high >= num_classes:
            raise ConfigError(f"synthetic labels span {low}..{high}; the dataset has classes 0..{num_classes - 1} "
                              "(-1 = unlabelled)")
    elif model.is_generative:
        generator = torch.Generator().manual_seed(config.seed)
        if model.is_conditional:
            per_class = max(1, config.num_synthetic // num_classes)
            labels = torch.arange(num_classes).repeat_interleave(per_class)
            source = f"{per_class} samples per class drawn from the model"
        else:
            labels = torch.full((config.num_synthetic,), -1, dtype=torch.long)
            source = f"{config.num_synthetic} samples drawn from the model's prior"
        images = torch.cat([model.sample(len(chunk), labels=model.condition_on(chunk), generator=generator)
                            for chunk in labels.split(BATCH)]).cpu()
        # stored synthetic data is 8-bit PNG (pipelines/batch/generate.py): judge the same pixels
        synthetic = Split((images * 255).round().clamp(0, 255) / 255, labels, None)
    else:
        return None, f"none: a {model.name!r} model cannot sample and no synthetic folder was given"
    return synthetic, source


def early_stopping_split(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(fit, stop): a class-stratified `fraction` of real train (at most MAX_EARLY_STOPPING images) that
    every classifier stops on, and the rest it trains on. Val stays untouched: it is the test set."""
    stop = stratified_subset(train.labels, fraction, seed)
    if len(stop) > MAX_EARLY_STOPPING:
        stop = stop[torch.randperm(len(stop), generator=torch.Generator().manual_seed(seed))[:MAX_EARLY_STOPPING]]
    keep = torch.ones(len(train.labels), dtype=torch.bool)
    keep[stop] = False

    def take(mask_or_index):
        return Split(train.images[mask_or_index], train.labels[mask_or_index],
                     None if train.factors is None else train.factors[mask_or_index])

    return take(keep), take(stop)


# ----------------------------------------------------------------------------------------------
# Metric groups
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def likelihood_metrics(model, val: Split, iwae_k: int, iwae_subset: int) -> dict[str, float]:
    """recon (and kl) of the model's loss on val; for variational models also elbo, IWAE, active units."""
    sums: dict[str, float] = {}
    means = []
    for start in range(0, len(val.images), BATCH):
        x, y = val.images[start:start + BATCH], val.labels[start:start + BATCH]
        parts = model.loss({"image": x, "label": y})
        for key in ("recon", "kl"):
            if key in parts:
                sums[key] = sums.get(key, 0.0) + float(parts[key]) * len(x)
        if model.is_variational:
            known = model.condition_on(y, all_known=True)
            sums["elbo"] = sums.get("elbo", 0.0) + float(model.elbo(x, known).sum())
            means.append(model.embed(x, known))
    out = {key: total / len(val.images) for key, total in sums.items()}
    if model.is_variational:
        out["active_units"] = float(active_units(torch.cat(means)))
        x, y = val.images[:iwae_subset], val.labels[:iwae_subset]
        log_px = [model.log_likelihood(x[i:i + IWAE_BATCH], k=iwae_k,
                                       labels=model.condition_on(y[i:i + IWAE_BATCH], all_known=True))
                  for i in range(0, len(x), IWAE_BATCH)]
        out["iwae_log_likelihood"] = float(torch.cat(log_px).mean())
    return out


def fidelity_metrics(reference, real_images: torch.Tensor, synthetic_images: torch.Tensor,
                     seed: int) -> dict[str, float]:
    """FID on all real vs all synthetic features; PRDC on equal-sized seeded subsets of the two, as
    its authors use it (the k-NN radii shrink as a set grows). `real_images` must be images the
    reference classifier did not train on, or real data would look closer to itself than it is."""
    real, fake = features(reference, real_images), features(reference, synthetic_images)
    n = min(len(real), len(fake))
    rng = np.random.default_rng(seed)
    real_n = real[np.sort(rng.choice(len(real), n, replace=False))]
    fake_n = fake[np.sort(rng.choice(len(fake), n, replace=False))]
    return {"fid": frechet_distance(real, fake), **precision_recall_density_coverage(real_n, fake_n)}


def usefulness_metrics(synthetic: Split, fit: Split, val: Split, holdout: tuple[torch.Tensor, torch.Tensor],
                       num_classes: int, class_names: list[str], trtr: float, config: EvaluateConfig
                       ) -> tuple[dict[str, float], dict[str, float], dict[str, str], dict[str, str]]:
    """CAS (+ ratio to TRTR, per class) and augmentation gains at each real fraction, from the labelled
    synthetic samples. Returns (metrics, per-class CAS by class name, notes, omitted keys -> why)."""
    labelled = synthetic.labels >= 0
    if not labelled.any():
        why = ("the synthetic samples carry no class labels (an unconditional model): labelling them with a "
               "classifier and scoring classifiers trained on those labels would be circular")
        keys = ["cas", "cas_ratio", "cas_per_class", "tstr_accuracy", "augmentation_gain", "augmentation_gain_std",
                *(fraction_key(f) for f in config.augmentation_fractions)]
        return {}, {}, {"usefulness": "omitted: " + why}, {k: why for k in keys}
    images, labels = synthetic.images[labelled], synthetic.labels[labelled]
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    # a different seed from the reference classifier, so CAS on real-as-synthetic is a real rerun
    cas_classifier, report = fit_classifier(images, labels, num_classes, config.classifier_steps,
                                            seed=config.seed + 1, holdout=holdout)
    metrics["cas"] = metrics["tstr_accuracy"] = accuracy(cas_classifier, val.images, val.labels)
    metrics["cas_ratio"] = metrics["cas"] / trtr if trtr > 0 else float("nan")
    per_class = per_class_accuracy(cas_classifier, val.images, val.labels, num_classes)
    by_name = {class_names[c] if c < len(class_names) else str(c): v for c, v in enumerate(per_class)
               if math.isfinite(v)}
    metrics["cas_worst_class"] = min(by_name.values()) if by_name else float("nan")
    notes["cas"] = (f"trained on {int(labelled.sum())} labelled synthetic samples ({report.steps} steps), tested on "
                    f"{len(val.images)} real val images; "
                    + ("" if labelled.all() else f"{int((~labelled).sum())} unlabelled samples left out; ")
                    + "worst class: " + min(by_name, key=by_name.get, default="-"))
    parts = []
    for offset, fraction in enumerate(config.augmentation_fractions):
        gain = augmentation_gain(fit.images, fit.labels, images, labels, val.images, val.labels, num_classes,
                                 real_fraction=fraction, seeds=config.seeds, steps=config.classifier_steps,
                                 first_seed=config.seed + 2 + 100 * offset, holdout=holdout)
        key = fraction_key(fraction)
        metrics[key], metrics[key + "_std"] = gain["gain"], gain["std"]
        parts.append(f"{fraction:.0%} of real train: {gain['subset_accuracy']:.3f} alone, "
                     f"{gain['augmented_accuracy']:.3f} with synthetic")
        _log(f"augmentation gain at {fraction:.0%} real: {gain['gain']:+.3f} +- {gain['std']:.3f}")
    if 0.1 in config.augmentation_fractions:  # the key existing scripts read
        metrics["augmentation_gain"] = metrics[fraction_key(0.1)]
        metrics["augmentation_gain_std"] = metrics[fraction_key(0.1) + "_std"]
    notes["augmentation_gain"] = (f"real val accuracy, means over {config.seeds} seeds (stratified subsets of the "
                                  f"{len(fit.images)} real train images the classifiers may train on): "
                                  + "; ".join(parts))
    return metrics, by_name, notes, {}


def anomaly_metrics(model, train: Split, val: Split, num_classes: int,
                    config: EvaluateConfig) -> tuple[dict[str, float], str]:
    """Held-out-class detection. Normal: val samples of the other classes; anomalous: every train and
    val sample of the held-out class. With `held_out_class` the model itself never saw that class and
    scores directly; otherwise a copy of its family (same config) is trained for `anomaly_steps` on
    the train split without the highest class, and the copy is scored."""
    anomaly_class = num_classes - 1 if config.held_out_class is None else config.held_out_class
    normal = val.images[val.labels != anomaly_class]
    anomalous = torch.cat([train.images[train.labels == anomaly_class], val.images[val.labels == anomaly_class]])
    if not len(normal) or not len(anomalous):
        return {}, f"omitted: no samples of class {anomaly_class} or of the other classes"
    if config.held_out_class is not None:
        result = detection_metrics(anomaly_scores(model, normal, config.seed),
                                   anomaly_scores(model, anomalous, config.seed))
        how = f"the evaluated model, which never saw class {anomaly_class}"
    else:
        def make_model():
            torch.manual_seed(config.seed)
            return vaemodels.build(model.name, model.input_shape, model.num_classes, **model.config.to_dict())

        result = held_out_class_detection(make_model, train.images, train.labels, normal, anomalous, anomaly_class,
                                          config.anomaly_steps, seed=config.seed)
        how = (f"a fresh {model.name!r} with the same config trained {config.anomaly_steps} steps without class "
               f"{anomaly_class} (the evaluated model saw every class)")
    note = (f"class {anomaly_class} as the anomaly, scored by {how}: {len(anomalous)} anomalous vs "
            f"{len(normal)} normal val samples")
    return {"anomaly_auroc": result["auroc"], "anomaly_average_precision": result["average_precision"]}, note


@torch.no_grad()
def embed(model, split: Split) -> torch.Tensor:
    """Deterministic codes (posterior means) of a split, with labels for conditional models."""
    return torch.cat([model.embed(split.images[i:i + BATCH], model.condition_on(split.labels[i:i + BATCH], all_known=True))
                      for i in range(0, len(split.images), BATCH)])


# ----------------------------------------------------------------------------------------------
# Figures, report, tracking
# ----------------------------------------------------------------------------------------------

FIGURE_CAPTIONS = {
    "samples.png": "Samples from the model's prior (conditional models: classes in turn).",
    "synthetic.png": "The synthetic set the metrics judged: one row per class (label as used for CAS; "
                     "-1 = unlabelled).",
    "reconstructions.png": "Real val images (top) and their reconstructions (bottom).",
    "interpolation.png": "Decoded straight lines between the codes of pairs of real val images.",
    "traversals.png": "Latent traversals: one row per dimension (highest KL first), values -3..3, the rest "
                      "fixed at a real image's code.",
    "latent_pca.png": "Posterior means projected on their first two principal components, coloured by label.",
}


@torch.no_grad()
def write_evaluation_figures(model, train: Split, val: Split, synthetic: Split | None, manifest: Manifest,
                             out: Path, seed: int) -> list[Path]:
    scale = display_scale(model.input_shape[-1])
    n = min(16, len(val.images))
    batch = {"image": val.images[:n], "label": val.labels[:n]}
    paths = list(write_figures(model, batch, out, seed=seed))  # samples, reconstructions, interpolation
    if synthetic is not None:
        rows = []
        for label in torch.unique(synthetic.labels)[:10]:
            rows.append(synthetic.images[synthetic.labels == label][:10])
        width = max(len(r) for r in rows)
        padded = [torch.cat([r, torch.ones(width - len(r), *r.shape[1:]) * 0.5]) for r in rows]
        paths.append(save_grid(torch.cat(padded), out / "synthetic.png", nrow=width, scale=scale))
    if model.is_variational:
        paths.append(save_traversals(model, val, out / "traversals.png", scale))
    paths.append(save_latent_pca(embed(model, Split(torch.cat([val.images, train.images])[:2000],
                                                    torch.cat([val.labels, train.labels])[:2000], None)),
                                 torch.cat([val.labels, train.labels])[:2000], manifest.class_names,
                                 out / "latent_pca.png"))
    return paths


def save_traversals(model, val: Split, path: Path, scale: int, max_dims: int = 8, steps: int = 9) -> Path:
    kl = model.kl_per_dimension(val.images[:BATCH], model.condition_on(val.labels[:BATCH], all_known=True))
    dims = torch.argsort(kl, descending=True)[:max_dims].tolist()
    images = model.traverse(val.images[:1], torch.linspace(-3.0, 3.0, steps), dims,
                            model.condition_on(val.labels[:1], all_known=True))
    return save_grid(images, path, nrow=steps, scale=scale)


def save_latent_pca(codes: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path) -> Path:
    """Scatter of the codes' first two principal components (a flat line for a 1-D code)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    codes = codes.double().numpy()
    projected = PCA(n_components=min(2, codes.shape[1]), random_state=0).fit_transform(codes)
    if projected.shape[1] == 1:
        projected = np.concatenate([projected, np.zeros_like(projected)], axis=1)
    figure = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(figure)  # draws without pyplot, so no global backend is touched
    axes = figure.add_subplot()
    labels = labels.numpy()
    for label in np.unique(labels):
        mask = labels == label
        name = class_names[label] if 0 <= label < len(class_names) else "unlabelled"
        axes.scatter(projected[mask, 0], projected[mask, 1], s=6, alpha=0.7, label=name)
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.set_title("Latent space (posterior means), PCA")
    if len(np.unique(labels)) <= 20:
        axes.legend(markerscale=2, fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    return path


REPORT_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td.v{font-family:monospace}
figure{margin:1.5em 0}img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}
.banner{background:#fdd;border:2px solid #c00;color:#700;padding:1em;margin:1em 0}.bad{color:#c00}.ok{color:#060}"""
# Sets the page title to "N/M images loaded" once the page has loaded, so a headless browser's
# --dump-dom shows whether every figure decoded (tests use it; people can ignore it).
REPORT_SCRIPT = """window.addEventListener("load", () => { const images = Array.from(document.images);
const loaded = images.filter(img => img.complete && img.naturalWidth > 0).length;
document.title = loaded + "/" + images.length + " images loaded"; });"""


def write_report(path: Path, model, manifest: Manifest, config: EvaluateConfig, metrics: dict[str, float],
                 non_finite: list[str], notes: dict[str, str], figures: list[Path],
                 reliability: Reliability | None = None, details: dict[str, Any] | None = None,
                 omitted: dict[str, str] | None = None) -> Path:
    """A self-contained HTML page: the reliability verdict (a red banner when the evaluator cannot
    judge), the metrics by section with usefulness first, notes, then the figures."""
    e = html.escape
    details, omitted = details or {}, omitted or {}
    unreliable = set(reliability.affected) if reliability is not None and not reliability.reliable else set()

    def order(k: str) -> tuple:
        return (list(METRIC_HELP).index(k) if k in METRIC_HELP else len(METRIC_HELP), k)

    def row(k: str, value: str) -> str:
        flag = ' <b class="bad">unreliable</b>' if k in unreliable else ""
        help_text = METRIC_HELP.get(k) or (f"Augmentation gain with {k.split('_')[-1].replace('pct', '%')} of real "
                                           "train (mean over seeds; _std: its spread)"
                                           if k.startswith("augmentation_gain_") else "")
        return f"<tr><th>{e(k)}</th><td class=v>{value}{flag}</td><td>{e(help_text)}</td></tr>"

    values = {**{k: f"{v:.6g}" for k, v in metrics.items()}, **{k: "not finite" for k in non_finite}}
    sections, placed = [], set()
    for title, belongs in SECTIONS:
        keys = sorted((k for k in values if k not in placed and belongs(k)), key=order)
        placed.update(keys)
        if keys:
            sections.append(f"<h3>{e(title)}</h3><table><tr><th>metric</th><th>value</th><th>what it measures</th>"
                            f"</tr>{''.join(row(k, values[k]) for k in keys)}</table>")
        if title.startswith("Usefulness") and details.get("cas_per_class"):
            cells = "".join(f"<tr><th>{e(name)}</th><td class=v>{v:.3f}</td></tr>"
                            for name, v in details["cas_per_class"].items())
            sections.append(f"<p>CAS per class (recall on real val images; low = the model fails that class):</p>"
                            f"<table><tr><th>class</th><th>CAS</th></tr>{cells}</table>")
    if omitted:
        reasons: dict[str, list[str]] = {}
        for key, why in omitted.items():
            reasons.setdefault(why, []).append(key)
        sections.append("<p>Omitted: " + "; ".join(f"{e(', '.join(keys))}: {e(why)}" for why, keys in reasons.items())
                        + "</p>")
    if reliability is None:
        banner = ""
    elif reliability.reliable:
        banner = f'<p class="ok">Reference classifier can judge: {e(reliability.reason)}.</p>'
    else:
        banner = (f'<div class="banner" id="unreliable"><b>UNRELIABLE: these numbers cannot be trusted.</b> '
                  f"{e(reliability.reason)}. Affected: {e(', '.join(reliability.affected))}.</div>")
    note_items = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in notes.items())
    figure_items = "".join(
        f'<figure><img src="{e(p.name)}" alt="{e(p.stem)}"><figcaption>{e(FIGURE_CAPTIONS.get(p.name, p.name))}'
        f"</figcaption></figure>" for p in figures)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {e(model.name)}</title>
<style>{REPORT_STYLE}</style><script>{REPORT_SCRIPT}</script></head><body>
<h1>Evaluation of a {e(model.name)} model</h1>
{banner}
<p>Model: <code>{e(str(config.model))}</code><br>Data: <code>{e(manifest.location)}</code>
({len(manifest.class_names)} classes, images {tuple(manifest.image_shape)})</p>
<h2>Metrics</h2>{''.join(sections)}
<h2>How they were measured</h2><ul>{note_items}<li><b>features</b>: FID and PRDC use the globally pooled last
stage of the reference classifier (a BatchNorm CNN trained on real train images with small random shifts,
stopped early on a held-out split of real train, at most {config.classifier_steps} steps); the real side is
images it did not train on. CAS, TRTR and both arms of every augmentation gain use the same network and
stopping rule.</li></ul>
<h2>Figures</h2>{figure_items}
</body></html>
"""
    path.write_text(page)
    return path


def log_to_mlflow(tracking_uri: str, run_id: str, metrics: dict[str, float], out: Path) -> None:
    """Metrics under their metrics.json names, and the whole out/ folder under `evaluation/`."""
    from mlflow.entities import Metric

    from pipelines.registry.tracking import connect

    client = connect(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.log_artifacts(run_id, str(out), ARTIFACT_PATH)
