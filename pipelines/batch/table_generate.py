"""What `vaepipe generate` writes for a table model: each block's rows decoded by the model's own
column transformer (its table spec, saved in config.json) into the original column names, dtypes and
category values, as hive-partitioned Parquet (`parquet/label=K/block-NNNNNN.parquet`), no PNGs.
The shared skeleton (seeded blocks, actor pool, atomic files, markers, manifest) is pipelines/batch/job.py;
the request, the plan and the seeds are generate.py's, so `--per-class` and resuming work as for images.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.batch.job import BlockWriter
from pipelines.batch.model import UNLABELLED, load_worker_model

PARQUET_OPTIONS = {"compression": "zstd"}


def label_values(spec: dict[str, Any], labels: np.ndarray) -> pd.Series:
    """Class indices -> the label column's original values and dtype (class names are their str())."""
    names = spec["class_names"]
    dtype = spec["label_dtype"]
    if dtype == "bool":
        return pd.Series([names[i] == "True" for i in labels], dtype=bool)
    if dtype.startswith(("int", "uint")):
        return pd.Series([int(names[i]) for i in labels], dtype=dtype)
    if dtype.startswith("float"):
        return pd.Series([float(names[i]) for i in labels], dtype=dtype)
    return pd.Series([names[i] for i in labels], dtype=object)


def decode_rows(spec: dict[str, Any], rows: np.ndarray, labels: np.ndarray | None) -> pd.DataFrame:
    """Model rows -> the original table: every modelled column, then the label column."""
    from pipelines.data.table_transform import decode

    frame = decode(rows, spec["columns"])
    if labels is not None:
        frame[spec["label"]] = label_values(spec, labels)
    return frame


class TableGenerateBlock:
    """A block's compute (see job.BlockFn) for table models: the model's seeded sampler -> decoded rows."""

    owned_dirs = ("parquet",)

    @classmethod
    def plan(cls, config, info, model, request: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """generate.plan_generation's table part: the request as is, no extra block arguments, and the
        manifest's modality and columns (the spec's, then its label)."""
        spec = model.input_spec()
        return request, {}, {"modality": model.modality,
                             "columns": list(dict.fromkeys([c["name"] for c in spec["columns"]] + [spec["label"]]))}

    def __init__(self, model_dir: str, use_gpu: bool, batch_size: int, temperature: float, seed: int,
                 provenance: dict[str, str], class_names: list[str] | None, **_: Any):
        self.model = load_worker_model(model_dir, use_gpu)
        self.spec = self.model.input_spec()
        self.batch_size, self.temperature = batch_size, temperature

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        import torch

        n = block["count"]
        generator = torch.Generator().manual_seed(block["seed"])
        labels = None if block["labels"] is None else torch.tensor(block["labels"], dtype=torch.long)
        rows = []
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                count = min(self.batch_size, n - i)
                chunk = None if labels is None else labels[i:i + count]
                rows.append(self.model.sample_with_latent(count, chunk, generator, self.temperature)[0].float().cpu())
        label_of = np.full(n, UNLABELLED, np.int64) if labels is None else labels.numpy()
        frame = decode_rows(self.spec, torch.cat(rows).numpy(), None if labels is None else label_of)
        if self.spec["label"] == "label":  # the hive partition is called label: readers refuse both
            frame = frame.drop(columns="label")
        counts = {}
        for label in np.unique(label_of).tolist():
            part = frame[label_of == label].reset_index(drop=True)
            writer.write_parquet(f"parquet/label={label}/block-{block['index']:06d}.parquet",
                                 pa.Table.from_pandas(part, preserve_index=False), **PARQUET_OPTIONS)
            counts[str(label)] = len(part)
        return counts
