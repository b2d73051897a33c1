"""`vaepipe demo --workdir DIR`: the whole pipeline on embedded defaults, on one machine (local
Ray, local MLflow SQLite store, local files). It runs every stage that exists so far, in order,
each output at a fixed place under DIR, and returns where each one is:
DIR/shards/manifest.json (data), DIR/mlflow.db (tracking), DIR/runs/ (checkpoints).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data import BuildConfig, build_dataset, read_manifest
from pipelines.train import run_training
from pipelines.train_config import TrainConfig


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "demo"  # everything the demo writes goes under here
    num_samples: int = 12000  # shapes drawn for the demo dataset (train + val)
    seed: int = 0  # one seed for data, training and generation
    epochs: int = 3  # training epochs (each capped at steps_per_epoch batches)
    steps_per_epoch: int = 120  # keeps the demo within minutes on 2 CPU cores


def run_demo(config: DemoConfig) -> dict[str, Any]:
    workdir = Path(config.workdir).resolve()
    shards = workdir / "shards"
    if (shards / "manifest.json").is_file():
        print(f"[demo] reusing shards at {shards}", file=sys.stderr)
    else:
        print(f"[demo] building {config.num_samples} shapes samples into {shards}", file=sys.stderr)
        build_dataset(BuildConfig(source="shapes", out=str(shards), limit=config.num_samples,
                                  seed=config.seed, overwrite=True))
    manifest = read_manifest(str(shards))

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    print("[demo] training a beta-VAE with Ray Train", file=sys.stderr)
    trained = run_training(TrainConfig.from_dict({
        "data": str(shards),
        "model": {"name": "beta_vae", "params": {"latent_dim": 10, "beta": 4.0, "kl_warmup_steps": 100}},
        "train": {"epochs": config.epochs, "batch_size": 64, "max_steps_per_epoch": config.steps_per_epoch,
                  "checkpoint_every": 60, "seed": config.seed},
        "storage": str(workdir / "runs"),
        "tracking": {"tracking_uri": tracking_uri, "experiment": "vaepipe-demo"},
    }))
    return {
        "workdir": str(workdir),
        "manifest": manifest.location,
        "samples": {s: manifest.num_samples(s) for s in manifest.data["splits"]},
        "tracking_uri": tracking_uri,
        "train_run_id": trained["run_id"],
        "checkpoint": trained["checkpoint"],
        "val_elbo": trained["metrics"].get("val_elbo"),
        "mlflow_ui": f"mlflow ui --backend-store-uri {tracking_uri}",
    }
