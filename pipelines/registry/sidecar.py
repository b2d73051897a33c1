"""The driver's MLflow calls for `vaepipe train`, made from a helper process.

Importing MLflow and opening its SQLAlchemy store costs ~2.5 s of CPU on 2 cores. A background
thread would hold the GIL against the training loop; that was measured at +2.3 s on a 3-s loop.
So a child process imports MLflow, opens the store and creates the run while the driver imports
torch and, on the Ray path, starts Ray. After that the child makes every MLflow call the driver
makes for the run. With `--workers 0` that is every call, since the loop runs in the driver.

The protocol is one JSON object per line on the child's stdin:
`{"op": NAME, "args": {...}}`. Each request gets one line back on the child's original
stdout: `{"ok": VALUE}` or `{"error": MESSAGE, "type": EXCEPTION_NAME}`. Replies come in
request order. The child's fd 1 is pointed at stderr, so a stray print from MLflow cannot
corrupt the protocol. The child ignores Ctrl-C, so the parent can still mark the run FAILED.
It exits when its stdin closes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from pipelines.registry.tracking import TrackingError


class TrackingSidecar:
    """The parent's end: sends requests, reads the answers in order. `send` does not wait, and its
    errors surface on the next `call` or `wait`; calls that hand over files the parent deletes
    afterwards (artifacts) use `call`, which waits."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        # the child imports this package from where the parent did (a checkout, a Ray job's working dir)
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._process = subprocess.Popen([sys.executable, "-m", "pipelines.registry.sidecar", tracking_uri],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                         env=env)
        self._pending: deque[int] = deque()  # tickets sent, not yet answered
        self._answers: dict[int, Any] = {}
        self._next = 0
        self._deferred: TrackingError | None = None  # a `send` that failed, raised at the next wait

    def send(self, op: str, **args: Any) -> int:
        """Queue a request; returns a ticket for `wait`."""
        line = json.dumps({"op": op, "args": args}) + "\n"
        try:
            self._process.stdin.write(line)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._died() from None
        ticket = self._next
        self._next += 1
        self._pending.append(ticket)
        return ticket

    def wait(self, ticket: int) -> Any:
        """The answer to `ticket` (reading every earlier answer first)."""
        while ticket in self._pending:
            line = self._process.stdout.readline()
            if not line:
                raise self._died()
            answered = self._pending.popleft()
            reply = json.loads(line)
            if "error" in reply:
                error = TrackingError(reply["error"] if reply.get("type") == "TrackingError"
                                      else f"MLflow tracking failed ({reply.get('type')}): {reply['error']}")
                if answered == ticket:
                    raise error
                self._deferred = self._deferred or error
            else:
                self._answers[answered] = reply["ok"]
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        return self._answers.pop(ticket, None)

    def call(self, op: str, **args: Any) -> Any:
        return self.wait(self.send(op, **args))

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the child: at once when every request has been answered (it is idle, its writes are
        committed; a check that failed before the first request need not wait for MLflow's import),
        else after it answers the requests already sent."""
        if self._process.poll() is None and not self._pending:
            self._process.kill()
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _died(self) -> TrackingError:
        code = self._process.wait()
        return TrackingError(f"the MLflow tracking process for {self.tracking_uri} exited (status {code}) before "
                             "answering; its error is printed above")


class SidecarTracker:
    """What the training loop logs, sent to the sidecar (the `RunTracker` interface)."""

    def __init__(self, sidecar: TrackingSidecar):
        self.sidecar = sidecar

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.sidecar.send("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.sidecar.call("log_artifacts", local_dir=str(local_dir), artifact_path=artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str) -> None:
        self.sidecar.call("log_artifact", local_path=str(local_path), artifact_path=artifact_path)

    def log_final_artifacts(self, model, manifest, device) -> None:
        from pipelines.registry.tracking import log_final_artifacts

        log_final_artifacts(self, model, manifest, device)


class _Child:
    """The child's end: one MLflow client and the run it logs to."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = None
        self.run_id: str | None = None
        self.open_error: Exception | None = None
        try:  # at once, before the first request: this is the work that overlaps the parent's imports
            from pipelines.registry.tracking import check_reachable, connect

            check_reachable(tracking_uri)
            self.client = connect(tracking_uri)
            if tracking_uri.startswith("sqlite:///"):
                self.client.search_experiments(max_results=1)  # opens the store (schema check, engine)
        except Exception as exc:  # reported on the first request that needs the client
            self.open_error = exc

    def _client(self):
        if self.open_error is not None:
            raise self.open_error
        return self.client

    def start_run(self, experiment: str, run_name: str, params: dict, tags: dict, parent_run_id: str | None = None):
        from pipelines.registry.tracking import start_run

        self.run_id = start_run(self.tracking_uri, experiment, run_name, params, tags, parent_run_id=parent_run_id,
                                client=self._client())
        return self.run_id

    def attach(self, run_id: str):
        self._client().get_run(run_id)  # fails, naming the run, when the store does not hold it
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int):
        self._tracker().log_metrics(metrics, step)

    def log_artifacts(self, local_dir: str, artifact_path: str):
        self._tracker().log_artifacts(local_dir, artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str):
        self._tracker().log_artifact(local_path, artifact_path)

    def end_run(self, status: str):
        self._client().set_terminated(self._tracker().run_id, status=status)

    def final_metrics(self):
        return dict(self._client().get_run(self._tracker().run_id).data.metrics)

    def _tracker(self):
        """The RunTracker of the run started or attached, on this process's one client."""
        from pipelines.registry.tracking import RunTracker

        if self.run_id is None:
            raise TrackingError("no MLflow run started or attached in the tracking process")
        return RunTracker(self.tracking_uri, self.run_id, client=self._client())


OPS = ("start_run", "attach", "log_metrics", "log_artifacts", "log_artifact", "end_run", "final_metrics")


def serve(tracking_uri: str) -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by MLflow goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the run
    child = _Child(tracking_uri)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request.get("op") not in OPS:
                raise TrackingError(f"unknown tracking request {request.get('op')!r}")
            reply = {"ok": getattr(child, request["op"])(**request.get("args", {}))}
        except Exception as exc:
            reply = {"error": str(exc).strip().splitlines()[0][:2000] if str(exc).strip() else type(exc).__name__,
                     "type": type(exc).__name__}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
    protocol.flush()
    os._exit(0)  # skip module teardown (as the CLI does)


if __name__ == "__main__":
    serve(sys.argv[1])
