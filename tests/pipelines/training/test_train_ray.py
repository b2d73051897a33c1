"""Training under Ray Train on the session's local Ray: 2 DDP workers learn on shapes and log to
MLflow; a worker killed for real is replaced and the run resumes from its checkpoint."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipelines.training.checkpoints import read_state
from pipelines.training.train import run_training
from pipelines.training.config import TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def shapes_config(data, tmp_path, name, **train):
    return TrainConfig.from_dict({
        "data": str(data), "name": name, "storage": str(tmp_path / "runs"),
        "model": {"name": "vae", "params": {"backbone": "mlp", "latent_dim": 6, "hidden_dim": 128}},
        "train": {"batch_size": 50, "checkpoint_every": 6, **train},
        "scaling": {"workers": 2, "max_failures": 2},
    })


def test_two_workers_learn_and_log_to_mlflow(ray_session, shapes_dataset, tmp_path):
    import mlflow

    result = run_training(shapes_config(shapes_dataset, tmp_path, "two-workers", epochs=3))
    client = mlflow.MlflowClient(result["tracking_uri"])
    history = client.get_metric_history(result["run_id"], "val_elbo")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value > history[0].value + 5.0  # validation ELBO improves
    # 1,800 train samples / 2 ranks = 900 per rank = 18 batches of 50 per epoch
    assert result["metrics"]["step"] == 3 * 18
    assert read_state(result["checkpoint"]).step == 54
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.workers"] == "2" and run.data.params["model.name"] == "vae"
    assert len(run.data.tags["dataset_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "figures")}
    assert artifacts == {"figures/samples.png", "figures/reconstructions.png", "figures/interpolation.png"}
    assert {a.path for a in client.list_artifacts(result["run_id"], "model")} == {"model/config.json",
                                                                                 "model/model.safetensors",
                                                                                 "model/dataset.json"}


def _train_worker_pids(started_after: float):
    """Ray titles its worker processes after the actor they host (ray::RayTrainWorker...); only those
    started by this test under this session's raylet count, not leftovers of other runs or the workers
    of another Ray on the machine (a second pytest-xdist worker runs its own)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in psutil.process_iter(["cmdline", "create_time", "ppid"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if (cmdline.startswith("ray::RayTrainWorker") and proc.info["create_time"] >= started_after
                and proc.info["ppid"] == raylet):
            pids.append(proc.pid)
    return pids


def test_killed_worker_is_recovered_from_checkpoint(ray_session, shapes_dataset, tmp_path):
    config = shapes_config(shapes_dataset, tmp_path, "killed", epochs=6)
    outcome = {}
    started = time.time() - 1.0
    thread = threading.Thread(target=lambda: outcome.update(run_training(config)))
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 180
    registered = []
    while time.time() < deadline and len(registered) < 2:  # checkpoints the controller has registered
        try:
            registered = json.loads(snapshot.read_text())["checkpoint_results"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            registered = []
        time.sleep(0.5)
    assert registered, "no checkpoint was registered"
    step_before_kill = max(r["metrics"]["step"] for r in registered)
    pids = _train_worker_pids(started)
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "checkpoint" in outcome
    final = read_state(outcome["checkpoint"])
    assert final.step == 6 * 18  # finished every step exactly once
    assert len(final.resumed_from) == 1
    # restarted from a real checkpoint, not from scratch, and lost at most one checkpoint interval
    # (6 steps): the newest folder seen may still have been uploading when the worker died
    assert final.resumed_from[0] > 0
    assert final.resumed_from[0] >= step_before_kill - 6
    assert final.resumed_from[0] % 6 == 0 or final.resumed_from[0] % 18 == 0
