"""Figures and the HTML report of a table evaluation: marginal histograms (real vs synthetic, one panel
per column) and correlation heatmaps (real, synthetic, and their difference), plus the figures a
training run logs for a table model (the same marginals, real val rows vs rows sampled from the model).
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def marginals_figure(real: pd.DataFrame, synthetic: pd.DataFrame, spec: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    names = [c["name"] for c in spec["columns"]] + [spec["label"]]
    kinds = {c["name"]: c["kind"] for c in spec["columns"]}
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        if kinds.get(name) == "continuous":
            r = pd.to_numeric(real[name], errors="coerce").dropna()
            s = pd.to_numeric(synthetic[name], errors="coerce").dropna()
            bins = np.histogram_bin_edges(pd.concat([r, s]), bins=30) if len(r) + len(s) else 10
            ax.hist(r, bins=bins, alpha=0.5, density=True, label="real")
            ax.hist(s, bins=bins, alpha=0.5, density=True, label="synthetic")
        else:
            r = real[name].astype(object).where(real[name].notna(), "<missing>").astype(str).value_counts(normalize=True)
            s = synthetic[name].astype(object).where(synthetic[name].notna(), "<missing>").astype(str)\
                .value_counts(normalize=True)
            keys = sorted(set(r.index) | set(s.index))[:20]
            x = np.arange(len(keys))
            ax.bar(x - 0.2, [r.get(k, 0) for k in keys], 0.4, label="real")
            ax.bar(x + 0.2, [s.get(k, 0) for k in keys], 0.4, label="synthetic")
            ax.set_xticks(x, keys, rotation=30, fontsize=7)
        missing = f" (missing: real {real[name].isna().mean():.0%}, syn {synthetic[name].isna().mean():.0%})" \
            if real[name].isna().any() or synthetic[name].isna().any() else ""
        ax.set_title(f"{name}{missing}", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def numeric_view(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Every column as a number for correlations: continuous as is, booleans 0/1, categoricals by their
    index in the fitted category list (an ordinal view: a heatmap reads it as association, roughly)."""
    out = {}
    for column in spec["columns"]:
        values = frame[column["name"]]
        if column["kind"] == "continuous":
            out[column["name"]] = pd.to_numeric(values, errors="coerce")
        else:
            index = {str(c): i for i, c in enumerate(column["categories"])}
            out[column["name"]] = values.map(lambda v: np.nan if pd.isna(v) else index.get(str(v), np.nan))
    index = {c: i for i, c in enumerate(spec["class_names"])}
    out[spec["label"]] = frame[spec["label"]].map(lambda v: index.get(str(v), np.nan))
    return pd.DataFrame(out).astype(float)


def correlation_figure(real: pd.DataFrame, synthetic: pd.DataFrame, spec: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    corr_real = numeric_view(real, spec).corr().fillna(0)
    corr_syn = numeric_view(synthetic, spec).corr().fillna(0)
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    for ax, matrix, title in ((axes[0], corr_real, "real"), (axes[1], corr_syn, "synthetic"),
                              (axes[2], corr_syn - corr_real, "synthetic - real")):
        image = ax.imshow(matrix.to_numpy(), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_xticks(range(len(matrix)), matrix.columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(matrix)), matrix.columns, fontsize=7)
        ax.set_title(f"Pearson correlation: {title}")
    fig.colorbar(image, ax=axes, shrink=0.7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def write_training_figures(model, batch: dict[str, Any], folder: Path, seed: int = 0) -> list[Path]:
    """A training run's figures for a table model: marginals of real rows (the batch) vs sampled ones."""
    import torch

    from pipelines.batch.table_generate import decode_rows

    spec = model.input_spec()
    rows, labels = batch[model.input_key].float().cpu().numpy(), batch["label"].cpu().numpy()
    real = decode_rows(spec, rows, labels)
    generator = torch.Generator().manual_seed(seed)
    n = 64 * model.num_classes
    drawn = torch.arange(n) % model.num_classes
    with torch.no_grad():
        sampled = model.sample(n, labels=model.condition_on(drawn), generator=generator).float().cpu().numpy()
    synthetic = decode_rows(spec, sampled, drawn.numpy())
    return [marginals_figure(real, synthetic, spec, Path(folder) / "samples.png")]


def write_table_report(path: Path, model_name: str, manifest, metrics: dict[str, float], notes: dict[str, str],
                       figures: list[Path], shapes: pd.DataFrame | None) -> Path:
    groups = [
        ("Fidelity (SDMetrics quality report)", ["quality_score", "column_shapes", "column_pair_trends"]),
        ("Usefulness (HistGradientBoosting, tested on real val)", ["tstr_accuracy", "trtr_accuracy", "tstr_ratio",
                                                                  "tstr_f1", "trtr_f1", "tstr_f1_ratio"]),
        ("Detection (real vs synthetic, 5-fold AUROC; 0.5 = indistinguishable)", ["detection_auroc"]),
        ("Privacy (distance to the closest train record)", ["dcr_synthetic_median", "dcr_holdout_median", "dcr_ratio",
                                                            "dcr_below_holdout_p05", "exact_copy_fraction",
                                                            "holdout_exact_copy_fraction"]),
        ("Model", ["elbo", "recon", "kl"]),
    ]
    parts = [f"<html><head><meta charset='utf-8'><title>vaepipe table evaluation</title></head><body>",
             f"<h1>{html.escape(model_name)} on {html.escape(manifest.location)}</h1>",
             f"<p>{len(manifest.data['table']['columns'])} columns, label {html.escape(manifest.data['table']['label'])} "
             f"({len(manifest.class_names)} classes)</p>"]
    for title, keys in groups:
        rows = "".join(f"<tr><td>{k}</td><td>{metrics[k]:.4f}</td></tr>" for k in keys if k in metrics)
        if rows:
            parts.append(f"<h2>{html.escape(title)}</h2><table border='1' cellpadding='4'>{rows}</table>")
    if shapes is not None:
        parts.append("<h2>Column shapes</h2>" + shapes.to_html(index=False, float_format=lambda v: f"{v:.3f}"))
    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
                                                for k, v in notes.items()) + "</ul>")
    for figure in figures:
        parts.append(f"<h2>{html.escape(figure.stem)}</h2><img src='{html.escape(figure.name)}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
