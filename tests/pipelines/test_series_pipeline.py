"""The series modality end to end on the bundled example (aeon's GunPoint), through the same commands as
images: data build -> train (ctimevae) -> register -> generate (models:/ URI, Parquet list columns per
label, plots) -> evaluate (MiniRocket TSTR/TRTR, TimeGAN scores + baselines, report). Plus the series
generation block's mapping back to source units, and the requests series generation refuses."""
import json

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

import vaemodels
from pipelines.batch.generate_series import SCHEMA, SeriesGenerateBlock
from pipelines.batch.job import BlockWriter
from pipelines.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_series_block_writes_windows_in_source_units(tmp_path):
    """Generated windows are the model's standardised samples times the train std plus the train mean."""
    torch.manual_seed(0)
    model = vaemodels.build("ctimevae", (2, 1, 20), 3, latent_dim=3)
    folder = vaemodels.save_model(model, tmp_path / "m")
    series = {"channels": 2, "length": 20, "channel_names": ["a", "b"],
              "normalisation": {"mean": [100.0, -5.0], "std": [10.0, 0.5]}}
    (folder / "dataset.json").write_text(json.dumps({"class_names": ["x", "y", "z"], "modality": "series",
                                                     "series": series}))
    block = {"index": 0, "seed": 11, "start": 0, "count": 6, "labels": [0, 0, 1, 1, 2, 2]}
    fn = SeriesGenerateBlock(str(folder), False, 8, 1.0, 0, {"name": "n", "version": "1", "uri": "u"},
                             ["x", "y", "z"], series, plots_per_class=2)
    writer = BlockWriter(tmp_path / "out")
    assert fn(block, writer) == {"0": 2, "1": 2, "2": 2}
    table = ds.dataset(str(tmp_path / "out" / "parquet"), format="parquet", partitioning="hive").to_table()
    assert table.schema.field("series").type == SCHEMA.field("series").type
    rows = table.to_pandas().sort_values("sample_index")
    values = np.array([np.stack(r) for r in rows["series"]])
    expected = model.eval().sample(6, torch.tensor(block["labels"]), torch.Generator().manual_seed(11))[:, :, 0]
    expected = expected.numpy() * np.array([10.0, 0.5])[None, :, None] + np.array([100.0, -5.0])[None, :, None]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-4)
    assert rows["class_name"].tolist() == ["x", "x", "y", "y", "z", "z"]
    assert sorted(p.name for p in (tmp_path / "out" / "plots").iterdir()) == ["x", "y", "z"]


@pytest.mark.slow
@pytest.mark.ray
def test_gunpoint_through_train_register_generate_evaluate(tmp_path, capsys, ray_session):
    data, storage = tmp_path / "gunpoint", tmp_path / "runs"
    built = run(capsys, "data", "build", "--source", "aeon:GunPoint", "--out", data, "--val-fraction", "0.25",
                "--shard-size", "50")
    assert built["modality"] == "series" and built["samples"] == {"train": 150, "val": 50}

    trained = run(capsys, "train", "--data", data, "--model", "ctimevae", "--workers", "0", "--epochs", "6",
                  "--batch-size", "32", "--latent-dim", "8", "--storage", storage, "--name", "gp")
    assert trained["metrics"]["val_elbo"] > -400  # an untrained model sits near -800 nats per window
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    registered = run(capsys, "register", "--run", trained["run_id"], "--name", "gp-ctimevae", "--tracking-uri", uri)
    assert registered["version"] == 1 and "champion" in registered["aliases"]

    out = tmp_path / "synthetic"
    generated = run(capsys, "generate", "--model", "models:/gp-ctimevae@champion", "--tracking-uri", uri,
                    "--out", out, "--per-class", 60, "--plots-per-class", 3, "--workers", 1)
    assert generated["modality"] == "series" and generated["per_class"] == {"0": 60, "1": 60}
    assert generated["images"] == str(out / "plots") and generated["total"] == 120
    table = ds.dataset(str(out / "parquet"), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 120 and sorted(set(table.column("class_name").to_pylist())) == ["1", "2"]
    assert np.array(table.column("series").to_pylist()).shape == (120, 1, 150)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modality"] == "series" and manifest["series"]["normalisation"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["1", "2"]
    again = run(capsys, "generate", "--model", "models:/gp-ctimevae@champion", "--tracking-uri", uri,
                "--out", out, "--per-class", 60, "--plots-per-class", 3, "--workers", 1)
    assert again["skipped"] is True

    report = tmp_path / "report"
    metrics = run(capsys, "evaluate", "--model", "models:/gp-ctimevae@champion", "--tracking-uri", uri,
                  "--data", data, "--out", report, "--synthetic", out, "--classifier-steps", 40, "--seeds", 1,
                  "--iwae-k", 10)
    for key in ("trtr_accuracy", "tstr_accuracy", "cas_ratio", "discriminative_score",
                "discriminative_score_real_baseline", "predictive_score", "predictive_score_real_baseline",
                "elbo", "iwae_log_likelihood"):
        assert key in metrics, key
    assert metrics["trtr_accuracy"] >= 0.9  # MiniRocket on real GunPoint
    assert 0 <= metrics["discriminative_score"] <= 0.5 and metrics["predictive_score"] > 0
    document = json.loads((report / "metrics.json").read_text())
    assert document["modality"] == "series" and set(document["cas_per_class"]) == {"1", "2"}
    assert "overlay.png" in (report / "report.html").read_text() and (report / "overlay.png").is_file()

    # a series model with an image-only option, and against image data: one line, exit 2
    model_dir = tmp_path / "pulled"
    run(capsys, "pull", "models:/gp-ctimevae@champion", "--out", model_dir, "--tracking-uri", uri)
    assert main(["generate", "--model", str(model_dir), "--out", str(tmp_path / "f"), "--per-class", "5",
                 "--filter-classifier", str(report), "--filter-confidence", "0.9"]) == 2
    assert "does not apply to series models" in capsys.readouterr().err
    digits = tmp_path / "digits"
    run(capsys, "data", "build", "--source", "digits", "--out", digits, "--limit", "100")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(digits), "--out", str(tmp_path / "r2")]) == 2
    assert "model reads series data but" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"image_format": "shards"}, "image_format='shards' is for image models; .* makes series data"),
    ({"image_format": "none"}, "image_format='none' is for image models"),
])
def test_series_generation_refuses_image_only_options(tmp_path, overrides, message):
    from pipelines.batch.generate import plan_generation
    from pipelines.batch.generate_config import GenerateConfig
    from pipelines.config import ConfigError

    folder = vaemodels.save_model(vaemodels.build("timevae", (1, 1, 16), latent_dim=2), tmp_path / "m")
    (folder / "dataset.json").write_text(json.dumps({"class_names": ["a"], "modality": "series", "series": {
        "channels": 1, "length": 16, "normalisation": {"mean": [0.0], "std": [1.0]}}}))
    with pytest.raises(ConfigError, match=message):
        plan_generation(GenerateConfig(model_dir=str(folder), out=str(tmp_path / "o"), num_samples=4, **overrides))
    assert not (tmp_path / "o").exists()
