"""`vaepipe train --workers 0`: the same loop in the calling process, no Ray; checkpoints in
STORAGE/NAME like Ray Train's, MLflow tracking, and a real SIGKILL resumed with `--resume`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.training.checkpoints import read_state
from pipelines.cli import main

pytestmark = pytest.mark.slow


def train_args(data, storage, name, epochs):
    return ["train", "--data", str(data), "--model", "vae", "--workers", "0", "--epochs", str(epochs),
            "--batch-size", "32", "--storage", str(storage), "--name", name,
            "--set", "model.params.backbone=mlp", "--set", "train.checkpoint_every=5"]


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_in_process_training_tracks_and_checkpoints_without_ray(digits_dataset, tmp_path, capsys):
    import mlflow
    import ray

    was_running = ray.is_initialized()
    assert main(train_args(digits_dataset, tmp_path / "runs", "local", 2)) == 0
    result = last_json(capsys.readouterr().out)
    assert ray.is_initialized() == was_running  # no Ray was started for it
    # 1,617 train samples, batch 32: 50 steps per epoch
    assert result["metrics"]["step"] == 100
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "local").glob("checkpoint_*"))
    assert len(checkpoints) == 3 and Path(result["checkpoint"]).name == checkpoints[-1]  # newest 3 kept
    assert read_state(result["checkpoint"]).step == 100
    run = mlflow.MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["epoch"] == 2
    assert run.data.params["scaling.workers"] == "0"


def test_killed_in_process_run_resumes_from_its_checkpoint(digits_dataset, tmp_path):
    storage = tmp_path / "runs"
    command = [sys.executable, "-m", "pipelines.cli", *train_args(digits_dataset, storage, "killed", 3)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    deadline = time.monotonic() + 120
    while not list((storage / "killed").glob("checkpoint_*")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = read_state(sorted((storage / "killed").glob("checkpoint_*"))[-1]).step
    assert killed_at < 150  # checkpoints every 5 steps take most of the run's time: it was killed mid-way

    resumed = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--resume", "killed",
                              "--storage", str(storage)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = last_json(resumed.stdout)
    state = read_state(result["checkpoint"])
    assert state.step == 150  # 3 epochs x 50 steps: nothing lost, nothing done twice
    assert state.resumed_from and state.resumed_from[0] >= killed_at


def test_a_run_that_fails_mid_training_is_marked_failed_and_keeps_its_error(digits_dataset, tmp_path):
    import mlflow

    args = train_args(digits_dataset, tmp_path / "runs", "diverges", 2)
    args += ["--set", "optim.lr=1e12", "--set", "optim.grad_clip=null"]
    from pipelines.training.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):  # the training error, not a tracking one
        main(args)
    info = json.loads((tmp_path / "runs" / "diverges" / "vaepipe-run.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(info["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.params["optim.lr"] == "1000000000000.0"
