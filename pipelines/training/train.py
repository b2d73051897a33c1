"""`vaepipe train`: the driver. It validates the config, opens the MLflow run (params = the
whole resolved config, tag = dataset manifest hash), and runs `train_loop_per_worker` under Ray
Train's TorchTrainer (DDP: gloo on CPU, NCCL on GPU) with checkpoints in the run's storage and
FailureConfig restarts. Relaunching with the same run name resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec

from pipelines.config import config_error
from pipelines.ray_runtime import ensure_ray
from pipelines.training.config import TrainConfig, validate_model_params

RUN_INFO_FILE = "vaepipe-run.json"  # beside Ray's files in storage/NAME: config + MLflow run id


def storage_root(config: TrainConfig) -> str:
    """Ray wants an absolute local path or a URI."""
    return config.storage if "://" in config.storage else str(Path(config.storage).resolve())


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Ray Train workers run in folders of their own: give them absolute data, storage and tracking paths."""
    data = config.data if "://" in config.data else str(Path(config.data).resolve())
    return replace(config, data=data, storage=storage_root(config),
                   tracking=replace(config.tracking, tracking_uri=config.tracking_uri()))


def run_training(config: TrainConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train per `config`; returns the MLflow run id, the checkpoint location and final metrics."""
    config = absolute_paths(config)
    # MLflow starts in its own process now, while the checks below import torch and `_fit` starts Ray
    sidecar = start_tracking(config)
    try:
        from pipelines.data import read_manifest  # imports torch: after the tracking process has started

        manifest = read_manifest(config.data)
        check_modality(config.model.name, manifest)
        validate_model_params(config, manifest.model_input, manifest.num_classes or None)
        if config.train.batch_size > manifest.num_samples("train") // max(1, config.scaling.workers):
            raise config_error()(f"train.batch_size={config.train.batch_size} is larger than each worker's share "
                                 f"of the {manifest.num_samples('train')} training samples")
        if manifest.num_samples("val") < config.scaling.workers:
            # without val metrics there is no val_elbo for `register`'s champion gate or `tune` to compare
            raise config_error()(f"{manifest.location} has {manifest.num_samples('val')} val samples, fewer than "
                                 f"the {config.scaling.workers} worker(s); rebuild it with --val-fraction > 0")
        root = storage_root(config)
        run_name = config.name or f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = dict(experiment=config.tracking.experiment, run_name=run_name, params=config.to_dict(),
                   tags={"dataset_sha256": manifest.sha256(), "dataset": manifest.location,
                         "model": config.model.name, "vaepipe.storage": f"{root}/{run_name}"},
                   parent_run_id=parent_run_id)
        return _fit(config, run_name, sidecar, sidecar.send("start_run", **run), new_run=True)
    finally:
        sidecar.close()


def start_tracking(config: TrainConfig):
    """The run's tracking process (pipelines.registry.sidecar), after the checks that need none."""
    from pipelines.registry.sidecar import TrackingSidecar

    if config.scaling.workers == 0 and "://" in config.storage:
        raise config_error()("scaling.workers=0 trains in this process and keeps checkpoints on local disk: "
                             f"storage must be a local folder, not {config.storage}")
    return TrackingSidecar(config.tracking_uri())


def check_modality(model_name: str, manifest) -> None:
    """The family must read the dataset's modality (the model's `modality` class attribute says which)."""
    import vaemodels

    modality = vaemodels.model_class(model_name).modality
    if manifest.modality != modality:
        fitting = [n for n, cls in vaemodels.MODELS.items() if cls.modality == manifest.modality]
        raise config_error()(f"model {model_name!r} is built for {modality} data, but {manifest.location} holds "
                          f"{manifest.modality} data; use one of: {', '.join(fitting) or 'none registered'}")


def resume_training(storage: str, run_name: str) -> dict[str, Any]:
    """Continue run `run_name` under `storage` from its latest checkpoint, in the same MLflow run."""
    root = storage if "://" in storage else str(Path(storage).resolve())
    config, run_name, run_id = load_run_info(root, run_name)
    print(f"[train] resuming run {run_name} (MLflow run {run_id})", file=sys.stderr)
    config = absolute_paths(config)
    sidecar = start_tracking(config)
    try:
        return _fit(config, run_name, sidecar, sidecar.send("attach", run_id=run_id), new_run=False)
    finally:
        sidecar.close()


# Ray Train's controller polls its workers this often (its default, 2 s, added ~2-4 s to every run's end)
HEALTH_CHECK_INTERVAL_S = "0.5"


def _fit(config: TrainConfig, run_name: str, sidecar, run_ticket: int, new_run: bool) -> dict[str, Any]:
    """Run the loop; MLflow calls go through `sidecar`, whose `run_ticket` answers with the run's id
    (started, or attached when resuming)."""
    if config.scaling.workers == 0:
        return _fit_in_process(config, run_name, sidecar, run_ticket, new_run)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    ensure_ray()
    from pipelines.training.loop import train_loop_per_worker

    run_id = _await_run(sidecar, run_ticket, config, run_name, new_run)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**config.to_dict(), "mlflow_run_id": run_id},
        scaling_config=ScalingConfig(num_workers=config.scaling.workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker={"CPU": config.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=config.storage,
            failure_config=FailureConfig(max_failures=config.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        _mark_failed(sidecar, run_id)
        raise
    return _finished(config, run_name, sidecar, run_id, result.checkpoint.path if result.checkpoint else None)


def _fit_in_process(config: TrainConfig, run_name: str, sidecar, run_ticket: int, new_run: bool) -> dict[str, Any]:
    """`--workers 0`: the same loop in this process, no Ray start-up; checkpoints in STORAGE/NAME."""
    import torch._dynamo  # noqa: F401  the optimizer's first step imports it (~1.3 s): here it overlaps MLflow's start

    from pipelines.registry.sidecar import SidecarTracker
    from pipelines.training.loop import run_loop
    from pipelines.training.sessions import LocalSession

    run_id = _await_run(sidecar, run_ticket, config, run_name, new_run)
    session = LocalSession(use_gpu=config.scaling.use_gpu, checkpoint_root=Path(config.storage) / run_name,
                           keep=3, run_tracker=SidecarTracker(sidecar))
    try:
        run_loop({**config.to_dict(), "mlflow_run_id": run_id}, session)
    except BaseException:
        _mark_failed(sidecar, run_id)
        raise
    return _finished(config, run_name, sidecar, run_id, session.latest_checkpoint)


def _await_run(sidecar, run_ticket: int, config: TrainConfig, run_name: str, new_run: bool) -> str:
    """The run's id once the tracking process has it; a new run's info file is written then."""
    run_id = sidecar.wait(run_ticket)
    if new_run:
        save_run_info(config.storage, run_name, config, run_id)
    return run_id


def _finished(config: TrainConfig, run_name: str, sidecar, run_id: str, checkpoint: str | None) -> dict[str, Any]:
    sidecar.call("end_run", status="FINISHED")
    return {
        "run_id": run_id,
        "run_name": run_name,
        "tracking_uri": config.tracking_uri(),
        "checkpoint": checkpoint,
        "metrics": sidecar.call("final_metrics"),
    }


def _mark_failed(sidecar, run_id: str) -> None:
    """End the run FAILED without hiding the error that stopped training (the sidecar may be gone too)."""
    from pipelines.registry.tracking import TrackingError

    try:
        sidecar.call("end_run", status="FAILED")
    except TrackingError as exc:
        print(f"[train] could not mark MLflow run {run_id} FAILED: {exc}", file=sys.stderr)


def final_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The last value of every metric the run logged (what MLflow shows as the run's metrics)."""
    from pipelines.registry.tracking import connect

    return dict(connect(tracking_uri).get_run(run_id).data.metrics)


def save_run_info(root: str, run_name: str, config: TrainConfig, run_id: str) -> None:
    with fsspec.open(f"{root}/{run_name}/{RUN_INFO_FILE}", "w", auto_mkdir=True) as f:
        json.dump({"run_name": run_name, "mlflow_run_id": run_id, "config": config.to_dict()}, f, indent=2)


def load_run_info(root: str, run_name: str) -> tuple[TrainConfig, str, str]:
    try:
        with fsspec.open(f"{root}/{run_name}/{RUN_INFO_FILE}", "r") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise config_error()(f"no run named {run_name!r} under storage {root} (nothing to resume)") from None
    return TrainConfig.from_dict(info["config"]), info["run_name"], info["mlflow_run_id"]
