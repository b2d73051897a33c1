"""What an evaluation shows: the figures (samples, synthetic rows, reconstructions, interpolations,
traversals, latent PCA), the self-contained report.html (metrics by section, usefulness first, the
reliability verdict) and logging both to an MLflow run. Not here: computing the metrics."""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.data.manifest import Manifest
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.data import BATCH, Split, embed
from pipelines.evaluation.metrics.reliability import Reliability
from pipelines.figures import display_scale, save_grid
from pipelines.registry.tracking import write_figures


ARTIFACT_PATH = "evaluation"  # where out/ lands in the MLflow run's artifacts


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


FIGURE_CAPTIONS = {
    "samples.png": "Samples from the model's prior as `vaepipe generate` writes them by default (pixel temperature "
                   "0.25); conditional models: one row per class.",
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

