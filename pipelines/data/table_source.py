"""Table sources the data builder understands: `parquet:PATH`, `csv:PATH` and the built-in
`student_placements` (the mixed-type table sdmetrics ships: numeric, categorical, boolean columns and
missing values; label `placed`). Each becomes a `TableSource`: the rows, the label column, and every
other column's kind (continuous | categorical | boolean), inferred from its dtype and overridable.

Not here: splitting, the column transformer (table_transform.py), shard writing (table_build.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.data.sources import SourceError, limited

KINDS = ("continuous", "categorical", "boolean", "drop")  # what --column-types may say; drop = leave the column out


@dataclass
class TableSource:
    name: str
    frame: pd.DataFrame  # the modelled columns plus the label column, in source order
    label: str
    label_dtype: str
    columns: list[dict[str, Any]]  # {"name", "kind", "dtype"} of every modelled column (not the label)
    class_names: list[str]
    labels: np.ndarray  # int64 class index per row
    source_index: np.ndarray  # each row's position in the whole source (its shard key)

    @property
    def num_samples(self) -> int:
        return len(self.frame)


def _student_placements() -> tuple[pd.DataFrame, str, dict[str, str]]:
    import sdmetrics

    path = Path(sdmetrics.__file__).parent / "demos" / "single_table" / "student_placements_real.csv"
    # an id and three dates: not features (dates are not a supported column kind yet)
    drop = {"student_id": "drop", "start_date": "drop", "end_date": "drop"}
    return pd.read_csv(path), "placed", drop


BUILTIN_TABLES = {"student_placements": _student_placements}
PATH_TABLES = {"parquet": lambda path: pd.read_parquet(path), "csv": lambda path: pd.read_csv(path)}


def is_table_source(spec: str) -> bool:
    kind, sep, _ = spec.partition(":")
    return spec in BUILTIN_TABLES or (bool(sep) and kind in PATH_TABLES)


def parse_column_types(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """`NAME=KIND` items (--column-types) -> {name: kind}; SourceError on a bad item."""
    out = {}
    for item in items or ():
        name, sep, kind = item.partition("=")
        if not sep or not name or kind not in KINDS:
            raise SourceError(f"--column-types {item!r}: use NAME=KIND with KIND one of {', '.join(KINDS)}")
        out[name] = kind
    return out


def open_table_source(spec: str, label: str | None, column_types: dict[str, str] | None = None,
                      limit: int | None = None, seed: int = 0) -> TableSource:
    column_types = dict(column_types or {})
    if spec in BUILTIN_TABLES:
        frame, default_label, defaults = BUILTIN_TABLES[spec]()
        label = label or default_label
        column_types = {**defaults, **column_types}
    else:
        kind, _, path = spec.partition(":")
        if not Path(path).exists():
            raise SourceError(f"--source {spec}: {path} does not exist")
        try:
            frame = PATH_TABLES[kind](path)
        except Exception as exc:  # pandas/pyarrow raise many types on unreadable files
            raise SourceError(f"--source {spec}: cannot read it as {kind}: {str(exc).splitlines()[0]}") from None
    if label is None:
        raise SourceError(f"--source {spec} is a table: name its class column with --label COLUMN")
    names = [str(c) for c in frame.columns]
    if label not in names:
        raise SourceError(f"--label {label!r} is not a column of {spec}; its columns: {', '.join(names)}")
    unknown = sorted(set(column_types) - set(names))
    if unknown:
        raise SourceError(f"--column-types names {', '.join(unknown)}, not columns of {spec}; its columns: "
                          f"{', '.join(names)}")
    if frame[label].isna().any():
        raise SourceError(f"--label column {label!r} has {int(frame[label].isna().sum())} missing values; "
                          "every row needs a class")
    if len(frame) == 0:
        raise SourceError(f"--source {spec} has no rows")
    keep = limited(len(frame), limit, seed)
    frame = frame.iloc[keep].reset_index(drop=True)

    columns = []
    for name in names:
        if name == label:
            continue
        kind = column_types.get(name) or infer_kind(frame[name], name)
        if kind == "drop":
            continue
        frame[name] = _as_kind(frame[name], name, kind)
        columns.append({"name": name, "kind": kind, "dtype": str(frame[name].dtype)})
    if not columns:
        raise SourceError(f"--source {spec}: no columns left to model besides the label {label!r}")
    values = [_label_key(v) for v in frame[label]]
    class_names = sorted(set(values), key=lambda v: (type(v).__name__, v))
    if len(class_names) < 2:
        raise SourceError(f"--label column {label!r} has a single class ({class_names[0]!r}); it needs at least 2")
    index = {v: i for i, v in enumerate(class_names)}
    labels = np.array([index[v] for v in values], dtype=np.int64)
    frame = frame[[c["name"] for c in columns] + [label]]
    return TableSource(spec, frame, label, str(frame[label].dtype), columns, [str(c) for c in class_names],
                       labels, np.asarray(keep, dtype=np.int64))


def _label_key(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def infer_kind(values: pd.Series, name: str) -> str:
    """bool -> boolean, numbers -> continuous, strings -> categorical; SourceError on anything else
    (dates, lists) or on a text column that mixes numbers and words."""
    if pd.api.types.is_bool_dtype(values):
        return "boolean"
    if pd.api.types.is_numeric_dtype(values):
        return "continuous"
    if pd.api.types.is_datetime64_any_dtype(values) or isinstance(values.dtype, pd.PeriodDtype):
        raise SourceError(f"column {name!r} holds dates, which tables do not support yet: pass "
                          f"--column-types {name}=drop (or {name}=categorical)")
    present = values.dropna()
    types = {type(v).__name__ for v in present}
    if types - {"str", "bool", "int", "float"}:
        raise SourceError(f"column {name!r} holds {', '.join(sorted(types))} values, which tables do not support: "
                          f"pass --column-types {name}=drop")
    if types == {"bool"}:
        return "boolean"
    numeric = pd.to_numeric(present.astype(str), errors="coerce").notna()
    if len(types) > 1 or (numeric.any() and not numeric.all()):
        examples = [repr(present[numeric].iloc[0]), repr(present[~numeric].iloc[0])] if numeric.any() and \
            not numeric.all() else sorted(types)
        raise SourceError(f"column {name!r} mixes types (e.g. {' and '.join(examples)}): clean it, or pass "
                          f"--column-types {name}=categorical to treat every value as a category")
    if numeric.all() and len(present):
        raise SourceError(f"column {name!r} holds numbers stored as text: convert it, or pass "
                          f"--column-types {name}=continuous or {name}=categorical")
    return "categorical"


def _as_kind(values: pd.Series, name: str, kind: str) -> pd.Series:
    """The column as its kind stores it: numbers for continuous, bool for boolean, any for categorical
    (a forced categorical over mixed values keeps them as strings)."""
    if kind == "continuous":
        converted = pd.to_numeric(values, errors="coerce")
        bad = converted.isna() & values.notna()
        if bad.any():
            raise SourceError(f"column {name!r} is continuous but holds {values[bad].iloc[0]!r} (row {int(bad.idxmax())})")
        return converted
    if kind == "boolean":
        present = set(values.dropna().map(_label_key))
        if not present <= {True, False, 0, 1}:
            raise SourceError(f"column {name!r} is boolean but holds {sorted(map(repr, present))[:3]}")
        return values.map(lambda v: None if pd.isna(v) else bool(v)).astype("boolean" if values.isna().any() else bool)
    if kind == "categorical" and not pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        types = {type(v).__name__ for v in values.dropna()}
        if len(types) > 1:
            return values.map(lambda v: None if pd.isna(v) else str(v)).astype(object)
    return values
