"""`vaepipe submit` against a real `ray start --head` on loopback (its own cluster, with the
dashboard's Jobs API): a tiny training job succeeds, a broken one returns non-zero."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import free_port, stop_process_group, wait_until_answers
import yaml

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ports = {name: free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port")}
    bin_dir = Path(sys.executable).parent
    args = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2",
            "--disable-usage-stats"] + [f"--{k}={v}" for k, v in ports.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    # it answers 401 without a token: up all the same
    wait_until_answers(f"{address}/api/version", proc, 120, "ray start (the Jobs API)", any_http_status=True)
    yield address
    stop_process_group(proc, grace=60)  # `ray start --block` and the head's processes


def vaepipe(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submitted_training_job_succeeds(ray_head, digits_dataset, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "data": str(digits_dataset), "name": "submitted", "storage": str(tmp_path / "runs"),
        "model": {"name": "vae", "params": {"backbone": "mlp", "latent_dim": 4}},
        "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 5},
    }))
    done = vaepipe("submit", "train", "--address", ray_head, "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED"
    assert result["result"]["metrics"]["step"] == 5
    assert "[submit] train submitted as" in done.stderr
    assert (tmp_path / "runs" / "submitted" / "vaepipe-run.json").is_file()


def test_failing_job_returns_non_zero(ray_head, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": str(tmp_path / "no-such-dataset")}))
    done = vaepipe("submit", "train", "--address", ray_head, "--config", str(config))
    assert done.returncode == 1
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "FAILED"
    assert "no dataset manifest" in done.stderr
