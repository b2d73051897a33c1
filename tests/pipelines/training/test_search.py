"""Grid search with Ray Tune + ASHA on the session's local Ray: a β × latent-size grid on digits,
tracked as a parent MLflow run with one child per trial; a failing grid point is reported while
the rest of the search goes on. Config validation is checked without Ray."""
import json
from pathlib import Path

import pytest

from pipelines.training.checkpoints import read_state
from pipelines.config import ConfigError
from pipelines.training.search_config import TuneConfig

EPOCHS = 3


def digits_search(data, tmp_path, name, search, epochs=EPOCHS, **params):
    return TuneConfig.from_dict({
        "base": {
            "data": str(data), "storage": str(tmp_path / "runs"),
            "model": {"name": "beta_vae", "params": {"backbone": "mlp", "hidden_dim": 32, **params}},
            "train": {"batch_size": 32, "epochs": epochs, "max_steps_per_epoch": 8},
        },
        "search": {"max_concurrent": 2, **search},
        "name": name,
    })


# -- validation at the edge (no Ray) --------------------------------------------------------------

@pytest.mark.parametrize("data, named", [
    ({"base": {"data": "d"}, "search": {"betas": [1.0]}}, "search.betas"),
    ({"base": {"data": "d", "optim": {"lrr": 1}}, "search": {"beta": [1.0]}}, "base.optim.lrr"),
    ({"base": {"data": "d"}, "search": {"beta": [1.0]}, "schedular": {}}, "schedular"),
    ({"base": {"data": "d"}, "search": {"beta": [1.0], "mode": "maximize"}}, "search.mode"),
    ({"base": {"data": "d"}, "search": {}}, "at least one axis"),
    ({"base": {"data": "d"}, "search": {"extra": {"optim.lrate": [1e-3]}}}, "optim.lrate"),
    ({"base": {"data": "d"}, "search": {"extra": {"optim": [1e-3]}}}, "section"),
    ({"base": {"data": "d"}, "search": {"extra": {"model.params.beta": [1.0]}}}, "search.beta"),
    ({"base": {"data": "d"}, "search": {"extra": {"optim.lr": []}}}, "search.extra.optim.lr"),
    ({"base": {"data": "d"}, "search": {"extra": {"scaling.workers": [1, 2]}}}, "scaling.workers"),
    ({"base": {"data": "d"}, "search": {"latent_dim": [4, "ten"]}}, "search.latent_dim[1]"),
    ({"base": {"data": "d", "scaling": {"workers": 2}}, "search": {"beta": [1.0]}}, "base.scaling.workers"),
    ({"base": {"data": "d"}, "search": {"beta": [1.0]}, "scheduler": {"reduction_factor": 1}},
     "scheduler.reduction_factor"),
])
def test_config_errors_name_the_key(data, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        TuneConfig.from_dict(data)


def test_axes_are_dotted_keys_and_repeats_are_seeds():
    config = TuneConfig.from_dict({"base": {"data": "d", "train": {"seed": 7}},
                                   "search": {"beta": [1, 4], "extra": {"optim.lr": [1e-3]}, "num_samples": 3}})
    assert config.search.beta == [1.0, 4.0]
    assert config.axes() == {"model.params.beta": [1.0, 4.0], "optim.lr": [1e-3], "train.seed": [7, 8, 9]}


# -- searches on Ray (marked per test, so the checks above stay in the fast suite) -------------

@pytest.mark.ray
@pytest.mark.slow
def test_grid_search_with_asha_tracks_parent_and_children(ray_session, digits_dataset, tmp_path):
    import mlflow
    import pandas as pd

    from pipelines.training.search import run_search

    config = digits_search(digits_dataset, tmp_path, "grid", {"beta": [1.0, 4.0], "latent_dim": [4, 10]})
    result = run_search(config)

    trials = result["trials"]
    assert len(trials) == 4
    assert {(t["beta"], t["latent_dim"]) for t in trials} == {(1.0, 4), (1.0, 10), (4.0, 4), (4.0, 10)}
    assert all(t["status"] in ("finished", "stopped") and t["error"] is None for t in trials)
    # ASHA's decisions: a trial stopped early ran fewer epochs; every other one ran them all
    for t in trials:
        assert 1 <= t["epochs_run"] <= EPOCHS
        assert (t["status"] == "stopped") == (t["epochs_run"] < EPOCHS)
    # Trials 2 and 3 (latent 10) trail latent 4 by ~0.3 nats at epoch 1, so ASHA (grace 1, factor 2:
    # rungs at epochs 1 and 2) stops them there; it may also stop the loser of the near-tie at latent 4.
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    assert {t["epochs_run"] for t in stopped} <= {1, 2}  # ASHA decides only at its rungs
    assert sum(t["epochs_run"] for t in trials) < 4 * EPOCHS

    # the best trial is the one with the highest final val_elbo
    best_row = max(trials, key=lambda t: t["val_elbo"])
    assert result["best"]["run_id"] == best_row["run_id"]
    assert result["best"]["config"] == {"beta": best_row["beta"], "latent_dim": best_row["latent_dim"]}
    assert result["best"]["metrics"]["val_elbo"] == pytest.approx(best_row["val_elbo"])
    assert read_state(result["best"]["checkpoint"]).epoch == best_row["epochs_run"]

    client = mlflow.MlflowClient(result["tracking_uri"])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best.beta"] == str(best_row["beta"])
    assert parent.data.metrics["best_val_elbo"] == pytest.approx(best_row["val_elbo"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 4
    assert {c.info.run_id for c in children} == {t["run_id"] for t in trials}
    for t in trials:
        child = client.get_run(t["run_id"])
        assert child.info.status == "FINISHED"
        assert child.data.tags["vaepipe.tune.status"] == t["status"]
        assert child.data.params["model.params.beta"] == str(t["beta"])
        history = client.get_metric_history(t["run_id"], "val_elbo")
        assert [m.step for m in history] == list(range(1, t["epochs_run"] + 1))
        assert history[-1].value == pytest.approx(t["val_elbo"])
        figures = {a.path for a in client.list_artifacts(t["run_id"], "figures")}
        assert figures == {"figures/samples.png", "figures/reconstructions.png", "figures/interpolation.png"}
        assert {a.path for a in client.list_artifacts(t["run_id"], "model")} == {"model/config.json",
                                                                                 "model/model.safetensors",
                                                                                 "model/dataset.json"}

    artifacts = {a.path for a in client.list_artifacts(result["parent_run_id"])}
    assert {"search_results.csv", "search_results.parquet", "objective_heatmap.png"} <= artifacts
    table = pd.read_parquet(result["results_table"])
    assert len(table) == 4 and set(table["run_id"]) == {t["run_id"] for t in trials}
    assert {"beta", "latent_dim", "val_elbo", "epochs_run", "status", "run_id"} <= set(table.columns)

    saved = Path(config.base.storage) / "grid" / "search_result.json"
    assert json.loads(saved.read_text()) == json.loads(json.dumps(result))


@pytest.mark.ray
@pytest.mark.slow
def test_failed_trial_is_reported_and_the_rest_still_give_a_best(ray_session, digits_dataset, tmp_path):
    import mlflow

    from pipelines.training.search import run_search

    # hidden_dim=-1 is refused by the model's config inside that one trial (0 now means the backbone's own width)
    config = digits_search(digits_dataset, tmp_path, "one-fails",
                           {"latent_dim": [4], "extra": {"model.params.hidden_dim": [-1, 16]}}, epochs=2)
    result = run_search(config)

    by_hidden = {t["model.params.hidden_dim"]: t for t in result["trials"]}
    assert set(by_hidden) == {-1, 16}
    failed, ok = by_hidden[-1], by_hidden[16]
    assert failed["status"] == "error" and "hidden_dim" in failed["error"] and "ConfigError" in failed["error"]
    assert failed["epochs_run"] == 0 and failed["val_elbo"] is None
    assert ok["status"] == "finished" and ok["error"] is None
    assert result["best"]["run_id"] == ok["run_id"]
    # β is no axis here: the row shows beta_vae's default, the value every trial trained with
    assert result["best"]["config"] == {"beta": 4.0, "latent_dim": 4, "model.params.hidden_dim": 16}

    client = mlflow.MlflowClient(result["tracking_uri"])
    assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
    failed_run = client.get_run(failed["run_id"])
    assert failed_run.info.status == "FAILED"
    assert "hidden_dim" in failed_run.data.tags["vaepipe.tune.error"]
    artifacts = {a.path for a in client.list_artifacts(result["parent_run_id"])}
    assert "objective_heatmap.png" in artifacts  # drawn with one β and one latent size
