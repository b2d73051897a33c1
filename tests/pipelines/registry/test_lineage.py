"""Lineage of generated datasets against a real `mlflow server` (issue 18): scheduled days are runs linked to
the registered version they sampled, with their seeds, rows and the dataset as an MLflow input; a rerun of a
day logs no second run and an interrupted one continues its own; --evaluate-against puts the evaluation's
numbers (and its reliability verdict) on the generation run; `vaepipe datasets` lists them. Bad input to
--evaluate-against is one line and exit 2 before anything is written (those tests need no server)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vaemodels
from pipelines.cli import main
from tests.conftest import running_mlflow_server

DAY1, DAY2 = "2026-03-09", "2026-03-10"
FAST_EVALUATION = ["--set", "evaluation.iwae_k=4", "--set", "evaluation.iwae_subset=16", "--set",
                   "evaluation.num_synthetic=100", "--set", "evaluation.anomaly_steps=20", "--set",
                   "evaluation.seeds=1", "--set", "evaluation.augmentation_fractions=[0.1]", "--set",
                   "evaluation.max_real=300"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return code, (json.loads(last) if code == 0 and last.startswith("{") else out), err


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifact store) on loopback."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="module")
def champion(mlflow_server, digits_dataset):
    """A cvae trained briefly on digits by the real loop, registered as lineage-cvae v1 (champion)."""
    from pipelines.registry.tracking import start_run
    from pipelines.registry.versions import RegisterRequest, register_run
    from pipelines.training.config import TrainConfig
    from pipelines.training.loop import run_loop
    from pipelines.training.sessions import LocalSession

    uri = mlflow_server["uri"]
    config = {"data": str(digits_dataset), "name": "lineage", "tracking": {"tracking_uri": uri, "experiment": "t"},
              "model": {"name": "cvae", "params": {"backbone": "mlp", "latent_dim": 6}},
              "train": {"batch_size": 32, "epochs": 1, "max_steps_per_epoch": 40, "checkpoint_every": 1000}}
    run_id = start_run(uri, "t", "lineage", TrainConfig.from_dict(config).to_dict(), {"dataset_sha256": "d" * 64})
    run_loop({**config, "mlflow_run_id": run_id}, LocalSession())
    registered = register_run(RegisterRequest(run_id, "lineage-cvae", uri))
    assert registered["version"] == 1
    return "models:/lineage-cvae@champion"


def generation_runs(uri, model_name="lineage-cvae"):
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("vaepipe-generation")
    runs = client.search_runs([experiment.experiment_id], "tags.`vaepipe.kind` = 'generation'")
    return client, [r for r in runs if r.data.tags.get("vaepipe.model_name") == model_name]


@pytest.fixture(scope="module")
def two_days(ray_session, mlflow_server, champion, tmp_path_factory):
    """Day 1 through the CLI, day 2 through the cluster entry point (jobs.generate), both into
    ROOT/{date} from the champion, as the CronJob runs them."""
    from jobs.generate import main as generate_job

    root = tmp_path_factory.mktemp("scheduled")
    uri = mlflow_server["uri"]
    assert main(["generate", "--model", champion, "--tracking-uri", uri, "--out", str(root / "{date}"),
                 "--per-class", "12", "--workers", "1", "--date", DAY1]) == 0
    job_config = {"model_uri": champion, "tracking_uri": uri, "out": str(root / "{date}"), "per_class": 12,
                  "workers": 1, "date": DAY2}
    assert generate_job(["--config-json", json.dumps(job_config)]) == 0
    return root


@pytest.mark.slow
@pytest.mark.ray
def test_two_scheduled_days_are_two_runs_of_one_version_with_their_own_seeds(mlflow_server, two_days, capsys):
    capsys.readouterr()
    client, runs = generation_runs(mlflow_server["uri"])
    assert len(runs) == 2
    by_day = {r.data.tags["vaepipe.date"]: r for r in runs}
    assert set(by_day) == {DAY1, DAY2}
    for day, run in by_day.items():
        manifest = json.loads((two_days / day / "manifest.json").read_text())
        assert run.info.status == "FINISHED"
        assert manifest["lineage"]["run_id"] == run.info.run_id  # the data names its run
        params = run.data.params
        assert params["model_uri"] == "models:/lineage-cvae@champion" and params["model_version"] == "1"
        assert params["seed"] == str(manifest["request"]["seed"]) and params["seed_source"] == "date"
        assert run.data.metrics["rows"] == 120 and run.data.metrics["rows.label_3"] == 12
        assert run.data.metrics["wall_seconds"] > 0
        import hashlib

        digest = hashlib.sha256((two_days / day / "manifest.json").read_bytes()).hexdigest()
        assert run.data.tags["vaepipe.manifest_sha256"] == digest
        inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i for i in run.inputs.dataset_inputs}
        generated = inputs["generated"]
        assert generated.dataset.digest == digest[:32]
        assert json.loads(generated.dataset.source)["uri"] == str(two_days / day)
        assert {t.key: t.value for t in generated.tags}["model_version"] == "1"
        assert "model_training_data" in inputs  # the digits manifest the model learned from
    assert by_day[DAY1].data.params["seed"] != by_day[DAY2].data.params["seed"]
    version = client.get_model_version("lineage-cvae", "1")
    assert version.tags["vaepipe.latest_generated_dataset"] == str(two_days / DAY2)
    assert version.tags["vaepipe.latest_generation_run"] == by_day[DAY2].info.run_id


@pytest.mark.slow
@pytest.mark.ray
def test_rerun_of_a_day_logs_no_second_run_and_a_resume_continues_its_run(mlflow_server, champion, two_days,
                                                                           capsys):
    uri = mlflow_server["uri"]
    client, before = generation_runs(uri)
    day1 = {r.data.tags["vaepipe.date"]: r.info.run_id for r in before}[DAY1]
    argv = ["generate", "--model", champion, "--tracking-uri", uri, "--out", two_days / "{date}", "--per-class",
            12, "--workers", 1, "--date", DAY1]
    code, result, _ = run_cli(capsys, *argv)
    assert code == 0 and result["skipped"] and result["lineage_run_id"] == day1
    assert len(generation_runs(uri)[1]) == 2

    # killed mid-run: its run stays RUNNING, the folder has no _SUCCESS and misses a block
    out = two_days / DAY1
    client.update_run(day1, status="RUNNING")
    (out / "_SUCCESS").unlink()
    marker = json.loads((out / "_blocks" / "block-000000.json").read_text())
    for entry in marker["files"]:
        (out / entry["path"]).unlink()
    (out / "_blocks" / "block-000000.json").unlink()
    code, result, err = run_cli(capsys, *argv)
    assert code == 0 and not result["skipped"] and result["blocks_written"] == 1
    assert result["lineage_run_id"] == day1 and f"resuming lineage run {day1}" in err
    _, after = generation_runs(uri)
    assert len(after) == 2
    run = client.get_run(day1)
    assert run.info.status == "FINISHED" and run.data.tags["vaepipe.resumed"] == "1"
    assert json.loads((out / "manifest.json").read_text())["lineage"]["run_id"] == day1


@pytest.mark.slow
@pytest.mark.ray
def test_evaluate_against_puts_the_numbers_and_the_verdict_on_the_run(mlflow_server, champion, digits_dataset,
                                                                      tmp_path, capsys):
    """A one-step reference classifier cannot judge: the metrics still land on the generation run, and the
    run, the version and `vaepipe datasets` all say the numbers are unreliable."""
    uri = mlflow_server["uri"]
    code, result, err = run_cli(capsys, "generate", "--model", champion, "--tracking-uri", uri, "--out",
                                tmp_path / "judged", "--per-class", 10, "--workers", 1, "--evaluate-against",
                                digits_dataset, *FAST_EVALUATION, "--set", "evaluation.classifier_steps=1")
    assert code == 0, err
    evaluation = result["evaluation"]
    assert evaluation["out"] == str(tmp_path / "judged" / "evaluation") and not evaluation["skipped"]
    assert (tmp_path / "judged" / "evaluation" / "metrics.json").is_file()
    assert evaluation["reliability"]["reliable"] is False and "WARNING" in err
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result["lineage_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("cas", "fid", "reference_accuracy", "augmentation_gain_10pct", "rows"):
        assert key in run.data.metrics, key
    assert run.data.metrics["cas"] == pytest.approx(evaluation["metrics"]["cas"])
    assert run.data.metrics["reference_reliable"] == 0.0
    assert run.data.tags["vaepipe.evaluation_reliable"] == "false"
    assert run.data.tags["vaepipe.usefulness"].startswith("cas=") and "UNRELIABLE" in run.data.tags["vaepipe.usefulness"]
    assert "evaluation/metrics.json" in [f.path for f in client.list_artifacts(run.info.run_id, "evaluation")]
    version = client.get_model_version("lineage-cvae", "1")
    assert "UNRELIABLE" in version.tags["vaepipe.latest_generated_dataset_usefulness"]
    assert version.tags["vaepipe.latest_generation_run"] == run.info.run_id

    # the same command again: nothing generated, nothing evaluated twice
    code, again, err = run_cli(capsys, "generate", "--model", champion, "--tracking-uri", uri, "--out",
                               tmp_path / "judged", "--per-class", 10, "--workers", 1, "--evaluate-against",
                               digits_dataset, *FAST_EVALUATION, "--set", "evaluation.classifier_steps=1")
    assert code == 0 and again["skipped"] and again["evaluation"]["skipped"]
    assert again["lineage_run_id"] == run.info.run_id

    # the operator's view: this dataset, flagged, beside the scheduled ones
    code, listing, _ = run_cli(capsys, "datasets", "--tracking-uri", uri, "--model", "lineage-cvae", "--json")
    assert code == 0
    row = next(r for r in listing["datasets"] if r["run_id"] == run.info.run_id)
    assert row["model"] == "lineage-cvae v1" and row["rows"] == 100 and row["location"] == str(tmp_path / "judged")
    assert row["headline_metric"] == "cas" and row["reliable"] is False and row["usefulness"].endswith("UNRELIABLE")


@pytest.mark.slow
@pytest.mark.ray
def test_datasets_lists_every_generated_dataset_as_a_table_and_json(mlflow_server, two_days, capsys):
    uri = mlflow_server["uri"]
    code, listing, _ = run_cli(capsys, "datasets", "--tracking-uri", uri, "--json")
    assert code == 0 and listing["tracking_uri"] == uri
    scheduled = {r["date"]: r for r in listing["datasets"] if r["location"] in (str(two_days / DAY1),
                                                                               str(two_days / DAY2))}
    assert set(scheduled) == {DAY1, DAY2}
    for day, row in scheduled.items():
        assert row["model"] == "lineage-cvae v1" and row["model_version"] == "1" and row["rows"] == 120
        assert row["usefulness"] == "-" and row["status"] == "FINISHED"
    code, table, _ = run_cli(capsys, "datasets", "--tracking-uri", uri)
    lines = table.strip().splitlines()
    assert code == 0 and lines[0].split()[:4] == ["DATE", "MODEL", "ROWS", "USEFULNESS"]
    assert any(DAY2 in line and "lineage-cvae v1" in line and str(two_days / DAY2) in line for line in lines[1:])
    code, empty, _ = run_cli(capsys, "datasets", "--tracking-uri", uri, "--model", "no-such-model", "--json")
    assert code == 0 and empty["datasets"] == []


# -- without a tracking URI, and bad input (no server needed) -----------------------------------------

@pytest.fixture(scope="module")
def cvae_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), num_classes=10, backbone="mlp", latent_dim=4, hidden_dim=32)
    return vaemodels.save_model(model, tmp_path_factory.mktemp("models") / "cvae")


def npz_dataset(tmp_path, name, shape, classes):
    from pipelines.data import BuildConfig, build_dataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (60, *shape), dtype=np.uint8),
             y=np.arange(60) % classes)
    build_dataset(BuildConfig(f"npz:{tmp_path / f'{name}.npz'}", str(tmp_path / name)))
    return tmp_path / name


@pytest.mark.parametrize("shape, classes, message", [
    ((16, 16), 10, "holds images of shape (1, 16, 16) but the model makes (1, 8, 8)"),
    ((8, 8), 2, "has 2 classes but the 'cvae' model has 10"),
])
def test_evaluate_against_a_dataset_the_model_does_not_fit_is_refused_before_writing(
        cvae_folder, tmp_path, capsys, monkeypatch, shape, classes, message):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = npz_dataset(tmp_path, "other", shape, classes)
    code, _, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", tmp_path / "g", "--per-class", 5,
                           "--evaluate-against", data)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("vaepipe: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("extra, message", [
    (["--set", "evaluation.classifer_steps=5"], "unknown config key(s): classifer_steps"),
    (["--set", "evaluation.synthetic=x"], "evaluation.synthetic is set by generate itself"),
    (["--set", "evaluation.seeds=0"], "seeds must be >= 1"),
])
def test_bad_evaluation_budget_is_refused_before_writing(cvae_folder, digits_dataset, tmp_path, capsys, extra,
                                                         message):
    code, _, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", tmp_path / "g", "--per-class", 5,
                           "--evaluate-against", digits_dataset, *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


def test_evaluate_against_a_missing_dataset_is_one_line(cvae_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", tmp_path / "g", "--per-class", 5,
                           "--evaluate-against", tmp_path / "nowhere")
    assert code == 2 and "no dataset manifest at" in err and not (tmp_path / "g").exists()


def test_datasets_needs_a_tracking_store_that_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run_cli(capsys, "datasets")
    assert code == 2 and "datasets needs --tracking-uri" in err
    code, _, err = run_cli(capsys, "datasets", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}")
    assert code == 2 and "no MLflow store at" in err and not (tmp_path / "typo.db").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_without_a_tracking_uri_or_with_no_track_nothing_is_logged(ray_session, cvae_folder, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's own default store would land here: it must not appear
    code, result, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", tmp_path / "plain",
                                "--per-class", 3, "--workers", 1)
    assert code == 0 and result["lineage_run_id"] is None and "no lineage run: no tracking URI" in err
    assert "lineage" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    code, result, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", tmp_path / "untracked",
                                "--per-class", 3, "--workers", 1, "--no-track")
    assert code == 0 and result["lineage_run_id"] is None and "track is off" in err
    # the same with tracking (from the environment): a run for a model folder, which has no registered version
    code, result, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", tmp_path / "tracked",
                                "--per-class", 3, "--workers", 1)
    assert code == 0 and result["lineage_run_id"] and "not a registered version" in err
    import mlflow

    run = mlflow.MlflowClient(store).get_run(result["lineage_run_id"])
    assert run.data.params["model_version"] == "(unregistered)"
    assert run.data.params["model_dir"] == str(Path(cvae_folder).resolve())
    assert len(run.data.params["model_config_sha256"]) == 64
    manifest = json.loads((tmp_path / "tracked" / "manifest.json").read_text())
    assert manifest["lineage"] == {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                   "tracking_uri": store}


def test_a_generation_refused_before_writing_leaves_no_run(cvae_folder, tmp_path, capsys):
    """Another run holds the folder: the refusal is one line, and the lineage run opened for it is deleted."""
    import fcntl

    import mlflow

    from pipelines.batch.job import LOCK_NAME

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / LOCK_NAME, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_cli(capsys, "generate", "--model", cvae_folder, "--out", out, "--per-class", 3,
                               "--tracking-uri", store)
    assert code == 2 and "is in use by another generate run" in err
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("vaepipe-generation")
    assert client.search_runs([experiment.experiment_id]) == []
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
