"""The fast path's tracking process: a real child process writing into a real SQLite MLflow store,
its answers read back with MLflow's own client, and its failures (bad requests, an unreachable
server, a child that dies mid-run) raised as TrackingError in the parent."""
import os
import signal

import pytest

from pipelines.registry.sidecar import SidecarTracker, TrackingSidecar
from pipelines.registry.tracking import TrackingError
from tests.conftest import free_port


@pytest.fixture
def sidecar(tmp_path):
    process = TrackingSidecar(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield process
    process.close()


def start(sidecar, name="run"):
    return sidecar.call("start_run", experiment="sidecar-test", run_name=name, params={"model": {"name": "vae"}},
                        tags={"dataset": "d"})


def test_metrics_artifacts_and_status_land_in_the_store(sidecar, tmp_path):
    import mlflow

    run_id = start(sidecar)
    tracker = SidecarTracker(sidecar)
    for epoch in (1, 2, 3):
        tracker.log_metrics({"val_elbo": -100.0 - epoch, "epoch": epoch}, step=epoch)  # not waited for
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00\x01" * 50)
    (tmp_path / "grid.png").write_bytes(b"png bytes")
    tracker.log_artifacts(str(tmp_path / "model"), "model")
    tracker.log_artifact(str(tmp_path / "grid.png"), "figures")
    sidecar.call("end_run", status="FINISHED")
    assert sidecar.call("final_metrics") == {"val_elbo": -103.0, "epoch": 3.0}

    client = mlflow.MlflowClient(sidecar.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.name"] == "vae" and run.data.tags["dataset"] == "d"
    history = client.get_metric_history(run_id, "val_elbo")
    assert [(m.step, m.value) for m in history] == [(1, -101.0), (2, -102.0), (3, -103.0)]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["figures", "model"]
    local = client.download_artifacts(run_id, "model/weights.bin", str(tmp_path / "back"))
    assert open(local, "rb").read() == b"\x00\x01" * 50


def test_attach_continues_an_existing_run_and_names_an_unknown_one(sidecar, tmp_path):
    run_id = start(sidecar)
    sidecar.call("end_run", status="FAILED")
    second = TrackingSidecar(sidecar.tracking_uri)
    try:
        assert second.call("attach", run_id=run_id) == run_id
        SidecarTracker(second).log_metrics({"epoch": 7}, step=7)
        second.call("end_run", status="FINISHED")
        assert second.call("final_metrics") == {"epoch": 7.0}
        with pytest.raises(TrackingError, match="0123456789abcdef"):
            second.call("attach", run_id="0123456789abcdef")
    finally:
        second.close()


def test_a_failed_request_is_raised_even_when_it_was_not_waited_for(sidecar):
    SidecarTracker(sidecar).log_metrics({"epoch": 1}, step=1)  # no run yet: this one fails in the child
    with pytest.raises(TrackingError, match="no MLflow run started"):
        start(sidecar)  # ...and its error surfaces at the next wait
    with pytest.raises(TrackingError, match="unknown tracking request 'drop_table'"):
        sidecar.call("drop_table")
    assert sidecar.call("final_metrics") == {}  # the run from `start` above was created; the child lives on


def test_an_unreachable_server_is_named(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    process = TrackingSidecar(uri)
    try:
        with pytest.raises(TrackingError, match=f"cannot reach the MLflow tracking server at {uri}"):
            start(process)
    finally:
        process.close()


def test_a_child_that_dies_mid_run_is_a_tracking_error(sidecar):
    start(sidecar)
    os.kill(sidecar._process.pid, signal.SIGKILL)
    sidecar._process.wait()
    with pytest.raises(TrackingError, match=r"tracking process .* exited \(status -9\)"):
        sidecar.call("end_run", status="FINISHED")


def test_close_stops_an_idle_child_at_once(tmp_path):
    process = TrackingSidecar(f"sqlite:///{tmp_path / 'mlflow.db'}")
    process.close()  # still importing MLflow: nothing was asked, so it is not waited for
    assert process._process.returncode is not None
