"""infra/local/start-stack.sh and stop-stack.sh for real: a Ray head, a second Ray node joined to
it and an MLflow server come up on loopback and answer at the addresses in the env file; stopping
leaves no process of theirs behind (and touches no other Ray on the machine)."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "infra" / "local"
SERVICE_PIDS = ("RAY_HEAD_PID", "RAY_NODE1_PID", "MLFLOW_PID")


def read_env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def running(pid: int) -> bool:
    """Alive and not a zombie (zombies are dead; this machine's init does not always reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def processes_in_sessions(session_ids: set[int]) -> list[int]:
    """Every running process whose session is one of `session_ids` (each service is its own session)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) in session_ids and running(int(entry)):
                    found.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def ray_token(values: dict[str, str]) -> str | None:
    if values.get("RAY_AUTH_MODE") != "token":
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return os.environ.get("RAY_AUTH_TOKEN") or path.read_text().strip()


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def run_script(name: str, env_file: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VAEPIPE_STACK_DIR")}
    return subprocess.run([str(LOCAL / name), str(env_file)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "stack.env"
    yield path
    if path.exists():  # the test failed before stopping the stack: stop it anyway
        run_script("stop-stack.sh", path, timeout=120)


def stack_state(values: dict[str, str], exc: subprocess.TimeoutExpired) -> str:
    """For a timed-out command: its stderr, `ray status` and the submitted job's log tail."""
    import re

    stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    parts = [f"command stderr:\n{stderr[-2000:]}"]
    try:
        ray = str(Path(sys.executable).parent / "ray")
        status = subprocess.run([ray, "status", "--address", values["RAY_ADDRESS"]],
                                env={**os.environ, "RAY_AUTH_MODE": values.get("RAY_AUTH_MODE", "disabled")},
                                capture_output=True, text=True, timeout=60)
        parts.append(f"ray status:\n{status.stdout[-2000:]}{status.stderr[-1000:]}")
        job = re.search(r"submitted as (\S+)", stderr)
        if job:
            body = get(f"{values['RAY_DASHBOARD_ADDRESS']}/api/jobs/{job.group(1)}/logs", ray_token(values))[1]
            parts.append(f"job {job.group(1)} log tail:\n{json.loads(body).get('logs', '')[-3000:]}")
    except Exception as err:  # the diagnosis must not hide the timeout
        parts.append(f"(could not read the stack's state: {err!r})")
    return "\n".join(parts)


def vaepipe(values: dict[str, str], *args: str, timeout: float = 600) -> dict:
    """Run a vaepipe command against the stack; returns its JSON result line."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE=values.get("RAY_AUTH_MODE", "disabled"))
    try:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # say what the cluster and the job were doing, not only "timed out"
        pytest.fail(f"vaepipe {' '.join(args[:2])} timed out after {timeout:.0f} s\n{stack_state(values, exc)}")
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_register_generate_chain(values: dict[str, str], data: Path, work: Path) -> None:
    """A tiny train job -> register on the stack's MLflow server -> a 2-trial search job -> a generation
    job from the registry, all through the Ray Jobs API with the stack's MLflow server."""
    import mlflow
    import pyarrow.dataset as pads
    import yaml

    mlflow_uri, dashboard = values["MLFLOW_TRACKING_URI"], values["RAY_DASHBOARD_ADDRESS"]
    train = work / "train.yaml"
    train.write_text(yaml.safe_dump({
        "data": str(data), "name": "stack-chain", "storage": str(work / "runs"),
        "model": {"name": "vae", "params": {"backbone": "mlp", "latent_dim": 4}},
        "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 5},
        "scaling": {"workers": 2},  # one worker per node of the stack
        "tracking": {"tracking_uri": mlflow_uri, "experiment": "stack-chain"},
    }))
    trained = vaepipe(values, "submit", "train", "--address", dashboard, "--config", str(train))
    assert trained["status"] == "SUCCEEDED" and trained["result"]["metrics"]["step"] == 5
    registered = vaepipe(values, "register", "--run", trained["result"]["run_id"], "--name", "stack-vae",
                         "--tracking-uri", mlflow_uri)
    assert registered["version"] == 1 and registered["aliases"] == ["champion"]
    tune = work / "tune.yaml"
    tune.write_text(yaml.safe_dump({
        "base": {"data": str(data), "storage": str(work / "tune"),
                 "model": {"name": "beta_vae", "params": {"backbone": "mlp", "hidden_dim": 32}},
                 "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 3},
                 "tracking": {"tracking_uri": mlflow_uri, "experiment": "stack-chain-search"}},
        "search": {"beta": [1.0, 4.0], "latent_dim": [4]}, "name": "stack-search",
    }))
    searched = vaepipe(values, "submit", "tune", "--address", dashboard, "--config", str(tune))
    assert searched["status"] == "SUCCEEDED" and len(searched["result"]["trials"]) == 2
    children = mlflow.MlflowClient(mlflow_uri).search_runs(
        [mlflow.MlflowClient(mlflow_uri).get_experiment_by_name("stack-chain-search").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{searched['result']['parent_run_id']}'")
    assert len(children) == 2
    generate = work / "generate.yaml"
    generate.write_text(yaml.safe_dump({
        "model_uri": "models:/stack-vae@champion", "tracking_uri": mlflow_uri, "out": str(work / "synthetic" / "{date}"),
        "num_samples": 300, "block_size": 100, "workers": 2,
    }))
    generated = vaepipe(values, "submit", "generate", "--address", dashboard, "--config", str(generate))
    assert generated["status"] == "SUCCEEDED" and generated["result"]["total"] == 300
    out = Path(generated["result"]["out"])
    assert (out / "_SUCCESS").is_file() and out.parent == work / "synthetic"
    assert pads.dataset(out / "parquet", format="parquet", partitioning="hive").count_rows() == 300
    version = mlflow.MlflowClient(mlflow_uri).get_model_version_by_alias("stack-vae", "champion")
    assert version.run_id == trained["result"]["run_id"]


def test_stack_starts_two_ray_nodes_and_mlflow_then_stops_without_leftovers(env_file, digits_dataset, tmp_path):
    started = run_script("start-stack.sh", env_file, timeout=240)
    assert started.returncode == 0, started.stderr[-3000:]
    values = read_env_file(env_file)
    assert values["RAY_ADDRESS"].startswith("127.0.0.1:")
    assert values["RAY_DASHBOARD_ADDRESS"].startswith("http://127.0.0.1:")
    assert values["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    pids = {name: int(values[name]) for name in SERVICE_PIDS}
    assert len(set(pids.values())) == 3
    stack_dir = Path(values["VAEPIPE_STACK_DIR"])
    assert stack_dir.is_dir()

    # two nodes, seen through the dashboard's state API (what `ray list nodes` reads) ...
    token = ray_token(values)
    dashboard = values["RAY_DASHBOARD_ADDRESS"]
    status, body = get(f"{dashboard}/api/v0/nodes?limit=100&detail=false", token)
    nodes = json.loads(body)["data"]["result"]["result"]
    alive = [node for node in nodes if node["state"] == "ALIVE"]
    assert status == 200 and len(alive) == 2 and len({node["node_id"] for node in alive}) == 2
    assert sum(node["is_head_node"] for node in alive) == 1
    # ... and through the GCS address the env file gives (what ray.init(address=...) uses)
    # the autoscaler's view lags the GCS by a few seconds: poll it with a deadline
    deadline = time.time() + 60
    while True:
        ray_status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address",
                                     values["RAY_ADDRESS"]],
                                    env={**os.environ, "RAY_AUTH_MODE": values["RAY_AUTH_MODE"]},
                                    capture_output=True, text=True, timeout=60)
        assert ray_status.returncode == 0, ray_status.stderr[-2000:]
        active = ray_status.stdout.split("Active:")[1].split("Pending:")[0]
        if active.count("node_") == 2 or time.time() > deadline:
            break
        time.sleep(1)
    assert active.count("node_") == 2, ray_status.stdout
    assert get(f"{dashboard}/api/version", token)[0] == 200  # the Jobs API `vaepipe submit` talks to
    assert get(f"{values['MLFLOW_TRACKING_URI']}/health") == (200, b"OK")
    train_register_generate_chain(values, digits_dataset, tmp_path)
    spawned = processes_in_sessions(set(pids.values()))
    assert len(spawned) > 10  # gcs, raylets, dashboard, agents, mlflow's workers: all under our sessions

    stopped = run_script("stop-stack.sh", env_file, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not env_file.exists()
    assert processes_in_sessions(set(pids.values())) == []
    assert [name for name, pid in pids.items() if running(pid)] == []
    assert not stack_dir.exists()  # a folder start-stack.sh created is removed
