"""Metrics for synthetic tables, each through the library that defines it: SDMetrics' quality report
(column shapes, column-pair trends), TSTR / TRTR with scikit-learn's HistGradientBoostingClassifier,
a detection AUROC (the same classifier telling real rows from synthetic ones, cross-validated) and
privacy: distance to the closest real training record (DCR) of synthetic rows against that of held-out
real rows, and the share of exact copies of training rows. Frames here hold the original columns.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

SDTYPES = {"continuous": "numerical", "categorical": "categorical", "boolean": "boolean"}


def sdmetrics_metadata(spec: dict[str, Any]) -> dict[str, Any]:
    columns = {c["name"]: {"sdtype": SDTYPES[c["kind"]]} for c in spec["columns"]}
    columns[spec["label"]] = {"sdtype": "boolean" if spec["label_dtype"] == "bool" else "categorical"}
    return {"columns": columns}


def quality_report(real: pd.DataFrame, synthetic: pd.DataFrame, spec: dict[str, Any]) -> tuple[dict[str, float], pd.DataFrame]:
    """SDMetrics' single-table QualityReport: overall score and its two properties, plus per-column shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sdmetrics.reports.single_table import QualityReport

        report = QualityReport()
        report.generate(real, synthetic, sdmetrics_metadata(spec), verbose=False)
    properties = dict(zip(report.get_properties()["Property"], report.get_properties()["Score"]))
    metrics = {"quality_score": float(report.get_score()),
               "column_shapes": float(properties["Column Shapes"]),
               "column_pair_trends": float(properties["Column Pair Trends"])}
    return metrics, report.get_details("Column Shapes")


def features(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """The modelled columns as HistGradientBoosting takes them: numbers as floats (NaN = missing, which it
    handles natively), categoricals and booleans as pandas categories over the fitted category list."""
    out = {}
    for column in spec["columns"]:
        values = frame[column["name"]]
        if column["kind"] == "continuous":
            out[column["name"]] = pd.to_numeric(values, errors="coerce").astype(float)
        else:
            categories = [str(c) for c in column["categories"]]
            out[column["name"]] = pd.Categorical(values.map(lambda v: None if pd.isna(v) else str(v)),
                                                 categories=categories)
    return pd.DataFrame(out)


def labels_of(frame: pd.DataFrame, spec: dict[str, Any]) -> np.ndarray:
    index = {name: i for i, name in enumerate(spec["class_names"])}
    return np.array([index.get(str(v), -1) for v in frame[spec["label"]]], dtype=np.int64)


def classifier(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=seed)


def tstr_trtr(train: pd.DataFrame, val: pd.DataFrame, synthetic: pd.DataFrame, spec: dict[str, Any],
              seed: int) -> dict[str, float]:
    """Accuracy and macro F1 on real val of the classifier trained on synthetic rows (TSTR) and on real
    train (TRTR), and their ratios."""
    from sklearn.metrics import accuracy_score, f1_score

    x_val, y_val = features(val, spec), labels_of(val, spec)
    out = {}
    for name, frame in (("trtr", train), ("tstr", synthetic)):
        y = labels_of(frame, spec)
        if len(np.unique(y)) < 2:
            predicted = np.full(len(y_val), y[0] if len(y) else 0)
        else:
            predicted = classifier(seed).fit(features(frame, spec), y).predict(x_val)
        out[f"{name}_accuracy"] = float(accuracy_score(y_val, predicted))
        out[f"{name}_f1"] = float(f1_score(y_val, predicted, average="macro"))
    out["tstr_ratio"] = out["tstr_accuracy"] / max(out["trtr_accuracy"], 1e-12)
    out["tstr_f1_ratio"] = out["tstr_f1"] / max(out["trtr_f1"], 1e-12)
    return out


def detection_auroc(real: pd.DataFrame, synthetic: pd.DataFrame, spec: dict[str, Any], seed: int,
                    folds: int = 5) -> float:
    """Cross-validated AUROC of a classifier telling real rows (0) from synthetic (1), label column
    included, on equal numbers of each: 0.5 = indistinguishable, 1 = always told apart."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    n = min(len(real), len(synthetic))
    real = real.iloc[rng.choice(len(real), n, replace=False)]
    synthetic = synthetic.iloc[rng.choice(len(synthetic), n, replace=False)]
    both = pd.concat([real, synthetic], ignore_index=True)
    x = features(both, spec)
    x["__label__"] = labels_of(both, spec).astype(float)
    y = np.r_[np.zeros(n), np.ones(n)]
    scores = np.zeros(len(y))
    for fit, held in StratifiedKFold(min(folds, n), shuffle=True, random_state=seed).split(x, y):
        scores[held] = classifier(seed).fit(x.iloc[fit], y[fit]).predict_proba(x.iloc[held])[:, 1]
    return float(roc_auc_score(y, scores))


def distance_matrix_features(frame: pd.DataFrame, reference: pd.DataFrame, spec: dict[str, Any]) -> np.ndarray:
    """Rows as numbers for distances (Gower-style): continuous columns scaled by the reference's range
    (missing = its own indicator), categoricals one-hot over the fitted categories, the label one-hot."""
    parts = []
    for column in spec["columns"]:
        values = frame[column["name"]]
        if column["kind"] == "continuous":
            x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            ref = pd.to_numeric(reference[column["name"]], errors="coerce").to_numpy(dtype=float)
            low, high = np.nanmin(ref), np.nanmax(ref)
            missing = np.isnan(x)
            parts.append(np.where(missing, 0.0, (x - low) / max(high - low, 1e-12))[:, None])
            if column["nullable"]:
                parts.append(missing[:, None].astype(float))
        else:
            parts.append(_one_hot([str(c) for c in column["categories"]], values))
    parts.append(_one_hot(spec["class_names"], frame[spec["label"]]))
    return np.hstack(parts)


def _one_hot(categories: list[str], values: pd.Series) -> np.ndarray:
    index = {c: i for i, c in enumerate(categories)}
    out = np.zeros((len(values), len(categories) + 1))  # the last slot: missing or unseen
    for row, value in enumerate(values):
        out[row, len(categories) if pd.isna(value) else index.get(str(value), len(categories))] = 1.0
    return out


def privacy(train: pd.DataFrame, holdout: pd.DataFrame, synthetic: pd.DataFrame, spec: dict[str, Any]
            ) -> dict[str, float]:
    """DCR (L1 distance, scaled as in `distance_matrix_features`) to the closest train row, for synthetic
    rows and for held-out real rows; medians, their ratio (~1: no closer than unseen real rows; -> 0:
    copies) and the share of exact copies of a train row (every column equal, missing matching missing)."""
    from sklearn.neighbors import NearestNeighbors

    reference = distance_matrix_features(train, train, spec)
    knn = NearestNeighbors(n_neighbors=1, metric="manhattan").fit(reference)
    synthetic_dcr = knn.kneighbors(distance_matrix_features(synthetic, train, spec))[0][:, 0]
    holdout_dcr = knn.kneighbors(distance_matrix_features(holdout, train, spec))[0][:, 0]
    names = [c["name"] for c in spec["columns"]] + [spec["label"]]
    train_keys = set(_row_keys(train[names]))
    return {
        "dcr_synthetic_median": float(np.median(synthetic_dcr)),
        "dcr_holdout_median": float(np.median(holdout_dcr)),
        "dcr_ratio": float(np.median(synthetic_dcr) / max(np.median(holdout_dcr), 1e-12)),
        "dcr_below_holdout_p05": float(np.mean(synthetic_dcr < np.quantile(holdout_dcr, 0.05))),
        "exact_copy_fraction": float(np.mean([k in train_keys for k in _row_keys(synthetic[names])])),
        "holdout_exact_copy_fraction": float(np.mean([k in train_keys for k in _row_keys(holdout[names])])),
    }


def _row_keys(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(_key(v) for v in row) for row in frame.itertuples(index=False)]


def _key(value: Any) -> Any:
    """Equal cells give equal keys whatever their dtype (3, 3.0 and np.int64(3) alike; NaN and None alike)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return round(float(value), 9)
    return str(value)
