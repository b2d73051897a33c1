"""Series plots as PNG files (matplotlib, Agg canvas): windows per class, real vs synthetic overlays,
reconstructions and interpolations of a series model; what training logs to MLflow for series data,
what generation's plots/ and the series report show. Values are plotted in the units given.
Not here: image grids (pipelines/figures.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# PNG metadata without the matplotlib version, so the same data gives the same bytes
PNG_METADATA = {"Software": None}


def _figure(rows: int, cols: int, width: float = 3.2, height: float = 1.8):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def plot_windows(groups: dict[str, np.ndarray], path: str | Path, channel_names: list[str] | None = None,
                 overlay: dict[str, np.ndarray] | None = None, title: str = "") -> Path:
    """One row per group (class), one column per channel; every window of a group drawn in its cell.
    `groups[name]` is (n, C, T). With `overlay` (same keys), those windows are drawn in another colour
    over them (real in grey, synthetic in colour: the report's comparison)."""
    names = list(groups)
    channels = next(iter(groups.values())).shape[1] if names else 1
    plt, fig, axes = _figure(max(1, len(names)), channels)
    for r, name in enumerate(names):
        for c in range(channels):
            ax = axes[r][c]
            for window in groups[name]:
                ax.plot(window[c], color="0.55" if overlay is not None else "C0", linewidth=0.8, alpha=0.8)
            if overlay is not None and name in overlay:
                for window in overlay[name]:
                    ax.plot(window[c], color="C3", linewidth=0.8, alpha=0.8)
            label = channel_names[c] if channel_names and c < len(channel_names) else f"channel {c}"
            ax.set_title(f"{name} · {label}" if channels > 1 else str(name), fontsize=8)
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def write_series_figures(model, batch: dict, folder: Path, seed: int = 0) -> list[Path]:
    """What training logs for a series model (the series counterpart of registry.tracking.write_figures):
    samples.png (a few per class), reconstructions.png (real grey, reconstruction red) and
    interpolation.png (decoded lines between two real windows' codes), in standardised units."""
    import torch

    windows, labels = batch["image"], batch["label"]
    folder = Path(folder)
    paths = []
    with torch.no_grad():
        if model.is_generative:
            per_class, classes = 4, model.num_classes or 1
            sample_labels = model.condition_on(torch.arange(per_class * classes) // per_class)
            drawn = model.sample(per_class * classes, labels=sample_labels,
                                 generator=torch.Generator().manual_seed(seed))[:, :, 0].cpu().numpy()
            groups = {f"class {c}" if model.num_classes else "samples": drawn[c * per_class:(c + 1) * per_class]
                      for c in range(classes)}
            paths.append(plot_windows(groups, folder / "samples.png", title="samples"))
        known = model.condition_on(labels, all_known=True)
        recon = model.reconstruct(windows, known)[:, :, 0].cpu().numpy()
        real = windows[:, :, 0].cpu().numpy()
        shown = min(4, len(real))
        paths.append(plot_windows({f"window {i}": real[i:i + 1] for i in range(shown)}, folder / "reconstructions.png",
                                  overlay={f"window {i}": recon[i:i + 1] for i in range(shown)},
                                  title="real (grey) and reconstruction (red)"))
        if len(real) >= 2:
            line = model.interpolate(windows[:2], 6, None if known is None else known[:2])[:, :, 0].cpu().numpy()
            paths.append(plot_windows({f"step {i}": line[i:i + 1] for i in range(len(line))},
                                      folder / "interpolation.png", title="interpolation between two windows"))
    return paths
