"""Registry against a real `mlflow server` process on loopback: register -> champion gate (a
worse model stays challenger) -> pull and sample; and each clear error (unknown name/alias,
unreachable server, missing or tampered artifacts)."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from pipelines.cli import main
from pipelines.registry import RegisterRequest, RegistryError, pull, register_run
from pipelines.sessions import LocalSession
from pipelines.tracking import start_run
from pipelines.train_loop import run_loop

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifact store) on loopback."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not come up in 90 s"
            time.sleep(0.5)
    yield {"uri": uri, "artifacts": root / "artifacts"}
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker processes
    proc.wait(timeout=30)


def trained_run(uri, data, name, max_steps):
    """A real (short) training run logged to the server: metrics per epoch + model/ + figures/."""
    config = {"data": str(data), "name": name, "tracking": {"tracking_uri": uri, "experiment": "registry-tests"},
              "model": {"name": "cvae", "params": {"backbone": "mlp", "latent_dim": 6}},
              "train": {"batch_size": 32, "epochs": 1, "max_steps_per_epoch": max_steps, "checkpoint_every": 1000}}
    from pipelines.train_config import TrainConfig

    run_id = start_run(uri, "registry-tests", name, TrainConfig.from_dict(config).to_dict(),
                       {"dataset_sha256": "d" * 64})
    run_loop({**config, "mlflow_run_id": run_id}, LocalSession())
    return run_id


@pytest.fixture(scope="module")
def runs(mlflow_server, digits_dataset):
    uri = mlflow_server["uri"]
    return {"good": trained_run(uri, digits_dataset, "good", 50), "bad": trained_run(uri, digits_dataset, "bad", 2)}


def test_gate_promotes_better_and_keeps_worse_as_challenger(mlflow_server, runs, capsys):
    uri = mlflow_server["uri"]
    first = register_run(RegisterRequest(runs["good"], "digits-cvae", uri))
    assert first["version"] == 1 and first["aliases"] == ["champion"] and first["decision"] == "promoted"
    second = register_run(RegisterRequest(runs["bad"], "digits-cvae", uri))
    assert second["version"] == 2 and second["aliases"] == ["challenger"]
    assert second["decision"] == "kept_as_challenger" and second["value"] < second["champion_value"]
    assert "does not beat" in capsys.readouterr().err
    import mlflow

    client = mlflow.MlflowClient(uri)
    assert client.get_model_version_by_alias("digits-cvae", "champion").version == "1"
    v2 = client.get_model_version("digits-cvae", "2")
    assert v2.tags["gate_decision"] == "kept_as_challenger"
    assert float(v2.tags["gate_champion_value"]) == pytest.approx(first["value"], rel=1e-4)
    assert v2.tags["dataset_sha256"] == "d" * 64 and "metric.iwae_log_likelihood" in v2.tags
    # --force promotes anyway, loudly; the run is already version 2, so no duplicate version is made
    assert main(["register", "--run", runs["bad"], "--name", "digits-cvae", "--tracking-uri", uri, "--force"]) == 0
    out, err = capsys.readouterr()
    forced = json.loads(out.strip().splitlines()[-1])
    assert forced["version"] == 2 and forced["aliases"] == ["champion"] and "WARNING: --force" in err
    assert len(client.search_model_versions("name = 'digits-cvae'")) == 2


def test_pull_from_server_loads_a_ready_model(mlflow_server, runs, tmp_path):
    uri = mlflow_server["uri"]
    register_run(RegisterRequest(runs["good"], "pull-me", uri))
    model, info = pull("models:/pull-me@champion", uri, tmp_path / "m")
    assert info["version"] == 1 and info["model_family"] == "cvae"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "checksums.json", "config.json", "dataset.json", "model.safetensors", "registry.json", "signature.json"]
    assert info["class_names"] == [str(d) for d in range(10)]  # the digits dataset's, carried by the model
    images = model.sample(10, labels=torch.arange(10), generator=torch.Generator().manual_seed(0))
    assert images.shape == (10, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    signature = json.loads((tmp_path / "m" / "signature.json").read_text())
    assert '"z"' in signature["inputs"] and '"label"' in signature["inputs"]
    again, _ = pull("models:/pull-me/1", uri, tmp_path / "m")  # re-pull of the same version refreshes
    assert torch.equal(again.sample(3, labels=torch.arange(3), generator=torch.Generator().manual_seed(0)),
                       model.sample(3, labels=torch.arange(3), generator=torch.Generator().manual_seed(0)))


def test_clear_errors(mlflow_server, runs, tmp_path):
    uri = mlflow_server["uri"]
    register_run(RegisterRequest(runs["good"], "errs", uri))
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        pull("models:/nope@champion", uri, tmp_path / "a")
    with pytest.raises(RegistryError, match=r"no alias 'staging'; its aliases: champion \(v1\)"):
        pull("models:/errs@staging", uri, tmp_path / "b")
    with pytest.raises(RegistryError, match="has no version 7"):
        pull("models:/errs/7", uri, tmp_path / "c")
    with pytest.raises(RegistryError, match="models:/NAME@ALIAS"):
        pull("errs", uri, tmp_path / "d")
    with pytest.raises(RegistryError, match="has no metric 'fid'"):
        register_run(RegisterRequest(runs["good"], "errs", uri, metric="fid"))
    started = time.time()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match=f"cannot reach the MLflow tracking server at {dead}"):
        pull("models:/errs@champion", dead, tmp_path / "e")
    assert time.time() - started < 10
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="is not empty"):
        pull("models:/errs@champion", uri, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_tampered_or_missing_artifacts_are_refused(mlflow_server, digits_dataset, tmp_path):
    uri = mlflow_server["uri"]
    run_id = trained_run(uri, digits_dataset, "tamper", 2)
    register_run(RegisterRequest(run_id, "tampered", uri))
    weights = next(mlflow_server["artifacts"].rglob(f"{run_id}/artifacts/model/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="checksum mismatch for model.safetensors"):
        pull("models:/tampered@champion", uri, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    weights.unlink()
    with pytest.raises(RegistryError, match="missing: model.safetensors"):
        pull("models:/tampered@champion", uri, tmp_path / "t")


def test_pulled_champion_generates_2000_per_class(ray_session, mlflow_server, runs, tmp_path):
    """The chain users run: register -> pull from the server -> Ray Data generation, exact counts."""
    import pyarrow.dataset as pads
    from PIL import Image

    from pipelines.generate import GenerateConfig, run_generation

    uri = mlflow_server["uri"]
    register_run(RegisterRequest(runs["good"], "chain", uri))
    model, info = pull("models:/chain@champion", uri, tmp_path / "model")
    result = run_generation(GenerateConfig(model_dir=info["path"], out=str(tmp_path / "synthetic"), per_class=2000,
                                           model_uri="models:/chain@champion", model_name="chain",
                                           model_version=str(info["version"]), block_size=2000, workers=2))
    assert result["total"] == 20000 and result["per_class"] == {str(k): 2000 for k in range(10)}
    table = pads.dataset(tmp_path / "synthetic" / "parquet", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 20000 and len(set(table.column("id").to_pylist())) == 20000
    counts = table.group_by("label").aggregate([("id", "count")]).to_pydict()
    assert sorted(counts["id_count"]) == [2000] * 10
    assert set(table.column("model_version").to_pylist()) == {str(info["version"])}
    pngs = list((tmp_path / "synthetic" / "images").glob("*/*.png"))
    assert len(pngs) == 20000 and Image.open(pngs[0]).size == (8, 8)
