"""`vaepipe evaluate` for table datasets: a table model (and optionally a generated table) against the
real rows -> the same `metrics.json` + `report.html` + figures as for images, with the table metrics of
table_metrics.py. The synthetic rows are `--synthetic` (a `vaepipe generate` folder) or drawn here with
the train split's class mix (so TSTR learns the real class balance). Not here: the image metrics.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.config import ConfigError
from pipelines.evaluation import table_metrics
from pipelines.evaluation.table_report import correlation_figure, marginals_figure, write_table_report

METRICS_NAME, REPORT_NAME = "metrics.json", "report.html"


def _log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def read_split(manifest, split: str, limit: int, seed: int) -> pd.DataFrame:
    from pipelines.data.table_reader import read_table_shard

    frames = [read_table_shard(s.url) for s in manifest.shards(split)]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames, ignore_index=True).drop(columns=manifest.data["table"]["index_column"])
    if len(frame) > limit:
        frame = frame.iloc[np.sort(np.random.default_rng(seed).choice(len(frame), limit, replace=False))]
    return frame.reset_index(drop=True)


def read_synthetic_table(folder: str, spec: dict[str, Any], limit: int, seed: int) -> pd.DataFrame:
    """A `vaepipe generate` table folder (parquet/label=K/*.parquet); at most `limit` rows, seeded."""
    import pyarrow.dataset as ds

    root = Path(folder) / "parquet"
    if not root.is_dir():
        raise ConfigError(f"--synthetic {folder} holds no parquet/ folder (a `vaepipe generate` output)")
    frame = ds.dataset(str(root), format="parquet", partitioning="hive").to_table().to_pandas()
    names = [c["name"] for c in spec["columns"]]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ConfigError(f"--synthetic {folder} lacks the columns {', '.join(missing)} of the dataset")
    if spec["label"] not in frame.columns or spec["label"] == "label":
        from pipelines.batch.table_generate import label_values

        frame[spec["label"]] = label_values(spec, frame["label"].astype(np.int64).to_numpy())
    frame = frame[names + [spec["label"]]]
    if len(frame) > limit:
        frame = frame.iloc[np.sort(np.random.default_rng(seed).choice(len(frame), limit, replace=False))]
    return frame.reset_index(drop=True)


def draw_synthetic(model, train_labels: np.ndarray, count: int, seed: int) -> pd.DataFrame:
    """`count` rows from the model with labels drawn from the train split's class frequencies."""
    from pipelines.batch.table_generate import decode_rows

    rng = np.random.default_rng(seed)
    frequencies = np.bincount(train_labels, minlength=model.num_classes) / len(train_labels)
    labels = torch.as_tensor(rng.choice(model.num_classes, size=count, p=frequencies), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = torch.cat([model.sample(len(chunk), labels=model.condition_on(chunk), generator=generator).cpu()
                          for chunk in labels.split(1024)])
    return decode_rows(model.input_spec(), rows.numpy(), labels.numpy())


@torch.no_grad()
def model_metrics(model, manifest, split: str) -> dict[str, float]:
    """The model's own loss parts on a split (per row, nats of the encoded row)."""
    from pipelines.data.reader import open_stream

    rows, labels = [], []
    for sample in open_stream(manifest, split, shuffle_buffer=0):
        rows.append(sample[model.input_key])
        labels.append(sample["label"])
    if not rows:
        return {}
    torch.manual_seed(0)
    parts = model.loss({model.input_key: torch.stack(rows), "label": torch.stack(labels)})
    return {k: float(parts[k]) for k in ("elbo", "recon", "kl")}


def run_table_evaluation(config, model, manifest) -> dict[str, Any]:
    started = time.perf_counter()
    spec = manifest.data["table"]
    if model.modality != "table" or model.input_spec()["columns"] != spec["columns"]:
        raise ConfigError(f"the {model.name!r} model was not trained on this table's schema "
                          f"({manifest.location}): its columns or fitted transformer differ")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train = read_split(manifest, "train", config.max_real, config.seed)
    val = read_split(manifest, "val", config.max_real, config.seed)
    if len(val) < 2:
        raise ConfigError(f"{manifest.location} has {len(val)} val rows; table evaluation tests on real val rows: "
                          "rebuild with a larger --val-fraction")
    notes: dict[str, str] = {}
    if config.synthetic is not None:
        synthetic = read_synthetic_table(config.synthetic, spec, config.num_synthetic, config.seed)
        notes["synthetic"] = f"{len(synthetic)} rows read from {config.synthetic}"
    else:
        synthetic = draw_synthetic(model, table_metrics.labels_of(train, spec), config.num_synthetic, config.seed)
        notes["synthetic"] = f"{len(synthetic)} rows drawn from the model with the train split's class mix"
    _log(f"{model.name} on {manifest.location}: {len(train)} train / {len(val)} val / {len(synthetic)} synthetic rows")

    metrics: dict[str, float] = {}
    quality, shapes = table_metrics.quality_report(train, synthetic, spec)
    metrics.update(quality)
    notes["quality"] = "SDMetrics QualityReport (single table), synthetic vs real train rows"
    metrics.update(table_metrics.tstr_trtr(train, val, synthetic, spec, config.seed))
    notes["tstr"] = "HistGradientBoostingClassifier (scikit-learn defaults), trained on synthetic (TSTR) or real " \
                    "train (TRTR), tested on real val"
    metrics["detection_auroc"] = table_metrics.detection_auroc(train, synthetic, spec, config.seed)
    notes["detection"] = "HistGradientBoostingClassifier, 5-fold CV on equal numbers of real train and synthetic rows"
    metrics.update(table_metrics.privacy(train, val, synthetic, spec))
    notes["privacy"] = "L1 distance over range-scaled numbers and one-hot categories to the closest real train row; " \
                       "holdout = real val rows"
    metrics.update(model_metrics(model, manifest, "val"))
    _log(f"metrics done ({time.perf_counter() - started:.1f}s)")

    non_finite = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if k not in non_finite}
    figures = [marginals_figure(train, synthetic, spec, out / "marginals.png"),
               correlation_figure(train, synthetic, spec, out / "correlations.png")]
    document = {**metrics, "omitted": {}, "reliability": None, "modality": "table"}
    (out / METRICS_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    write_table_report(out / REPORT_NAME, model.name, manifest, metrics, notes, figures, shapes)
    if config.tracking_uri:
        from pipelines.evaluation.report import log_to_mlflow

        log_to_mlflow(config.tracking_uri, config.run_id, metrics, out)
    seconds = time.perf_counter() - started
    _log(f"done in {seconds:.1f}s: {out / REPORT_NAME}")
    return {"metrics": metrics, "out": str(out.resolve()), "metrics_path": str((out / METRICS_NAME).resolve()),
            "report": str((out / REPORT_NAME).resolve()), "figures": [f.name for f in figures],
            "non_finite": non_finite, "notes": notes, "seconds": round(seconds, 2), "reliability": None,
            "omitted": {}, "reference_classifier": None}
