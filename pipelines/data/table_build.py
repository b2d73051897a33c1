"""`vaepipe data build` for tables: a table source -> Parquet shards (`train/shard-NNNNNN.parquet`,
`val/...`) and a `manifest.json` with `"modality": "table"`, the schema and the fitted column
transformer (fitted on the train split only) and a sha256 per shard. Same guarantees as images: a
seeded shuffled order, equal shards of `shard_size` rows, an atomic build (staging folder, renamed into
place, manifest last) and byte-reproducible files.

Why Parquet shards rather than WebDataset samples: a table's rows are typed columns with nulls, and
Parquet keeps the dtypes, the missing values and the category values exactly, is what generation
writes, and is what every table tool reads; a shard is still one file with one sha256, dealt to
(rank x loader worker) slots by the same reader contract as image shards (table_reader.py).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.build import SAMPLE_ORDER, check_out, split_indices, write_staged
from pipelines.data.manifest import FORMAT_VERSION, file_sha256
from pipelines.data.sources import SourceError
from pipelines.data.table_source import TableSource, open_table_source, parse_column_types
from pipelines.data.table_transform import fit_columns

INDEX_COLUMN = "__vaepipe_index__"  # each row's position in the source: its key, as an image shard's __key__
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": False}


def build_table_dataset(config) -> dict[str, Any]:
    """Build a table dataset per `config` (pipelines.data.build.BuildConfig); returns the manifest dict."""
    if config.image_size is not None:
        raise SourceError(f"--image-size applies to images; --source {config.source} is a table")
    out = Path(config.out)
    check_out(config, out)
    source = open_table_source(config.source, config.label, parse_column_types(config.column_types),
                               config.limit, config.seed)
    splits = split_indices(source.num_samples, config.val_fraction, config.seed)
    if len(splits["train"]) < 2:
        raise SourceError(f"--source {config.source} leaves {len(splits['train'])} training rows; it needs at least 2")
    columns = fit_columns(source.frame.iloc[splits["train"]], source.columns, config.seed)
    kinds = ", ".join(f"{c['name']}:{c['kind']}" for c in columns)
    print(f"[data] {source.name}: {source.num_samples} rows, {len(columns)} columns ({kinds}), "
          f"label {source.label!r}", file=sys.stderr)

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "modality": "table",
        "source": config.source,
        "seed": config.seed,
        "class_names": source.class_names,
        "sample_order": SAMPLE_ORDER,
        # what a table model is built from (vaemodels.tvae): the schema with the fitted transformer
        "table": {"label": source.label, "label_dtype": source.label_dtype, "class_names": source.class_names,
                  "columns": columns, "index_column": INDEX_COLUMN},
        "splits": {},
    }
    return write_staged(out, manifest, splits,
                        lambda split, indices, staging: _write_split(source, split, indices, staging, config.shard_size))


def _write_split(source: TableSource, split: str, indices: np.ndarray, folder: Path,
                 shard_size: int) -> list[dict[str, Any]]:
    (folder / split).mkdir(parents=True)
    shards = []
    for number, start in enumerate(range(0, len(indices), shard_size)):
        rows = indices[start:start + shard_size]
        part = source.frame.iloc[rows].reset_index(drop=True)
        part[INDEX_COLUMN] = source.source_index[rows]
        table = pa.Table.from_pandas(part, preserve_index=False)
        name = f"{split}/shard-{number:06d}.parquet"
        pq.write_table(table, str(folder / name), **PARQUET_OPTIONS)
        shards.append({"name": name, "num_samples": int(len(rows)), "sha256": file_sha256(str(folder / name))})
    print(f"[data] {split}: {len(indices)} rows in {len(shards)} shards", file=sys.stderr)
    return shards
