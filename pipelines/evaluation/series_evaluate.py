"""`vaepipe evaluate` for a series dataset (`"modality": "series"`): a saved model and its synthetic
windows against the real ones -> the same `metrics.json`, `report.html` (+ PNG overlays of real and
synthetic windows per class) and MLflow logging as for images. Metrics: the model's ELBO / IWAE on val,
TSTR vs TRTR with MiniRocket, and TimeGAN's discriminative and predictive scores with their real-vs-real
baselines (series_metrics.py). Everything is computed on windows standardised per channel.
"""
from __future__ import annotations

import html
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import ConfigError
from pipelines.data.manifest import Manifest
from pipelines.data.series import normalisation
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.data import BATCH, load_split
from pipelines.evaluation.metrics.reliability import chance_accuracy, judge
from pipelines.evaluation.series_metrics import discriminative_score, minirocket_accuracy, predictive_score

METRICS_NAME, REPORT_NAME = "metrics.json", "report.html"
OVERLAY_PER_CLASS = 10  # windows of each kind drawn per class in the overlay figure


def _log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def read_synthetic_series(folder: str | Path, manifest: Manifest, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A series generate output's rows -> (standardised windows (N, C, T), labels), at most `limit` of them."""
    import pyarrow.dataset as ds

    root = Path(folder) / "parquet"
    if not root.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} has no parquet/ folder (make one with `vaepipe generate`)")
    dataset = ds.dataset(str(root), format="parquet", partitioning="hive")
    if "series" not in dataset.schema.names:
        raise ConfigError(f"synthetic folder {folder} holds no 'series' column: it is not a series generate output")
    table = dataset.to_table(columns=["series", "label"])
    if table.num_rows == 0:
        raise ConfigError(f"synthetic folder {folder} holds no rows")
    rows = np.arange(table.num_rows)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    values = np.asarray(table.column("series").take(rows).to_pylist(), dtype=np.float32)
    if values.shape[1:] != tuple(manifest.model_input[::2]):
        raise ConfigError(f"synthetic windows in {folder} have shape {values.shape[1:]}, the real data "
                          f"{tuple(manifest.model_input[::2])} (channels, steps)")
    mean, std = normalisation(manifest.data)
    labels = np.asarray(table.column("label").take(rows).to_numpy(), dtype=np.int64)
    return (values - mean) / std, labels


def sample_series(model, num_synthetic: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows drawn from the model (split evenly over classes when conditional), standardised units."""
    generator = torch.Generator().manual_seed(seed)
    if model.is_conditional:
        labels = torch.arange(num_classes).repeat_interleave(max(1, num_synthetic // num_classes))
    else:
        labels = torch.full((num_synthetic,), -1, dtype=torch.long)
    with torch.no_grad():
        windows = torch.cat([model.sample(len(chunk), labels=model.condition_on(chunk), generator=generator)
                             for chunk in labels.split(BATCH)])
    return windows[:, :, 0].numpy(), labels.numpy()


def run_series_evaluation(config: EvaluateConfig, model, manifest: Manifest) -> dict[str, Any]:
    from pipelines.evaluation.evaluate import likelihood_metrics

    started = time.perf_counter()
    if model.modality != manifest.modality:
        raise ConfigError(f"the {model.name!r} model reads {model.modality} data but {manifest.location} is a "
                          f"{manifest.modality} dataset (series models: timevae, ctimevae)")
    if tuple(model.input_shape) != tuple(manifest.model_input):
        raise ConfigError(f"the model takes windows of shape {tuple(model.input_shape)} but the dataset "
                          f"{manifest.location} holds {tuple(manifest.model_input)}")
    num_classes = manifest.num_classes
    if model.is_conditional and num_classes != model.num_classes:
        raise ConfigError(f"the {model.name!r} model has {model.num_classes} classes but the dataset has {num_classes}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = (load_split(manifest, s, config.max_real, config.seed) for s in ("train", "val"))
    real_train, real_val = train.images[:, :, 0].numpy(), val.images[:, :, 0].numpy()
    train_y, val_y = train.labels.numpy(), val.labels.numpy()
    _log(f"{model.name} on {manifest.location}: {len(real_train)} train / {len(real_val)} val windows")
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    omitted: dict[str, str] = {}
    details: dict[str, Any] = {}
    torch.manual_seed(config.seed)
    metrics.update(likelihood_metrics(model, val, config.iwae_k, config.iwae_subset))

    if config.synthetic is not None:
        synthetic, synthetic_y = read_synthetic_series(config.synthetic, manifest, config.num_synthetic, config.seed)
        notes["synthetic"] = f"{len(synthetic)} windows read from {config.synthetic}"
    elif model.is_generative:
        synthetic, synthetic_y = sample_series(model, config.num_synthetic, num_classes, config.seed)
        notes["synthetic"] = f"{len(synthetic)} windows drawn from the model"
    else:
        raise ConfigError(f"a {model.name!r} model cannot sample and no --synthetic folder was given")

    reliability = None
    if num_classes >= 2:
        metrics["trtr_accuracy"], _ = minirocket_accuracy(real_train, train_y, real_val, val_y, config.seed)
        metrics["reference_accuracy"] = metrics["trtr_accuracy"]
        metrics["reference_chance"] = chance_accuracy(torch.as_tensor(val_y))
        labelled = synthetic_y >= 0
        if labelled.any() and len(np.unique(synthetic_y[labelled])) >= 2:
            metrics["tstr_accuracy"], predicted = minirocket_accuracy(synthetic[labelled], synthetic_y[labelled],
                                                                      real_val, val_y, config.seed)
            metrics["cas"] = metrics["tstr_accuracy"]
            metrics["cas_ratio"] = metrics["cas"] / metrics["trtr_accuracy"] if metrics["trtr_accuracy"] else math.nan
            per_class = {manifest.class_names[c]: float((predicted[val_y == c] == c).mean())
                         for c in range(num_classes) if (val_y == c).any()}
            details["cas_per_class"] = per_class
            metrics["cas_worst_class"] = min(per_class.values())
            notes["tstr"] = (f"MiniRocket (aeon, {len(real_train)} real train windows for TRTR, "
                             f"{int(labelled.sum())} labelled synthetic windows for TSTR) + ridge classifier, "
                             f"tested on {len(real_val)} real val windows")
        else:
            why = "the synthetic windows carry fewer than two class labels (an unconditional model)"
            omitted.update({k: why for k in ("tstr_accuracy", "cas", "cas_ratio", "cas_per_class")})
        _log(f"TRTR {metrics['trtr_accuracy']:.3f}" + (f", TSTR {metrics['tstr_accuracy']:.3f}"
                                                      if "tstr_accuracy" in metrics else "")
             + f" ({time.perf_counter() - started:.1f}s)")
        reliability = judge(metrics["reference_accuracy"], metrics["reference_chance"], config.reliability_floor,
                            [*metrics, *details])
        metrics["reference_reliable"] = float(reliability.reliable)
    else:
        notes["tstr"] = "the dataset has fewer than two classes: TSTR / TRTR omitted"

    steps = config.classifier_steps
    scores: dict[str, list[float]] = {k: [] for k in ("disc", "disc_base", "pred", "pred_base")}
    for s in range(config.seeds):
        seed = config.seed + s
        scores["disc"].append(discriminative_score(real_train, synthetic, steps, seed))
        scores["disc_base"].append(discriminative_score(real_train, real_val, steps, seed))
        scores["pred"].append(predictive_score(synthetic, real_val, steps, seed))
        scores["pred_base"].append(predictive_score(real_train, real_val, steps, seed))
    for key, name in (("disc", "discriminative_score"), ("disc_base", "discriminative_score_real_baseline"),
                      ("pred", "predictive_score"), ("pred_base", "predictive_score_real_baseline")):
        metrics[name], metrics[name + "_std"] = float(np.mean(scores[key])), float(np.std(scores[key]))
    notes["discriminative_score"] = (
        f"TimeGAN: |accuracy - 0.5| of a 1-D CNN telling real train windows from synthetic ones ({steps} Adam steps, "
        f"20% of each held out), mean over {config.seeds} seeds; the baseline tells real train from real val "
        "(what a perfect generator would score on this much data)")
    notes["predictive_score"] = (
        f"TimeGAN: MAE on real val windows of a causal 1-D CNN trained ({steps} steps) on synthetic windows to predict each "
        f"next step (standardised units), mean over {config.seeds} seeds; the baseline trains on real train")
    _log(f"discriminative {metrics['discriminative_score']:.3f} (real baseline "
         f"{metrics['discriminative_score_real_baseline']:.3f}), predictive {metrics['predictive_score']:.3f} "
         f"(baseline {metrics['predictive_score_real_baseline']:.3f}) ({time.perf_counter() - started:.1f}s)")

    non_finite = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if k not in non_finite}
    figures = write_series_evaluation_figures(real_val, val_y, synthetic, synthetic_y, manifest, out)
    document = {**metrics, **details, "omitted": omitted, "modality": "series",
                "reliability": reliability.to_dict() if reliability is not None else None}
    (out / METRICS_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    write_series_report(out / REPORT_NAME, model, manifest, metrics, notes, figures, reliability, omitted)
    if config.tracking_uri:
        from pipelines.evaluation.report import log_to_mlflow

        log_to_mlflow(config.tracking_uri, config.run_id, metrics, out)
    seconds = time.perf_counter() - started
    _log(f"done in {seconds:.1f}s: {out / REPORT_NAME}")
    return {"metrics": metrics, "out": str(out.resolve()), "metrics_path": str((out / METRICS_NAME).resolve()),
            "report": str((out / REPORT_NAME).resolve()), "figures": [f.name for f in figures],
            "non_finite": non_finite, "notes": notes, "seconds": round(seconds, 2),
            "reliability": document["reliability"], "omitted": omitted, **details,
            "reference_classifier": None}  # MiniRocket is refitted each time; nothing to save for --filter-classifier


def write_series_evaluation_figures(real: np.ndarray, real_y: np.ndarray, synthetic: np.ndarray,
                                    synthetic_y: np.ndarray, manifest: Manifest, out: Path) -> list[Path]:
    """overlay.png: per class, real val windows (grey) under synthetic ones (red), in the data's units."""
    from pipelines.series_figures import plot_windows

    mean, std = normalisation(manifest.data)
    names = manifest.class_names or ["all"]
    real_groups, synthetic_groups = {}, {}
    for c, name in enumerate(names):
        r = real[real_y == c] if manifest.class_names else real
        s = synthetic[synthetic_y == c] if manifest.class_names else synthetic
        real_groups[name] = r[:OVERLAY_PER_CLASS] * std + mean
        if len(s):
            synthetic_groups[name] = s[:OVERLAY_PER_CLASS] * std + mean
    channel_names = manifest.data["series"].get("channel_names")
    return [plot_windows(real_groups, out / "overlay.png", channel_names, overlay=synthetic_groups,
                         title="real val (grey) and synthetic (red) windows per class")]


def write_series_report(path: Path, model, manifest: Manifest, metrics: dict[str, float], notes: dict[str, str],
                        figures: list[Path], reliability, omitted: dict[str, str]) -> None:
    banner = ""
    if reliability is not None and not reliability.reliable:
        banner = f'<p style="background:#fdd;padding:8px"><b>Unreliable:</b> {html.escape(reliability.reason)}</p>'
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in metrics.items())
    note_rows = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in notes.items())
    omitted_rows = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in omitted.items())
    images = "".join(f'<p><img src="{html.escape(f.name)}" alt="{html.escape(f.stem)}"></p>' for f in figures)
    series = manifest.data["series"]
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>vaepipe series evaluation</title></head>
<body><h1>{html.escape(model.name)} on {html.escape(manifest.location)}</h1>{banner}
<p>{manifest.num_classes} classes, {series['channels']} channel(s) x {series['length']} steps</p>
<h2>Real vs synthetic</h2>{images}
<h2>Metrics</h2><table border="1" cellpadding="3">{rows}</table>
<h2>How each was measured</h2><ul>{note_rows}</ul>
{f'<h2>Omitted</h2><ul>{omitted_rows}</ul>' if omitted else ''}
</body></html>
""")
