"""`vaepipe demo --workdir DIR`: the whole pipeline on embedded defaults, on one machine (local
Ray, local MLflow SQLite store, local files), each output at a fixed place under DIR:

    DIR/shards/manifest.json   the `shapes` dataset (WebDataset shards + manifest)
    DIR/mlflow.db              MLflow store: the search, its trials, the registry (best = champion)
    DIR/runs/                  Ray Tune / Train storage (checkpoints, search_result.json)
    DIR/models/champion/       the champion pulled back from the registry
    DIR/synthetic/             generated labelled data: parquet/, images/, manifest.json, _SUCCESS
    DIR/report/                evaluation: metrics.json, report.html and its PNG figures
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data import BuildConfig, build_dataset, read_manifest
from pipelines.evaluate import EvaluateConfig, run_evaluation
from pipelines.generate import GenerateConfig, run_generation
from pipelines.registry import RegisterRequest, pull, register_run
from pipelines.tune import run_search
from pipelines.tune_config import TuneConfig

MODEL_NAME = "shapes-cvae"


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "demo"  # everything the demo writes goes under here
    num_samples: int = 12000  # shapes drawn for the demo dataset (train + val)
    seed: int = 0  # one seed for data, training and generation
    epochs: int = 4  # epochs per trial (ASHA may stop a trial after the first)
    steps_per_epoch: int = 120  # batches per epoch: keeps the demo within minutes on 2 CPU cores
    per_class: int = 500  # synthetic samples generated for each shape


def run_demo(config: DemoConfig) -> dict[str, Any]:
    workdir = Path(config.workdir).resolve()
    shards = workdir / "shards"
    if (shards / "manifest.json").is_file():
        print(f"[demo] reusing shards at {shards}", file=sys.stderr)
    else:
        print(f"[demo] 1/5 building {config.num_samples} shapes samples into {shards}", file=sys.stderr)
        build_dataset(BuildConfig(source="shapes", out=str(shards), limit=config.num_samples,
                                  seed=config.seed, overwrite=True))
    manifest = read_manifest(str(shards))
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"

    print("[demo] 2/5 searching beta x latent size for a conditional VAE with Ray Tune + ASHA", file=sys.stderr)
    search = run_search(TuneConfig.from_dict({
        "base": {
            "data": str(shards),
            "model": {"name": "cvae", "params": {"kl_warmup_steps": 60}},
            "train": {"epochs": config.epochs, "batch_size": 64, "max_steps_per_epoch": config.steps_per_epoch,
                      "checkpoint_every": 1000, "seed": config.seed},
            "storage": str(workdir / "runs"),
            "tracking": {"tracking_uri": tracking_uri, "experiment": "vaepipe-demo"},
        },
        "search": {"beta": [1.0, 4.0], "latent_dim": [4, 10], "max_concurrent": 2},
        "name": "demo-search",
    }))

    print(f"[demo] 3/5 registering the best trial as {MODEL_NAME}", file=sys.stderr)
    registered = register_run(RegisterRequest(run_id=search["best"]["run_id"], name=MODEL_NAME,
                                              tracking_uri=tracking_uri))
    uri = f"models:/{MODEL_NAME}@champion"
    _, pulled = pull(uri, tracking_uri, workdir / "models" / "champion")

    print(f"[demo] 4/5 generating {config.per_class} samples per class from {uri}", file=sys.stderr)
    generated = run_generation(GenerateConfig(
        model_dir=pulled["path"], out=str(workdir / "synthetic"), per_class=config.per_class, seed=config.seed,
        model_uri=uri, model_name=MODEL_NAME, model_version=str(pulled["version"]),
        class_names=tuple(manifest.class_names), overwrite=True,
    ))
    print("[demo] 5/5 evaluating the champion and its synthetic data", file=sys.stderr)
    evaluation = run_evaluation(EvaluateConfig(
        model=pulled["path"], data=str(shards), out=str(workdir / "report"), synthetic=generated["out"],
        iwae_k=100, seeds=2, max_real=3000, classifier_steps=300, anomaly_steps=200, seed=config.seed,
        tracking_uri=tracking_uri, run_id=search["best"]["run_id"],
    ))
    return {
        "workdir": str(workdir),
        "manifest": manifest.location,
        "tracking_uri": tracking_uri,
        "best": search["best"]["config"],
        "best_val_elbo": search["best"]["metrics"].get("val_elbo"),
        "search_parent_run_id": search["parent_run_id"],
        "registered": {"name": registered["name"], "version": registered["version"],
                       "aliases": registered["aliases"]},
        "synthetic": generated["out"],
        "synthetic_total": generated["total"],
        "report": evaluation["report"],
        "metrics": evaluation["metrics"],
        "mlflow_ui": f"mlflow ui --backend-store-uri {tracking_uri}",
    }
