"""Registry against a real `mlflow server` process on loopback: register -> champion gate (a
worse model stays challenger) -> pull and sample; and each clear error (unknown name/alias,
unreachable server, missing or tampered artifacts)."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import free_port, running_mlflow_server, stop_process_group, wait_until_answers
from pipelines.cli import main
from pipelines.registry.versions import RegisterRequest, RegistryError, pull, register_run
from pipelines.training.sessions import LocalSession
from pipelines.registry.tracking import start_run
from pipelines.training.loop import run_loop

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifact store) on loopback."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def trained_run(uri, data, name, max_steps):
    """A real (short) training run logged to the server: metrics per epoch + model/ + figures/."""
    config = {"data": str(data), "name": name, "tracking": {"tracking_uri": uri, "experiment": "registry-tests"},
              "model": {"name": "cvae", "params": {"backbone": "mlp", "latent_dim": 6}},
              "train": {"batch_size": 32, "epochs": 1, "max_steps_per_epoch": max_steps, "checkpoint_every": 1000}}
    from pipelines.training.config import TrainConfig

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
    assert {"checksums.json", "config.json", "dataset.json", "model.safetensors", "registry.json", "signature.json",
            "MLmodel", "pyfunc_model.py", "code"} <= {p.name for p in (tmp_path / "m").iterdir()}
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

    from pipelines.batch.generate import GenerateConfig, run_generation

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


# -- the version as an MLflow model: pyfunc from code, `mlflow models serve`, old versions, no pickle --

def no_vaepipe_python(tmp_path) -> tuple[list[str], str]:
    """A python command line whose sys.path holds the venv's site-packages but no vaepipe: -I drops
    PYTHONPATH, the current folder and user site; -S skips site, so no .pth file (the editable install's
    finder is one) runs; site-packages is then put back on sys.path by hand, without its .pth files."""
    import sysconfig

    site_packages = sysconfig.get_paths()["purelib"]
    prelude = f"import sys; sys.path.append({site_packages!r})\n"
    return [sys.executable, "-I", "-S", "-c", prelude], str(tmp_path)


CONSUMER = """
import json, sys
for name in ("pipelines", "vaemodels"):
    try:
        __import__(name)
        raise SystemExit(f"{name} is importable: the test is not isolated")
    except ModuleNotFoundError:
        pass
import mlflow, numpy as np, pandas as pd
from mlflow.exceptions import MlflowException
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
import vaemodels
rows = pd.DataFrame({"label": [3, "5"], "seed": [7, 7], "temperature": [1.0, 0.5], "n": [4, 2]})
out, again = model.predict(rows), model.predict(rows)
errors = {}
for case, bad in {"label": {"label": ["nope"], "seed": [0]}, "n": {"label": [1], "seed": [0], "n": [-1]},
                  "column": {"lable": [1], "seed": [0]}}.items():
    try:
        model.predict(pd.DataFrame(bad))
    except MlflowException as exc:
        errors[case] = exc.message
print(json.dumps({"vaemodels": vaemodels.__file__, "rows": out["row"].tolist(), "labels": out["label"].tolist(),
                  "images": np.stack(out["image"]).tolist(), "latents": np.stack(out["latent"]).tolist(),
                  "same": bool(np.array_equal(np.stack(out["image"]), np.stack(again["image"]))),
                  "errors": errors}))
"""


def test_pyfunc_loads_and_predicts_without_vaepipe(mlflow_server, runs, tmp_path):
    uri = mlflow_server["uri"]
    register_run(RegisterRequest(runs["good"], "pyfunc-me", uri))
    command, cwd = no_vaepipe_python(tmp_path)
    command[-1] += CONSUMER
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([*command, uri, "models:/pyfunc-me@champion"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/vaemodels/" in result["vaemodels"]  # the model's own copy, shipped as code_paths
    assert result["rows"] == [0, 0, 0, 0, 1, 1] and result["labels"] == [3, 3, 3, 3, 5, 5] and result["same"]
    images, latents = np.array(result["images"], np.float32), np.array(result["latents"], np.float32)
    assert images.shape == (6, 1, 8, 8) and latents.shape == (6, 6) and 0 <= images.min() <= images.max() <= 1
    # the same numbers vaepipe's own loader gives for that z and label
    model, _ = pull("models:/pyfunc-me@champion", uri, tmp_path / "pulled")
    with torch.no_grad():
        decoded = model.decode(torch.from_numpy(latents), torch.tensor([3, 3, 3, 3, 5, 5])).numpy()
    assert np.allclose(images, decoded, atol=1e-5)
    # ... and the z the model's own sampler draws for that seed (a cvae's class prior, not N(0, I))
    expected_images, expected_z = model.sample_with_latent(4, torch.tensor([3] * 4), torch.Generator().manual_seed(7))
    assert np.allclose(latents[:4], expected_z.numpy(), atol=1e-5)
    assert np.allclose(images[:4], expected_images.numpy(), atol=1e-5)
    errors = result["errors"]
    assert "unknown label 'nope': use a class index 0..9 or one of 0, 1" in errors["label"]
    assert "n must be >= 1, got -1" in errors["n"]
    assert "missing inputs ['label']" in errors["column"]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_invocations(mlflow_server, runs, tmp_path):
    uri = mlflow_server["uri"]
    register_run(RegisterRequest(runs["good"], "serve-me", uri))
    port = free_port()
    # mlflow execs `uvicorn` by name: the venv's bin must be on PATH, as it is in an activated venv
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/serve-me@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_answers(f"{base}/ping", proc, 180, "mlflow models serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from None
        status, body = post(f"{base}/invocations", {"dataframe_records": [{"label": 3, "seed": 1, "n": 2},
                                                                           {"label": "4", "seed": 2}]})
        assert status == 200, body
        predictions = body["predictions"]
        assert [(p["row"], p["index"], p["label"], p["seed"]) for p in predictions] == [
            (0, 0, 3, 1), (0, 1, 3, 1), (1, 0, 4, 2)]
        image = np.array(predictions[0]["image"])
        assert image.shape == (1, 8, 8) and 0 <= image.min() <= image.max() <= 1
        assert len(predictions[0]["latent"]) == 6 and predictions[0]["class_name"] == "3"
        # seeded: the same row (here in columnar `inputs` form) gives the same samples
        again = post(f"{base}/invocations", {"inputs": {"label": [3], "seed": [1], "n": [2]}})[1]["predictions"]
        assert [p["image"] for p in again] == [p["image"] for p in predictions[:2]]
        for payload, message in [({"label": "nope", "seed": 0}, "unknown label 'nope'"),
                                 ({"label": 1, "seed": 0, "n": -3}, "n must be >= 1, got -3"),
                                 ({"lable": 1, "seed": 0}, "missing inputs ['label']")]:
            status, body = post(f"{base}/invocations", {"dataframe_records": [payload]})
            assert status == 400 and message in body["message"], body
            assert "stack_trace" not in body and "Traceback" not in body["message"]
    finally:
        stop_process_group(proc, grace=30)  # mlflow's CLI and the uvicorn server it started
        log.close()


def register_like_vaepipe_0_1(client, run_id: str, name: str) -> None:
    """What `register` did before versions were MLflow models: model/ + signature.json + flat
    checksums.json re-logged to the run, a version without MLmodel, its checksums pinned in a tag."""
    import hashlib
    import tempfile

    from pipelines.registry.versions import CHECKSUMS_TAG, file_checksums, model_signature
    import vaemodels

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, "model", tmp))
        (folder / "signature.json").write_text(json.dumps(model_signature(vaemodels.load_model(folder))))
        checksums = json.dumps(file_checksums(folder), indent=2) + "\n"
        (folder / "checksums.json").write_text(checksums)
        client.log_artifacts(run_id, str(folder), "model")
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{client.get_run(run_id).info.artifact_uri}/model",
                                          run_id=run_id, tags={CHECKSUMS_TAG: hashlib.sha256(checksums.encode()).hexdigest()})
    client.set_registered_model_alias(name, "champion", version.version)


def test_version_registered_before_mlmodel_still_pulls_and_generates(ray_session, mlflow_server, digits_dataset,
                                                                     tmp_path):
    import mlflow

    from pipelines.batch.generate import GenerateConfig, run_generation

    uri = mlflow_server["uri"]
    client = mlflow.MlflowClient(uri)
    run_id = trained_run(uri, digits_dataset, "old-format", 2)
    register_like_vaepipe_0_1(client, run_id, "old-format")
    model, info = pull("models:/old-format@champion", uri, tmp_path / "old")
    assert not (tmp_path / "old" / "MLmodel").exists() and info["model_family"] == "cvae"
    result = run_generation(GenerateConfig(model_dir=info["path"], out=str(tmp_path / "synthetic"), per_class=3,
                                           model_uri="models:/old-format@champion", model_name="old-format",
                                           model_version="1", workers=1))
    assert result["total"] == 30
    # the same run registered again under a new name becomes an MLflow model in mlflow_model/, and the old
    # version's files (pinned by its checksums tag) stay as they were: both versions pull
    new = register_run(RegisterRequest(run_id, "old-format-now", uri))
    version = client.get_model_version("old-format-now", str(new["version"]))
    assert version.source.endswith("/mlflow_model")
    pull("models:/old-format-now/1", uri, tmp_path / "new")
    assert (tmp_path / "new" / "MLmodel").is_file()
    pull("models:/old-format@champion", uri, tmp_path / "old")
    # and a third name reuses that package instead of rewriting it (its MLmodel would differ)
    third = register_run(RegisterRequest(run_id, "old-format-again", uri))
    assert client.get_model_version("old-format-again", str(third["version"])).source == version.source
    pull("models:/old-format-now/1", uri, tmp_path / "new")


class Pickled(__import__("mlflow").pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


def test_pull_refuses_a_pickled_python_model(mlflow_server, tmp_path, capsys):
    """A version logged the MLflow way with a python model object (cloudpickle) is refused by name."""
    import mlflow

    uri = mlflow_server["uri"]
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("registry-tests")
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="m", python_model=Pickled(), registered_model_name="pickled",
                                    pip_requirements=["mlflow"])
    finally:
        mlflow.set_tracking_uri(None)
    assert main(["pull", "models:/pickled/1", "--out", str(tmp_path / "p"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("pickled v1: refused: its MLmodel names python model 'python_model.pkl', which loads "
                            "by unpickling; vaepipe loads only models logged from code (re-register the run with "
                            "vaepipe)")
    assert not (tmp_path / "p").exists()
