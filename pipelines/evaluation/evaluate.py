"""`vaepipe evaluate`: one saved model (and optionally a generated dataset) against the real data
it was trained on -> `metrics.json` (flat numbers), `report.html` and PNG figures in one folder,
optionally logged to an MLflow run. The metrics live in metrics/, the data it reads in data.py, the
figures and the HTML in report.py; this module decides which metrics apply and runs them in order.
Not here: resolving models:/ URIs (pipelines.registry.pull gives the folder).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vaemodels
from pipelines.config import ConfigError
from pipelines.data import read_manifest
from pipelines.data.manifest import Manifest
from pipelines.evaluation.config import EvaluateConfig, fraction_key
from pipelines.evaluation.data import BATCH, Split, early_stopping_split, embed, load_split, read_synthetic
from pipelines.evaluation.metrics import (accuracy, anomaly_scores, augmentation_gain, detection_metrics, features,
                                          fit_classifier, frechet_distance, held_out_class_detection, memorisation,
                                          mutual_information_gap, per_class_accuracy,
                                          precision_recall_density_coverage, save_classifier)
from pipelines.evaluation.metrics.reliability import chance_accuracy, judge
from pipelines.evaluation.report import log_to_mlflow, write_evaluation_figures, write_report
from vaemodels.distributions import active_units


METRICS_NAME, REPORT_NAME = "metrics.json", "report.html"
CLASSIFIER_DIR = "reference_classifier"  # OUT/<this>: the reference classifier (generate --filter-classifier takes it)
IWAE_BATCH = 16  # images per IWAE pass: k samples each, so k x 16 decodes at once
# dataset modality -> its evaluator ("module:function", called with (config, model, manifest)); images: below
EVALUATORS = {"table": "pipelines.evaluation.table_evaluate:run_table_evaluation",
              "series": "pipelines.evaluation.series_evaluate:run_series_evaluation"}


def _log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate per `config`; returns the metrics, where the files are and how each part was measured."""
    started = time.perf_counter()
    model = vaemodels.load_model(config.model)  # eval mode, CPU
    manifest = read_manifest(config.data)
    if manifest.modality in EVALUATORS:
        import importlib

        module, _, function = EVALUATORS[manifest.modality].partition(":")
        return getattr(importlib.import_module(module), function)(config, model, manifest)
    if model.modality != manifest.modality:
        raise ConfigError(f"the {model.name!r} model reads {model.modality} data but {manifest.location} is an "
                          f"{manifest.modality} dataset")
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


def check_model_fits(model: vaemodels.AutoEncoderModel, manifest: Manifest) -> None:
    """ConfigError unless the dataset's images are the model's input shape and, for a conditional
    model, its classes are the model's number of classes."""
    if tuple(model.input_shape) != tuple(manifest.image_shape):
        raise ConfigError(f"the model takes images of shape {tuple(model.input_shape)} but the dataset "
                          f"{manifest.location} holds {tuple(manifest.image_shape)}")
    if model.is_conditional and manifest.num_classes != model.num_classes:
        raise ConfigError(f"the {model.name!r} model has {model.num_classes} classes but the dataset has "
                          f"{manifest.num_classes}")


def _check_fits(model: vaemodels.AutoEncoderModel, manifest: Manifest, config: EvaluateConfig) -> int:
    """The dataset's class count, once the model, the dataset and the request are known to fit together."""
    check_model_fits(model, manifest)
    if config.held_out_class is not None and config.held_out_class >= manifest.num_classes:
        raise ConfigError(f"held_out_class {config.held_out_class} is not a class of the dataset "
                          f"({manifest.num_classes} classes)")
    return manifest.num_classes


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


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
        images = torch.cat([model.temper_pixels(model.sample(len(chunk), labels=model.condition_on(chunk),
                                                             generator=generator), config.pixel_temperature)
                            for chunk in labels.split(BATCH)]).cpu()
        # stored synthetic data is 8-bit PNG (pipelines/batch/generate.py): judge the same pixels
        synthetic = Split((images * 255).round().clamp(0, 255) / 255, labels, None)
    else:
        return None, f"none: a {model.name!r} model cannot sample and no synthetic folder was given"
    return synthetic, source


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


# ----------------------------------------------------------------------------------------------
# Figures, report, tracking
# ----------------------------------------------------------------------------------------------


