"""The table family through the unchanged commands (issue 15): build the bundled student_placements
table -> train tvae -> register -> generate --per-class from the registry URI -> evaluate, all through
the `vaepipe` CLI, with a real MLflow SQLite store and Ray Data. Checks what a user relies on: the
generated Parquet has the original columns, dtypes and categories, partitioned by label, in the
counts asked for; the evaluation writes every table metric, the report and its figures."""
import json

import numpy as np
import pandas as pd
import pytest

from pipelines.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.ray
def test_train_register_generate_evaluate_a_table(ray_session, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data, runs = str(tmp_path / "sp"), tmp_path / "runs"
    built = run(capsys, "data", "build", "--source", "student_placements", "--out", data, "--val-fraction", "0.25",
                "--shard-size", "60")
    assert built["modality"] == "table" and built["label"] == "placed" and built["shards"]["train"] == 3
    assert run(capsys, "data", "verify", data, "--count")["counted"] == {"train": 161, "val": 54}

    trained = run(capsys, "train", "--data", data, "--model", "tvae", "--workers", "0", "--epochs", "3",
                  "--batch-size", "32", "--storage", str(runs), "--name", "tab", "--latent-dim", "16")
    assert np.isfinite(trained["metrics"]["val_elbo"])
    uri = f"sqlite:///{runs}/mlflow.db"
    registered = run(capsys, "register", "--run", trained["run_id"], "--name", "placements", "--tracking-uri", uri)
    assert registered["aliases"] == ["champion"]

    generated = run(capsys, "generate", "--model", "models:/placements@champion", "--tracking-uri", uri,
                    "--out", str(tmp_path / "syn"), "--per-class", "40", "--seed", "3", "--workers", "1")
    assert generated["per_class"] == {"0": 40, "1": 40} and generated["images"] is None
    assert not (tmp_path / "syn" / "images").exists()
    synthetic = pd.read_parquet(tmp_path / "syn" / "parquet")
    real = pd.read_parquet(tmp_path / "sp" / "train").drop(columns="__vaepipe_index__")
    assert set(synthetic.columns) == set(real.columns) | {"label"}
    for column in real.columns:  # the original dtypes and category values
        assert synthetic[column].dtype == real[column].dtype, column
        if real[column].dtype in (object, bool):
            assert set(synthetic[column].dropna()) <= set(real[column].dropna()), column
    # partitioned by label, and the label column says the same class as its partition
    assert (synthetic["placed"] == (synthetic["label"].astype(int) == 1)).all()
    assert sorted(p.name for p in (tmp_path / "syn" / "parquet").iterdir()) == ["label=0", "label=1"]
    # the same request again does nothing
    again = run(capsys, "generate", "--model", "models:/placements@champion", "--tracking-uri", uri,
                "--out", str(tmp_path / "syn"), "--per-class", "40", "--seed", "3", "--workers", "1")
    assert again["skipped"] is True

    evaluated = run(capsys, "evaluate", "--model", "models:/placements@champion", "--tracking-uri", uri,
                    "--data", data, "--out", str(tmp_path / "report"), "--synthetic", str(tmp_path / "syn"))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    expected = {"quality_score", "column_shapes", "column_pair_trends", "tstr_accuracy", "trtr_accuracy",
                "tstr_ratio", "tstr_f1", "trtr_f1", "detection_auroc", "dcr_synthetic_median",
                "dcr_holdout_median", "dcr_ratio", "exact_copy_fraction", "holdout_exact_copy_fraction"}
    assert expected <= set(metrics) and expected <= set(evaluated)  # the JSON line holds the metrics flat
    assert 0 <= metrics["quality_score"] <= 1 and 0 <= metrics["detection_auroc"] <= 1
    assert metrics["trtr_accuracy"] > 0.8  # salary is missing exactly for unplaced students
    assert (tmp_path / "report" / "marginals.png").is_file() and (tmp_path / "report" / "correlations.png").is_file()
    assert (tmp_path / "report" / "report.html").read_text().count("<img") == 2
