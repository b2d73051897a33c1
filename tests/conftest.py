"""Session-wide fixtures: one Ray instance for the whole test session, small real datasets."""
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, proc, seconds: float, what: str, any_http_status: bool = False) -> None:
    """Poll `url` until it answers (with any_http_status, a 401 counts: the server is up) while the
    server process `proc` runs; AssertionError names `what` when it exits or `seconds` pass."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError as exc:  # HTTPError too: an error status is an answer only with any_http_status
            if any_http_status and isinstance(exc, urllib.error.HTTPError):
                return
            assert proc.poll() is None, f"{what} exited"
            assert time.time() < deadline, f"{what} did not answer {url} in {seconds:.0f} s"
            time.sleep(0.5)


@contextmanager
def running_mlflow_server(root: Path):
    """A real `mlflow server` (SQLite backend under `root`, local artifact store) on a free loopback
    port, until the block ends: {"uri", "artifacts"}. Stopped with SIGTERM to its process group
    (the CLI and its uvicorn worker), then SIGKILL if it is still draining keep-alive clients after
    10 s, which takes longer than that on a loaded machine."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{uri}/health", proc, 90, "mlflow server")
        yield {"uri": uri, "artifacts": root / "artifacts"}
    finally:
        stop_process_group(proc, grace=10)


def stop_process_group(proc, grace: float) -> None:
    """SIGTERM to the process group of `proc` (started with start_new_session=True: a server and the
    workers it spawned), then SIGKILL if it has not exited after `grace` seconds (on a loaded
    machine servers drain keep-alive clients for longer than their tests need)."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Two cores, shared: torch's default thread pool oversubscribes them (10x slower tests)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray (start-up costs ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory):
    """scikit-learn digits as shards: 1,617 train / 180 val, 8x8, 10 classes."""
    from pipelines.data import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("datasets") / "digits"
    build_dataset(BuildConfig("digits", str(out), shard_size=400))
    return out


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    """2,000 procedural shapes (64x64) as shards: 1,800 train in 4 shards + 200 val."""
    from pipelines.data import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("datasets") / "shapes"
    build_dataset(BuildConfig("shapes", str(out), shard_size=450, limit=2000))
    return out


# Under `make test` (pytest-xdist, --dist loadgroup) each file is one unit of work, so its module
# fixtures are built once, except these files, which start Ray Train runs, Ray clusters or servers:
# they form one group that runs on one worker, one test at a time, while the other worker runs the
# rest. Two of them side by side on 2 cores make both slower than in a row, and their timeouts tight.
RAY_HEAVY_FILES = frozenset({
    "tests/infra/test_local_stack.py",
    "tests/pipelines/training/test_train_cluster.py",
    "tests/pipelines/training/test_train_ray.py",
    "tests/pipelines/training/test_search.py",
    "tests/pipelines/test_submit.py",
    "tests/pipelines/test_demo.py",
})


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("ray-heavy" if path in RAY_HEAVY_FILES else path))
