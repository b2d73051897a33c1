"""`vaepipe tune`: a grid search over β, latent size (and any other training key) with Ray Tune
and ASHA early stopping, tracked as one parent MLflow run with a child run per trial.

Each trial is a Tune *function trainable* running the ordinary training loop in one process
(`run_loop` with a `RayTuneSession`), so every epoch's result reaches ASHA and weak trials stop at
the first rungs. A trial that wraps a Ray Train V2 `TorchTrainer` hands Tune only the trainer's
final result, so ASHA could stop nothing; the price is single-worker (no DDP) trials.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec

from pipelines.config import ConfigError, set_dotted
from pipelines.data import read_manifest
from pipelines.registry.tracking import connect, end_run, start_run
from pipelines.ray_runtime import ensure_ray
from pipelines.training.train import check_modality, final_metrics
from pipelines.training.config import TrainConfig, validate_model_params
from pipelines.training.search_config import AXES, TuneConfig

RESULT_FILE = "search_result.json"  # in storage/NAME, beside Tune's trial folders
TABLE_NAME = "search_results"  # .csv and .parquet, in storage/NAME and on the parent run
HEATMAP_FILE = "objective_heatmap.png"  # on the parent run
TRIAL_TAG = "vaepipe.tune.trial_id"  # on each child run: which Tune trial it belongs to
STATUS_TAG = "vaepipe.tune.status"  # on each child run: finished | stopped (by ASHA) | error
ERROR_TAG = "vaepipe.tune.error"  # on each failed child run: the exception, one line


class SearchError(RuntimeError):
    """Every trial of a search failed: there is no best trial."""


def search_root(config: TuneConfig) -> str:
    """Ray wants an absolute local path or a URI."""
    storage = config.storage or config.base.storage
    return storage if "://" in storage else str(Path(storage).resolve())


def run_search(config: TuneConfig) -> dict[str, Any]:
    """Run the grid per `config`; returns the parent run id, the best trial and one row per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = config.base
    manifest = read_manifest(base.data)
    if base.train.batch_size > manifest.num_samples("train"):
        raise ConfigError(f"base.train.batch_size={base.train.batch_size} is larger than the "
                          f"{manifest.num_samples('train')} training samples")
    check_axes_fit_model(config)
    if config.search.metric.startswith("val_") and manifest.num_samples("val") == 0:
        raise ConfigError(f"search.metric {config.search.metric} needs validation data, but {manifest.location} "
                          "has no val samples; rebuild it with --val-fraction > 0")
    root = search_root(config)
    name = config.name or f"tune-{base.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = base.tracking_uri()
    parent_run_id = start_run(tracking_uri, base.tracking.experiment, name, config.to_dict(),
                              {"dataset_sha256": manifest.sha256(), "dataset": manifest.location,
                               "model": base.model.name, "vaepipe.storage": f"{root}/{name}"})
    print(f"[tune] search {name}: MLflow parent run {parent_run_id}", file=sys.stderr)
    try:
        ensure_ray()
        trainable = tune.with_parameters(train_trial, base=_trial_base(base, root, tracking_uri),
                                         parent_run_id=parent_run_id, search_name=name,
                                         metric=config.search.metric)
        resources = {"cpu": config.cpus_per_trial, **({"gpu": 1} if base.scaling.use_gpu else {})}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            # repeats are a seed axis (TuneConfig.axes), so Tune runs each grid point once
            param_space={key: tune.grid_search(values) for key, values in config.axes().items()},
            tune_config=tune.TuneConfig(
                metric=config.search.metric,
                mode=config.search.mode,
                # time is the loop's "epoch" (epochs completed), not Tune's training_iteration: the loop
                # also reports mid-epoch checkpoints, which carry no validation metric. Trials that reach
                # max_t are not stopped by ASHA, so they return and log their final weights and figures.
                scheduler=ASHAScheduler(time_attr="epoch", max_t=base.train.epochs,
                                        grace_period=config.scheduler.grace_period,
                                        reduction_factor=config.scheduler.reduction_factor,
                                        stop_last_trials=False),
                max_concurrent_trials=config.search.max_concurrent,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(name=name, storage_path=root, verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: stdout is for the result line
            result_grid = tuner.fit()
        trials = _finish_trials(result_grid, config, tracking_uri, parent_run_id, manifest)
        table_path = _log_table(trials, config, tracking_uri, parent_run_id, f"{root}/{name}")
        best = _best_trial(result_grid, trials, config)
        best_metrics = final_metrics(tracking_uri, best["run_id"])
        _log_best(tracking_uri, parent_run_id, best, best_metrics, config)
    except BaseException:
        end_run(tracking_uri, parent_run_id, "FAILED")
        raise
    end_run(tracking_uri, parent_run_id, "FINISHED")
    result = {
        "parent_run_id": parent_run_id,
        "search_name": name,
        "best": {"config": _point(best, config), "metrics": best_metrics, "checkpoint": best["checkpoint"],
                 "run_id": best["run_id"]},
        "trials": trials,
        "results_table": table_path,
        "tracking_uri": tracking_uri,
    }
    with fsspec.open(f"{root}/{name}/{RESULT_FILE}", "w", auto_mkdir=True) as f:
        json.dump(result, f, indent=2)
    return result


def train_trial(point: dict[str, Any], base: dict[str, Any], parent_run_id: str, search_name: str,
                metric: str = "val_elbo") -> None:
    """One Tune trial: base + grid point -> TrainConfig -> its own child MLflow run -> the training loop."""
    from ray import tune

    from pipelines.training.sessions import RayTuneSession
    from pipelines.training.loop import run_loop

    trial_id = tune.get_context().get_trial_id()
    data = copy.deepcopy(base)
    for key, value in point.items():
        set_dotted(data, key, value)
    tracking_uri, experiment = data["tracking"]["tracking_uri"], data["tracking"]["experiment"]
    config, error = None, None
    try:
        config = TrainConfig.from_dict(data)
    except ConfigError as exc:  # still open the child run, so the failure is visible under the parent
        error = exc
    run_name = f"{search_name}/" + ",".join(f"{_label(k)}={v}" for k, v in point.items())
    run_id = start_run(tracking_uri, experiment, run_name, config.to_dict() if config else data,
                       {TRIAL_TAG: trial_id, "model": data["model"]["name"]}, parent_run_id=parent_run_id)
    status: str | None = "FAILED"
    try:
        if error is not None:
            raise error
        manifest = read_manifest(config.data)
        check_modality(config.model.name, manifest)
        validate_model_params(config, manifest.model_input, manifest.num_classes or None)
        session = RayTuneSession(config.scaling.use_gpu, metric=metric)
        run_loop({**config.to_dict(), "mlflow_run_id": run_id}, session)
        if not session.reported:
            raise SearchError(f"the training loop never reported the search metric {metric!r} (it reported: "
                              f"{', '.join(sorted(session.seen_keys)) or 'nothing'}); set --metric to one of them")
        status = "FINISHED"
    except SystemExit:
        # ASHA stopped this trial: Tune raises SystemExit inside the report call, and the process
        # may be torn down at any moment now, so the driver closes this run (_finish_trials).
        status = None
        raise
    except Exception as exc:
        connect(tracking_uri).set_tag(run_id, ERROR_TAG, _one_line(exc))
        raise
    finally:
        if status is not None:
            end_run(tracking_uri, run_id, status)


def check_axes_fit_model(config: TuneConfig) -> None:
    """Refuse, before Ray starts, a grid over a model param the family does not have (e.g. --beta
    for vae): every trial would fail. Bad values of a real param fail in their own trial only."""
    import dataclasses

    import vaemodels

    family = config.base.model.name
    if family not in vaemodels.MODELS:
        raise ConfigError(f"base.model.name: unknown model {family!r} (see `vaepipe models`)")
    fields = {f.name for f in dataclasses.fields(vaemodels.MODELS[family].config_class)}
    prefix = "model.params."
    for key in config.axes():
        if key.startswith(prefix) and key[len(prefix):] not in fields:
            flag = {dotted: f"--{name.replace('_', '-')}" for name, dotted in AXES.items()}.get(key, f"search.extra.{key}")
            raise ConfigError(f"{flag}: the {family!r} model has no parameter {key[len(prefix):]!r} "
                              f"(its parameters: {', '.join(sorted(fields))}); choose a family that has it, "
                              "e.g. --model beta_vae, or drop the axis")


def _trial_base(base: TrainConfig, root: str, tracking_uri: str) -> dict[str, Any]:
    """The base config with every location absolute: Tune runs each trial inside its own folder."""
    data = base.to_dict()
    if "://" not in data["data"]:
        data["data"] = str(Path(data["data"]).resolve())
    data["storage"] = root
    data["tracking"]["tracking_uri"] = tracking_uri
    return data


def _finish_trials(result_grid, config: TuneConfig, tracking_uri: str, parent_run_id: str,
                   manifest) -> list[dict[str, Any]]:
    """One row per trial. Child runs of trials that ASHA stopped (or whose process died) are still
    RUNNING: close them here, logging a stopped trial's final artifacts from its last checkpoint."""
    from pipelines.registry.tracking import RunTracker

    client = connect(tracking_uri)
    children = {run.data.tags.get(TRIAL_TAG): run for run in _child_runs(client, parent_run_id)}
    metric, max_epochs = config.search.metric, config.base.train.epochs
    trials = []
    for result in result_grid:
        trial_id = result.metrics["trial_id"]
        run = children.get(trial_id)
        epochs_run = int(result.metrics.get("epoch", 0))
        if result.error is not None:
            status = "error"
        else:
            status = "finished" if epochs_run >= max_epochs else "stopped"
        error = None
        if result.error is not None:
            error = (run.data.tags.get(ERROR_TAG) if run else None) or _one_line(getattr(result.error, "cause", None)
                                                                                or result.error)
        if run is not None:
            client.set_tag(run.info.run_id, STATUS_TAG, status)
            if run.info.status == "RUNNING":
                if status == "stopped" and result.checkpoint is not None:
                    _log_final_artifacts(RunTracker(tracking_uri, run.info.run_id), result.checkpoint, manifest)
                end_run(tracking_uri, run.info.run_id, "FAILED" if status == "error" else "FINISHED")
        trials.append({
            "trial_id": trial_id,
            **_point({"config": result.metrics.get("config") or {}}, config),
            metric: _finite_or_none(result.metrics.get(metric)),
            "epochs_run": epochs_run,
            "status": status,
            "error": error,
            "run_id": run.info.run_id if run else None,
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
        })
        print(f"[tune] trial {trial_id}: {status} after {epochs_run} epoch(s), {metric}={trials[-1][metric]}"
              + (f" ({error})" if error else ""), file=sys.stderr)
    return trials


def _child_runs(client, parent_run_id: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _log_final_artifacts(tracker, checkpoint, manifest) -> None:
    import torch

    from pipelines.training.checkpoints import MODEL_DIR
    from vaemodels import load_model

    with checkpoint.as_directory() as directory:
        model = load_model(Path(directory) / MODEL_DIR, map_location="cpu")
    tracker.log_final_artifacts(model, manifest, torch.device("cpu"))


def _best_trial(result_grid, trials: list[dict[str, Any]], config: TuneConfig) -> dict[str, Any]:
    """Tune's pick by the last reported value, among trials that did not fail."""
    metric, mode = config.search.metric, config.search.mode
    candidates = [t for t in trials if t["status"] != "error" and t[metric] is not None]
    if not candidates:
        errors = "; ".join(f"{t['trial_id']}: {t['error'] or 'no ' + metric}" for t in trials)
        raise SearchError(f"no trial reported a finite {metric}: {errors}")
    best = result_grid.get_best_result(metric=metric, mode=mode, scope="last")
    by_id = {t["trial_id"]: t for t in candidates}
    if best.metrics.get("trial_id") in by_id:
        return by_id[best.metrics["trial_id"]]
    # Tune ranks failed trials too (by what they reported before failing): pick among the rest
    return (max if mode == "max" else min)(candidates, key=lambda t: t[metric])


def _log_table(trials: list[dict[str, Any]], config: TuneConfig, tracking_uri: str, parent_run_id: str,
               folder: str) -> str:
    """search_results.csv/.parquet and the heatmap onto the parent run; the tables also into `folder`."""
    import pandas as pd

    client = connect(tracking_uri)
    table = pd.DataFrame(trials)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{TABLE_NAME}.csv", Path(tmp) / f"{TABLE_NAME}.parquet"]
        table.to_csv(paths[0], index=False)
        table.to_parquet(paths[1], index=False)
        heatmap = write_heatmap(trials, config.search.metric, config.search.mode, Path(tmp) / HEATMAP_FILE)
        for path in [*paths, heatmap]:
            client.log_artifact(parent_run_id, str(path))
        for path in paths:
            with open(path, "rb") as src, fsspec.open(f"{folder}/{path.name}", "wb", auto_mkdir=True) as dst:
                dst.write(src.read())
    return f"{folder}/{TABLE_NAME}.parquet"


def write_heatmap(trials: list[dict[str, Any]], metric: str, mode: str, path: Path) -> Path:
    """β (rows) × latent size (columns) of the objective; a cell holding several trials (other axes,
    repeats) shows the best of them. Failed cells say so. One value on an axis gives one row/column."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    betas, latents = _levels(t["beta"] for t in trials), _levels(t["latent_dim"] for t in trials)
    grid = np.full((len(betas), len(latents)), np.nan)
    for t in trials:
        if t[metric] is None:
            continue
        i, j = betas.index(t["beta"]), latents.index(t["latent_dim"])
        old = grid[i, j]
        grid[i, j] = t[metric] if np.isnan(old) else (max if mode == "max" else min)(old, t[metric])
    fig = Figure(figsize=(max(4.5, 1.6 + 1.2 * len(latents)), max(3.0, 1.4 + 0.8 * len(betas))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis" if mode == "max" else "viridis_r", aspect="auto")
    for i in range(len(betas)):
        for j in range(len(latents)):
            failed = bool(np.isnan(grid[i, j]))
            ax.text(j, i, "failed" if failed else f"{grid[i, j]:.4g}", ha="center", va="center", fontsize=8,
                    color="dimgray" if failed else "black",
                    bbox=None if failed else {"facecolor": "white", "alpha": 0.6, "linewidth": 0})
    ax.set_xticks(range(len(latents)), [_tick(v) for v in latents])
    ax.set_yticks(range(len(betas)), [_tick(v) for v in betas])
    ax.set_xlabel("latent_dim")
    ax.set_ylabel("β")
    ax.set_title(f"{metric} at each trial's last epoch ({mode} is better)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _log_best(tracking_uri: str, parent_run_id: str, best: dict[str, Any], metrics: dict[str, float],
              config: TuneConfig) -> None:
    from mlflow.entities import Metric, Param

    client = connect(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(
        parent_run_id,
        metrics=[Metric(f"best_{k}", float(v), now, 0) for k, v in metrics.items()],
        params=[Param(f"best.{k}", str(v)) for k, v in _point(best, config).items()],
    )
    client.set_tag(parent_run_id, "best_run_id", best["run_id"])


def _point(trial: dict[str, Any], config: TuneConfig) -> dict[str, Any]:
    """The grid point of a trial (from its Tune config, or a row) as column -> value; β and latent size
    always appear (the value every trial shares where they are not an axis)."""
    values = trial.get("config", trial)
    out = {name: values.get(key, values.get(name, _base_value(config, name))) for name, key in AXES.items()}
    out.update({_label(key): values.get(key) for key in config.axes() if key not in AXES.values()})
    return out


def _base_value(config: TuneConfig, name: str) -> Any:
    """A model param every trial shares: the base config's, else the family's default (None if it has none)."""
    import vaemodels

    params = config.base.model.params
    if name in params:
        return params[name]
    return getattr(vaemodels.MODELS[config.base.model.name].config_class(), name, None)


def _label(key: str) -> str:
    return {dotted: name for name, dotted in AXES.items()}.get(key, key)


def _levels(values) -> list:
    return sorted(set(values), key=lambda v: (v is None, v if v is not None else 0))


def _tick(value) -> str:
    return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _finite_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:1000]
