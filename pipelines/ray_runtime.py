"""Joining or starting Ray, shared by the stages that run on it (training, search, the batch jobs)."""
from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Join `address` or RAY_ADDRESS when given (e.g. "auto" for the cluster this node belongs to,
    or the address Ray sets inside a job); otherwise start a fresh local instance. Not attaching
    silently to whatever cluster last ran on this machine keeps local runs local."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True,
                 include_dashboard=False, configure_logging=False)
