"""Session-wide fixtures: one Ray instance for the whole test session, small real datasets."""
import os

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
