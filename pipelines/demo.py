"""`vaepipe demo --workdir DIR`: the whole pipeline on embedded defaults, on one machine (local
Ray, local MLflow SQLite store, local files). It runs every stage that exists so far, in order,
each output at a fixed place under DIR, and returns where each one is.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data import BuildConfig, build_dataset, read_manifest


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "demo"  # everything the demo writes goes under here
    num_samples: int = 12000  # shapes drawn for the demo dataset (train + val)
    seed: int = 0  # one seed for data, training and generation


def run_demo(config: DemoConfig) -> dict[str, Any]:
    workdir = Path(config.workdir)
    shards = workdir / "shards"
    if (shards / "manifest.json").is_file():
        print(f"[demo] reusing shards at {shards}", file=sys.stderr)
    else:
        print(f"[demo] building {config.num_samples} shapes samples into {shards}", file=sys.stderr)
        build_dataset(BuildConfig(source="shapes", out=str(shards), limit=config.num_samples,
                                  seed=config.seed, overwrite=True))
    manifest = read_manifest(str(shards))
    return {
        "workdir": str(workdir),
        "manifest": manifest.location,
        "samples": {s: manifest.num_samples(s) for s in manifest.data["splits"]},
    }
