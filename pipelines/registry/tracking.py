"""MLflow tracking for training runs: the driver opens a run and logs the whole config as
params and the dataset hash as a tag; rank 0 logs metrics per epoch and, at the end, the final
weights (pickle-free model folder) and sample / reconstruction / interpolation grids.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

from pipelines.config import flatten

MODEL_ARTIFACT = "model"  # artifact path of the final weights (vaemodels.save_model folder)
FIGURES_ARTIFACT = "figures"
DATASET_FILE = "dataset.json"  # in the model folder: the training data's class names and manifest digest


class TrackingError(ValueError):
    """The tracking URI is unusable: unknown scheme, missing store, or a server that does not answer."""


def check_reachable(tracking_uri: str, timeout_s: float = 5.0, error: type[ValueError] = TrackingError) -> None:
    """Fail fast (bounded time) when an HTTP tracking server does not answer, naming the URI. MLflow's
    own client retries for minutes before giving up, so every command asks /health first."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise error(f"cannot reach the MLflow tracking server at {tracking_uri} "
                    f"(no answer within {timeout_s:.0f} s: {exc}); start it or fix --tracking-uri") from None


def connect(tracking_uri: str, must_exist: bool = False):
    """An MlflowClient for `tracking_uri`. A SQLite store's parent folder is created, unless
    `must_exist` (commands that only read: a mistyped path would otherwise make a new, empty store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if must_exist and not path.is_file():
            raise TrackingError(f"no MLflow store at {path} (tracking URI {tracking_uri}); check the path "
                                "in --tracking-uri")
        if not must_exist:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                seed_sqlite_store(path)
    try:
        return mlflow.MlflowClient(tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise TrackingError(f"unsupported tracking URI {tracking_uri!r}: {str(exc).splitlines()[0][:300]} "
                            "(use sqlite:///PATH or http://HOST:PORT)") from None


def template_cache_dir() -> Path:
    """Where the empty, migrated SQLite store is kept: $VAEPIPE_CACHE_DIR, else ~/.cache/vaepipe."""
    return Path(os.environ.get("VAEPIPE_CACHE_DIR") or Path.home() / ".cache" / "vaepipe")


def seed_sqlite_store(path: Path) -> bool:
    """Start a new SQLite store as a copy of an empty one that MLflow's own migrations built once per
    MLflow version (kept in `template_cache_dir()`). Migrating a fresh database took ~1.8 s of every
    new store on 2 cores; copying takes milliseconds. MLflow still checks the schema revision and
    creates the Default experiment when it opens the copy. Returns whether the copy was made; on any
    failure (no cache folder, an odd file system) nothing is left behind and MLflow builds the store
    itself, as without this."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.seed")
    try:
        template = _empty_store_template()
        shutil.copyfile(template, staged)
        os.link(staged, path)  # never replaces a store another process made in the meantime
        return True
    except Exception:
        return False
    finally:
        staged.unlink(missing_ok=True)


def _empty_store_template() -> Path:
    import mlflow

    cache = template_cache_dir()
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if _is_migrated_store(template):
        return template
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    cache.mkdir(parents=True, exist_ok=True)
    staged = cache / f".{template.name}.{os.getpid()}.tmp"
    try:
        engine = sqlalchemy.create_engine(f"sqlite:///{staged}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        if not _is_migrated_store(staged):
            raise RuntimeError(f"MLflow's migrations left no schema revision in {staged}")
        os.replace(staged, template)
    finally:
        staged.unlink(missing_ok=True)
    return template


def _is_migrated_store(path: Path) -> bool:
    """An MLflow SQLite database with a schema revision and no experiments (a usable template)."""
    import sqlite3

    if not path.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            revision = db.execute("SELECT version_num FROM alembic_version").fetchall()
            experiments = db.execute("SELECT COUNT(*) FROM experiments").fetchone()[0]
    except sqlite3.Error:
        return False
    return len(revision) == 1 and experiments == 0


def tracking_uri_or_env(tracking_uri: str | None) -> str | None:
    """The given tracking URI, else MLFLOW_TRACKING_URI (what MLflow itself and the cluster images use)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def set_run_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    connect(tracking_uri).set_tag(run_id, key, value)


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any],
              tags: dict[str, str], parent_run_id: str | None = None, client=None) -> str:
    """Create a run (nested under `parent_run_id` when given) with params and tags; returns its id.
    With `client` (already connected, the server already checked) it is used as it is."""
    if client is None:
        check_reachable(tracking_uri)
        client = connect(tracking_uri)
    experiment_id = ensure_experiment(client, tracking_uri, experiment)
    all_tags = {"mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i:i + 100])
    return run.info.run_id


def ensure_experiment(client, tracking_uri: str, experiment: str) -> str:
    """The experiment's id, created if needed. With a SQLite store, artifacts go to an `artifacts/`
    folder beside the database (MLflow's default is ./mlruns under whatever the current folder is)."""
    found = client.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    connect(tracking_uri).set_terminated(run_id, status=status)


def log_metric_batch(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One epoch's metrics in one request, stamped now."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class RunTracker:
    """What rank 0 logs into an existing run."""

    def __init__(self, tracking_uri: str, run_id: str, client=None):
        self.client = client if client is not None else connect(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metric_batch(self.client, self.run_id, metrics, step)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_final_artifacts(self, model, manifest, device: torch.device) -> None:
        log_final_artifacts(self, model, manifest, device)


def log_final_artifacts(tracker, model, manifest, device: torch.device) -> None:
    """The final weights (with dataset.json) and the run's figures, through `tracker`'s
    `log_artifacts` / `log_artifact` (a RunTracker here, or the fast path's tracking process)."""
    from pipelines.data import ReaderConfig, make_loader
    from vaemodels import save_model

    model.eval()
    loader = make_loader(manifest, "val" if manifest.num_samples("val") >= 16 else "train",
                         ReaderConfig(batch_size=16, shuffle_buffer=0))
    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / MODEL_ARTIFACT)
        write_dataset_info(Path(tmp) / MODEL_ARTIFACT, manifest)
        tracker.log_artifacts(str(Path(tmp) / MODEL_ARTIFACT), MODEL_ARTIFACT)
        write = FIGURE_WRITERS.get(model.modality, "pipelines.registry.tracking:write_figures")
        module, _, function = write.partition(":")
        for path in getattr(importlib.import_module(module), function)(model, batch, Path(tmp) / FIGURES_ARTIFACT):
            tracker.log_artifact(str(path), FIGURES_ARTIFACT)


# modality -> the training run's figure writer ("module:function"; images: write_figures below)
FIGURE_WRITERS = {"table": "pipelines.evaluation.table_report:write_training_figures",
                  "series": "pipelines.series_figures:write_series_figures"}
# modalities whose manifest section a model folder's dataset.json carries (series: channels, length and
# normalisation, which generate needs to map outputs back to source units); a table model's spec is in
# its config.json already, and image models keep the file they always had
DATASET_INFO_SECTIONS = ("series",)


def write_dataset_info(model_dir: Path, manifest) -> Path:
    """Record what the model was trained on beside its weights, so a registered model carries its
    class names (generate names folders by them) and the dataset's manifest digest."""
    path = Path(model_dir) / DATASET_FILE
    info = {"class_names": manifest.class_names, "manifest_sha256": manifest.sha256(),
            "manifest": manifest.location}
    if manifest.modality in DATASET_INFO_SECTIONS:
        info["modality"] = manifest.modality
        info[manifest.modality] = manifest.data.get(manifest.modality)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_dataset_info(model_dir: str | Path) -> dict[str, Any] | None:
    """The model folder's dataset.json, or None (models saved before it existed, or by hand)."""
    path = Path(model_dir) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrackingError(f"{path} is not valid JSON: {exc}") from None
    return info if isinstance(info, dict) else None


def write_figures(model, batch: dict[str, torch.Tensor], folder: Path, seed: int = 0) -> list[Path]:
    """samples.png (generative models), reconstructions.png (originals above reconstructions) and
    interpolation.png (decoded straight lines between the codes of real pairs)."""
    import torch

    with torch.no_grad():
        return _write_figures(model, batch, folder, seed)


def _write_figures(model, batch: dict[str, torch.Tensor], folder: Path, seed: int) -> list[Path]:
    # torch and the figure helpers are imported here, not at the top: the CLI imports this module to
    # check the tracking server before it pays for importing torch (seconds on a busy machine)
    import torch

    from pipelines.batch.generate_config import DEFAULT_PIXEL_TEMPERATURE
    from pipelines.figures import display_scale, save_grid

    images, labels = batch["image"], batch["label"]
    scale = display_scale(images.shape[-1])
    paths = []
    if model.is_generative:
        generator = torch.Generator().manual_seed(seed)
        # one row of 8 per class (conditional models; 8 x 8 without classes), tempered as `vaepipe generate`
        # writes them by default, so the figure shows the data a user gets
        per_row = 8
        n = per_row * (model.num_classes or per_row)
        sample_labels = model.condition_on(torch.arange(n) // per_row)
        drawn = model.temper_pixels(model.sample(n, labels=sample_labels, generator=generator),
                                    DEFAULT_PIXEL_TEMPERATURE)
        paths.append(save_grid(drawn, folder / "samples.png", nrow=per_row, scale=scale))
    known = model.condition_on(labels, all_known=True)
    recon = model.reconstruct(images, known)
    paths.append(save_grid(torch.cat([images, recon]), folder / "reconstructions.png", nrow=len(images), scale=scale))
    steps = 8
    rows = [model.interpolate(images[2 * p:2 * p + 2], steps, None if known is None else known[2 * p:2 * p + 2])
            for p in range(min(4, len(images) // 2))]
    paths.append(save_grid(torch.cat(rows), folder / "interpolation.png", nrow=steps, scale=scale))
    return paths
