"""`vaepipe submit JOB`: run a job entry point (jobs/JOB.py) on a Ray cluster through Ray's Jobs
API (JobSubmissionClient). The config travels inline as JSON and the project folder as the job's
working_dir, so the cluster needs no disk shared with the submitter. Logs stream back; the
job's final status becomes the exit code."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.config import apply_overrides, load_config_file

JOBS = ("train", "tune", "generate")
EXCLUDES = [".venv", ".git", "demo", "runs", "mlruns", "*.db", "tests", "benchmarks", "infra", "__pycache__", "*.egg-info"]


def submit(job: str, address: str, config_file: str, assignments: list[str] | None = None,
           working_dir: str = ".", wait: bool = True, timeout_s: float = 3600) -> dict[str, Any]:
    use_token_if_present()  # before Ray reads its auth config
    from ray.job_submission import JobStatus, JobSubmissionClient

    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")
    if not (Path(working_dir) / "jobs" / f"{job}.py").is_file():
        raise ValueError(f"--working-dir {working_dir} has no jobs/{job}.py (run from the project folder)")
    config = apply_overrides(load_config_file(config_file), assignments or [])
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # connection errors come in several types
        raise ValueError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None
    entrypoint = f"python -m jobs.{job} --config-json {_shell_quote(json.dumps(config))}"
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": working_dir, "excludes": EXCLUDES})
    print(f"[submit] {job} submitted as {job_id} to {address}", file=sys.stderr)
    if not wait:
        return {"job_id": job_id, "status": "SUBMITTED"}
    printed, deadline = 0, time.monotonic() + timeout_s
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stderr.write(logs[printed:])
            printed = len(logs)
        if status in terminal or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    result_line = next((line for line in reversed(logs.strip().splitlines()) if line.startswith("{")), None)
    return {"job_id": job_id, "status": str(status.value if hasattr(status, "value") else status),
            "result": json.loads(result_line) if result_line else None}


def use_token_if_present() -> None:
    """Recent Ray clusters require a token on the Jobs API (token written to ~/.ray/auth_token by
    `ray start`, or given as RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); the client sends it only in
    token mode, so switch that on when a token is available and the user chose no mode."""
    import os

    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
