"""Training as users run it from the shell: `vaepipe train` killed mid-run and continued with
`--resume`, and a run on a real 2-node local Ray cluster. Each starts its own Ray in a
subprocess, apart from the test session's instance."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.training.checkpoints import read_state

pytestmark = [pytest.mark.slow]
VAEPIPE = [sys.executable, "-m", "pipelines.cli"]


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def test_killed_run_continues_with_resume(shapes_dataset, tmp_path):
    storage = tmp_path / "runs"
    args = ["train", "--data", str(shapes_dataset), "--model", "vae", "--epochs", "4", "--batch-size", "50",
            "--storage", str(storage), "--name", "stopped", "--set", "model.params.backbone=mlp",
            "--set", "train.checkpoint_every=6", "--set", "scaling.max_failures=0"]
    driver = subprocess.Popen(VAEPIPE + args, env=clean_env(), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    run_dir = storage / "stopped"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(run_dir.glob("checkpoint_*/state.json"))) < 2:
        assert driver.poll() is None, "training ended before it could be stopped"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait(timeout=60)
    first_run = json.loads((run_dir / "vaepipe-run.json").read_text())

    resumed = subprocess.run(VAEPIPE + ["train", "--resume", "stopped", "--storage", str(storage)],
                             env=clean_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["run_id"] == first_run["mlflow_run_id"]  # same MLflow run continues
    state = read_state(result["checkpoint"])
    assert state.step == 4 * 36  # one worker: 1,800 samples / 50 per batch per epoch
    assert len(state.resumed_from) == 1 and state.resumed_from[0] >= 6


def test_resume_of_unknown_run_is_a_clear_error(tmp_path):
    done = subprocess.run(VAEPIPE + ["train", "--resume", "nope", "--storage", str(tmp_path)],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no run named 'nope'" in done.stderr


def test_two_node_local_cluster_run(shapes_dataset, tmp_path):
    script = textwrap.dedent(f"""
        import json, ray
        from ray.cluster_utils import Cluster
        from pipelines.training.train import run_training
        from pipelines.training.config import TrainConfig

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        result = run_training(TrainConfig.from_dict({{
            "data": "{shapes_dataset}", "name": "two-nodes", "storage": "{tmp_path / 'runs'}",
            "model": {{"name": "vae", "params": {{"backbone": "mlp", "latent_dim": 4}}}},
            "train": {{"epochs": 1, "batch_size": 50, "max_steps_per_epoch": 6}},
            # one CPU per worker and one CPU per node: the two ranks must sit on different nodes
            "scaling": {{"workers": 2, "cpus_per_worker": 1.0}},
        }}))
        print(json.dumps({{"nodes": len(nodes), **result}}))
        ray.shutdown()
        cluster.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True,
                          timeout=400, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2
    assert read_state(result["checkpoint"]).step == 6
    assert "val_elbo" in result["metrics"]
