"""The column transformer of table datasets (TVAE's, Xu et al. 2019): `fit_columns` learns it from the
train split at build time, `encode` turns rows into the float vectors a table model reads, `decode`
turns the model's rows back into a DataFrame with the original column names, dtypes and categories.

Continuous columns get mode-specific normalisation: a variational (Dirichlet-process) Gaussian mixture
(scikit-learn's BayesianGaussianMixture, 10 components, those with weight > 0.005 kept) per column; a
value is its most likely mode's one-hot plus alpha = (x - mu) / (4 sigma) clipped to [-0.99, 0.99].
Categorical and boolean columns are one-hot. A column with missing values gets one more one-hot slot,
"missing". A category the transformer never saw encodes as an all-zero group (it adds nothing to the
loss) and can never be generated. The fitted transformer is plain JSON (means, stds, weights,
categories): it is stored in the manifest and in every model's config.json, never pickled.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from vaemodels.tvae import column_layout

MAX_MODES = 10  # TVAE's n_clusters
MODE_WEIGHT_FLOOR = 0.005  # TVAE's weight_threshold: smaller mixture components are dropped
GMM_FIT_ROWS = 20_000  # a column's mixture is fitted on at most this many (seeded) values


def fit_columns(frame: pd.DataFrame, columns: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The transformer's parameters for each column (name, kind, dtype, nullable given), fitted on `frame`."""
    fitted = []
    for column in columns:
        values = frame[column["name"]]
        present = values.dropna()
        out = {**column, "nullable": bool(values.isna().any())}
        if column["kind"] == "continuous":
            numbers = present.to_numpy(dtype=np.float64)
            out["modes"] = _fit_modes(numbers, seed)
            out["min"], out["max"] = (float(numbers.min()), float(numbers.max())) if len(numbers) else (0.0, 0.0)
            out["integer"] = bool(len(numbers)) and bool(np.all(numbers == np.round(numbers))) \
                and column["dtype"].lower().startswith(("int", "uint"))
            out["decimals"] = _decimals(numbers)
        elif column["kind"] == "boolean":
            out["categories"] = [False, True]
        else:
            out["categories"] = sorted({_category(v) for v in present}, key=_sort_key)
        fitted.append(out)
    return fitted


def _fit_modes(numbers: np.ndarray, seed: int) -> dict[str, list[float]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import BayesianGaussianMixture

    if len(numbers) == 0:
        return {"means": [0.0], "stds": [1.0], "weights": [1.0]}
    if len(numbers) > GMM_FIT_ROWS:
        numbers = np.random.default_rng(seed).choice(numbers, GMM_FIT_ROWS, replace=False)
    distinct = len(np.unique(numbers))
    spread = float(numbers.std()) or 1.0
    if distinct < 2:
        return {"means": [float(numbers[0])], "stds": [spread], "weights": [1.0]}
    gmm = BayesianGaussianMixture(n_components=min(MAX_MODES, distinct), weight_concentration_prior_type="dirichlet_process",
                                  weight_concentration_prior=0.001, max_iter=100, n_init=1, random_state=seed)
    with warnings.catch_warnings():  # a mixture on few distinct values often stops short of tol: fine here
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(numbers.reshape(-1, 1))
    keep = gmm.weights_ > MODE_WEIGHT_FLOOR
    # a floor on each std keeps alpha finite for a mode that sits on one repeated value
    stds = np.maximum(np.sqrt(gmm.covariances_.reshape(-1)), 1e-3 * spread)
    weights = gmm.weights_[keep] / gmm.weights_[keep].sum()
    return {"means": gmm.means_.reshape(-1)[keep].tolist(), "stds": stds[keep].tolist(), "weights": weights.tolist()}


def _decimals(numbers: np.ndarray) -> int | None:
    """How many decimals every value has (at most 6): generated values are rounded to it."""
    for decimals in range(7):
        if np.allclose(numbers, np.round(numbers, decimals), rtol=0, atol=1e-9):
            return decimals
    return None


def _category(value: Any) -> Any:
    """Categories as JSON keeps them: numpy scalars become Python ones."""
    return value.item() if isinstance(value, np.generic) else value


def _sort_key(value: Any):
    return (type(value).__name__, value)


def encoded_width(columns: list[dict[str, Any]]) -> int:
    _, start, width = column_layout(columns)[-1]
    return start + width


def encode(frame: pd.DataFrame, columns: list[dict[str, Any]]) -> np.ndarray:
    """Rows -> float32 (N, width) in the layout of `vaemodels.tvae.column_layout`."""
    out = np.zeros((len(frame), encoded_width(columns)), dtype=np.float32)
    spans = iter(column_layout(columns))
    rows = np.arange(len(frame))
    for column in columns:
        values = frame[column["name"]]
        missing = values.isna().to_numpy()
        if column["kind"] == "continuous":
            (_, alpha_at, _), (_, start, _) = next(spans), next(spans)
            means, stds = np.array(column["modes"]["means"]), np.array(column["modes"]["stds"])
            weights = np.array(column["modes"]["weights"])
            x = values.to_numpy(dtype=np.float64, na_value=np.nan)
            filled = np.where(missing, means[0], x)[:, None]
            log_post = np.log(weights) - np.log(stds) - 0.5 * ((filled - means) / stds) ** 2
            mode = log_post.argmax(1)
            alpha = np.clip((filled[:, 0] - means[mode]) / (4 * stds[mode]), -0.99, 0.99)
            out[:, alpha_at] = np.where(missing, 0.0, alpha)
            slot = np.where(missing, len(means), mode)
            out[rows, start + slot] = 1.0
        else:
            _, start, _ = next(spans)
            categories = column["categories"]
            index = {c: i for i, c in enumerate(categories)}
            boolean = column["kind"] == "boolean"
            slot = np.array([len(categories) if m else index.get(bool(v) if boolean else _category(v), -1)
                             for v, m in zip(values.astype(object), missing)], dtype=np.int64)
            known = slot >= 0  # -1: a category the transformer never saw encodes as an all-zero group
            out[rows[known], start + slot[known]] = 1.0
    return out


def decode(encoded: np.ndarray, columns: list[dict[str, Any]]) -> pd.DataFrame:
    """Model rows (N, width) -> a DataFrame with the original names and dtypes. Each one-hot group is read
    by its argmax, so decoding a row that `encode` wrote gives the row back (continuous values to the
    float rounding of alpha, then rounded to the column's decimals; missing values as missing)."""
    spans = iter(column_layout(columns))
    data = {}
    for column in columns:
        if column["kind"] == "continuous":
            (_, alpha_at, _), (_, start, width) = next(spans), next(spans)
            means, stds = np.array(column["modes"]["means"]), np.array(column["modes"]["stds"])
            slot = encoded[:, start:start + width].argmax(1)
            mode = np.minimum(slot, len(means) - 1)
            x = np.clip(encoded[:, alpha_at].astype(np.float64), -1, 1) * 4 * stds[mode] + means[mode]
            x = np.clip(x, column["min"], column["max"])
            if column.get("decimals") is not None:
                x = np.round(x, column["decimals"])
            missing = slot == len(means)
            data[column["name"]] = _restore_numbers(x, missing, column)
        else:
            _, start, width = next(spans)
            categories = column["categories"]
            slot = encoded[:, start:start + width].argmax(1)
            missing = slot == len(categories)
            picked = [None if m else categories[s] for s, m in zip(slot, missing)]
            data[column["name"]] = _restore_categories(picked, missing, column)
    return pd.DataFrame(data)


def _restore_numbers(x: np.ndarray, missing: np.ndarray, column: dict[str, Any]) -> pd.Series:
    dtype = column["dtype"]
    if column.get("integer"):
        values = np.round(x).astype(np.int64)
        if missing.any() or column["nullable"]:
            return pd.Series(pd.array(np.where(missing, 0, values), dtype="Int64")).mask(missing)
        return pd.Series(values.astype(dtype))
    values = np.where(missing, np.nan, x)
    return pd.Series(values.astype(dtype if dtype.startswith("float") else "float64"))


def _restore_categories(picked: list[Any], missing: np.ndarray, column: dict[str, Any]) -> pd.Series:
    if column["kind"] == "boolean":
        if column["nullable"]:
            return pd.Series(pd.array(picked, dtype="boolean"))
        return pd.Series(np.array(picked, dtype=bool))
    series = pd.Series(picked, dtype=object)
    dtype = column["dtype"]
    if dtype.startswith(("int", "Int", "uint")):
        return series.astype("Int64" if column["nullable"] else dtype)
    if dtype.startswith("float"):
        return series.astype(dtype)
    return series  # strings stay Python strings (object), None where missing
