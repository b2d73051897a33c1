"""`run_evaluation` end to end on briefly trained models: which metrics it writes for which kind of
model, that they are finite numbers, that the report's figures exist and load (also in a real
browser when Chromium is installed), reading a generated Parquet folder, the reliability flag of a
reference classifier that cannot judge, real train/val images standing in for synthetic ones
(copies flagged, CAS ~ TRTR) and MLflow logging. Tests that train classifiers for many seconds
(the shapes model, the real-as-synthetic runs) and MLflow tests are marked slow."""
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vaemodels
from pipelines.config import ConfigError
from pipelines.data import read_manifest
from pipelines.data.build import encode_png
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.data import load_split
from pipelines.evaluation.evaluate import run_evaluation
from pipelines.evaluation.metrics import load_classifier, train_briefly
from pipelines.training.sessions import LocalSession
from pipelines.training.loop import run_loop

LIKELIHOOD_KEYS = {"iwae_log_likelihood", "elbo", "kl", "active_units"}
REFERENCE_KEYS = {"reference_accuracy", "reference_chance", "reference_reliable", "reference_steps", "trtr_accuracy"}
# every synthetic set: fidelity in the reference features, copying in pixel space
SYNTHETIC_KEYS = {"fid", "precision", "recall", "density", "coverage", "memorisation_ratio", "copy_fraction",
                  "val_copy_fraction", "nearest_train_distance", "val_nearest_train_distance"}
# labelled synthetic sets only (conditional models): usefulness
USEFULNESS_KEYS = {"cas", "cas_ratio", "cas_worst_class", "tstr_accuracy", "augmentation_gain",
                   "augmentation_gain_std", "augmentation_gain_10pct", "augmentation_gain_10pct_std"}
ALWAYS_KEYS = {"recon", "anomaly_auroc", "anomaly_average_precision"} | REFERENCE_KEYS
FAST = {"iwae_k": 8, "iwae_subset": 32, "num_synthetic": 300, "classifier_steps": 100, "anomaly_steps": 100,
        "augmentation_fractions": (0.1,)}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def shapes_model(shapes_dataset):
    """A beta-VAE (mlp) trained 200 steps on the shapes fixture by the real training loop."""
    session = LocalSession()
    run_loop({"data": str(shapes_dataset),
              "model": {"name": "beta_vae", "params": {"backbone": "mlp", "latent_dim": 6, "hidden_dim": 128}},
              "train": {"batch_size": 32, "epochs": 4, "max_steps_per_epoch": 50, "checkpoint_every": 1000}},
             session)
    return str(Path(session.latest_checkpoint) / "model")


@pytest.fixture(scope="module")
def shapes_evaluation(shapes_model, shapes_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation") / "shapes"
    return run_evaluation(EvaluateConfig(model=shapes_model, data=str(shapes_dataset), out=str(out), seeds=3, **FAST))


def report_images(report: Path) -> list[Path]:
    return [report.parent / src for src in re.findall(r'<img src="([^"]+)"', report.read_text())]


@pytest.mark.slow
def test_shapes_beta_vae_gets_every_metric_finite(shapes_evaluation):
    document = json.loads(Path(shapes_evaluation["metrics_path"]).read_text())
    metrics = {k: v for k, v in document.items() if k not in ("reliability", "omitted")}
    assert set(metrics) == LIKELIHOOD_KEYS | SYNTHETIC_KEYS | ALWAYS_KEYS | {"mig"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics == shapes_evaluation["metrics"]
    # an unconditional beta-VAE's samples have no labels: CAS and gains are omitted, not made up
    assert set(document["omitted"]) >= {"cas", "tstr_accuracy", "augmentation_gain"}
    assert "circular" in document["omitted"]["cas"]
    assert document["reliability"]["reliable"] == (metrics["reference_accuracy"] >= 0.9)
    assert metrics["iwae_log_likelihood"] >= metrics["elbo"] - 1.0  # IWAE bounds log p(x) tighter than the ELBO
    assert 0 <= metrics["active_units"] <= 6 and 0 <= metrics["mig"] <= 1
    for key in ("precision", "recall", "coverage", "trtr_accuracy", "anomaly_auroc", "copy_fraction"):
        assert 0 <= metrics[key] <= 1, key
    assert shapes_evaluation["non_finite"] == []
    assert "drawn from the model's prior" in shapes_evaluation["notes"]["synthetic"]
    assert "trained 100 steps without class 2" in shapes_evaluation["notes"]["anomaly"]


@pytest.mark.slow
def test_report_lists_every_metric_and_its_images_exist(shapes_evaluation):
    report = Path(shapes_evaluation["report"])
    page = report.read_text()
    for key in shapes_evaluation["metrics"]:
        assert f"<th>{key}</th>" in page
    assert page.index("Memorisation") < page.index("Reference classifier") < page.index("Fidelity")
    images = report_images(report)
    assert {p.name for p in images} == {"samples.png", "reconstructions.png", "interpolation.png", "synthetic.png",
                                        "traversals.png", "latent_pca.png"}
    for path in images:
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) >= 32
    with Image.open(report.parent / "traversals.png") as img:  # one row per latent dimension (6), 9 steps each
        assert img.size[0] > img.size[1]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package: chromium)")
def test_report_renders_in_headless_chromium(shapes_evaluation, tmp_path):
    report = Path(shapes_evaluation["report"])
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    count = len(report_images(report))
    assert f"<title>{count}/{count} images loaded</title>" in dom  # set by the page once every <img> decoded
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as img:
        gray = img.convert("L")
        assert img.size == (1200, 2000)
        assert gray.getextrema()[0] < 64 and len(gray.getcolors(1 << 16)) > 16  # text and figures, not a blank page


def write_parquet_dataset(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """The layout `vaepipe generate` writes: parquet/label=K/*.parquet with PNG bytes in `image`."""
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().flatten().tolist()
        part = folder / "parquet" / f"label={label}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"image": pa.array([encode_png(pixels[r]) for r in rows], pa.binary())}),
                       part / "block-000000.parquet")
    return folder


@pytest.fixture(scope="module")
def digits_ae(digits_dataset, tmp_path_factory):
    """A plain AE (no likelihood, cannot sample): the evaluator then judges whatever folder it is given."""
    train = load_split(read_manifest(digits_dataset), "train", 5000)
    torch.manual_seed(0)
    model = vaemodels.build("ae", (1, 8, 8), backbone="mlp", latent_dim=4, hidden_dim=64)
    return str(vaemodels.save_model(train_briefly(model, train.images, train.labels, steps=200),
                                    tmp_path_factory.mktemp("models") / "ae"))


def real_as_synthetic(digits_dataset, split: str, folder: Path) -> Path:
    real = load_split(read_manifest(digits_dataset), split, 5000)
    return write_parquet_dataset(folder, real.images, real.labels)


@pytest.mark.slow
def test_train_images_as_synthetic_are_useful_but_flagged_as_copies(digits_dataset, digits_ae, tmp_path):
    """All real train images as the 'synthetic' set: as useful as real data (CAS ~ TRTR) and close to it
    (high precision), but every sample is a copy of a training image and the memorisation check says so."""
    synthetic = real_as_synthetic(digits_dataset, "train", tmp_path / "synthetic")
    result = run_evaluation(EvaluateConfig(model=digits_ae, data=str(digits_dataset), out=str(tmp_path / "out"),
                                           synthetic=str(synthetic), **{**FAST, "num_synthetic": 2000,
                                                                        "classifier_steps": 600, "seeds": 1}))
    metrics = result["metrics"]
    assert set(metrics) == {"recon"} | SYNTHETIC_KEYS | USEFULNESS_KEYS | ALWAYS_KEYS  # no IWAE, KL, MIG
    assert "1617 samples read from" in result["notes"]["synthetic"]
    assert metrics["reference_accuracy"] >= 0.93 and metrics["reference_reliable"] == 1.0
    assert result["reliability"]["reliable"] and result["omitted"] == {}
    assert metrics["precision"] > 0.9 and metrics["density"] > 0.8
    assert abs(metrics["cas"] - metrics["trtr_accuracy"]) <= 0.04 and metrics["cas"] == metrics["tstr_accuracy"]
    assert metrics["cas_ratio"] == pytest.approx(metrics["cas"] / metrics["trtr_accuracy"])
    assert set(result["cas_per_class"]) == {str(d) for d in range(10)}
    assert metrics["cas_worst_class"] == min(result["cas_per_class"].values()) > 0.7
    assert metrics["copy_fraction"] == 1.0 and metrics["memorisation_ratio"] < 0.01
    assert metrics["val_copy_fraction"] <= 0.02  # real unseen digits are not copies
    assert metrics["augmentation_gain"] == metrics["augmentation_gain_10pct"]
    assert {"samples.png", "traversals.png"}.isdisjoint(result["figures"])  # cannot sample, no posterior
    page = Path(result["report"]).read_text()
    assert 'id="unreliable"' not in page and "Reference classifier can judge" in page
    assert page.index("<th>cas</th>") < page.index("<th>copy_fraction</th>") < page.index("<th>fid</th>")
    loaded, spec = load_classifier(result["reference_classifier"])  # what generate --filter-classifier takes
    assert spec["val_accuracy"] == pytest.approx(metrics["reference_accuracy"]) and spec["class_names"][3] == "3"


@pytest.mark.slow
def test_val_images_as_synthetic_match_real_data(digits_dataset, digits_ae, tmp_path):
    """Real val images as the 'synthetic' set lie exactly as far from train as val does (ratio 1), and a
    classifier trained on them does as well as one trained on real train (it is tested on the very
    same images, so it may do better, never much worse)."""
    synthetic = real_as_synthetic(digits_dataset, "val", tmp_path / "synthetic")
    result = run_evaluation(EvaluateConfig(model=digits_ae, data=str(digits_dataset), out=str(tmp_path / "out"),
                                           synthetic=str(synthetic), **{**FAST, "classifier_steps": 600, "seeds": 1}))
    metrics = result["metrics"]
    assert metrics["memorisation_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["copy_fraction"] == metrics["val_copy_fraction"] <= 0.02
    assert metrics["cas"] >= metrics["trtr_accuracy"] - 0.03


def test_one_step_reference_classifier_is_flagged_everywhere(digits_dataset, digits_ae, tmp_path, capfd):
    """A reference classifier that took one step cannot judge: metrics.json says so (flag, reason, the
    metrics it covers), the report shows a banner and marks each one, and stderr warns."""
    synthetic = real_as_synthetic(digits_dataset, "train", tmp_path / "synthetic")
    result = run_evaluation(EvaluateConfig(model=digits_ae, data=str(digits_dataset), out=str(tmp_path / "out"),
                                           synthetic=str(synthetic), **{**FAST, "classifier_steps": 1, "seeds": 1}))
    document = json.loads(Path(result["metrics_path"]).read_text())
    reliability = document["reliability"]
    assert reliability["reliable"] is False and document["reference_reliable"] == 0.0
    assert document["reference_steps"] == 1.0 and reliability["reference_accuracy"] < 0.9
    assert "below the floor of 0.90" in reliability["reason"]
    assert {"fid", "precision", "cas", "tstr_accuracy", "augmentation_gain_10pct"} <= set(reliability["affected"])
    assert not {"recon", "memorisation_ratio", "copy_fraction"} & set(reliability["affected"])  # pixel space
    page = Path(result["report"]).read_text()
    assert 'id="unreliable"' in page and "UNRELIABLE" in page
    assert re.search(r"<th>fid</th><td class=v>[^<]*<b class=\"bad\">unreliable</b>", page)
    err = capfd.readouterr().err
    assert re.search(r"WARNING: .*fid.* are unreliable: the reference classifier reaches", err)


@pytest.mark.slow
def test_conditional_model_with_held_out_class_logs_to_mlflow(digits_dataset, tmp_path):
    """A CVAE trained without 9s is scored directly (no retrained copy); samples come per class;
    metrics and the whole folder land in the MLflow run."""
    from pipelines.registry.tracking import connect, ensure_experiment

    train = load_split(read_manifest(digits_dataset), "train", 5000)
    keep = train.labels != 9
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), 10, backbone="mlp", latent_dim=4, hidden_dim=64)
    model_dir = vaemodels.save_model(train_briefly(model, train.images[keep], train.labels[keep], steps=300),
                                     tmp_path / "cvae")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = connect(tracking_uri)
    run_id = client.create_run(ensure_experiment(client, tracking_uri, "evaluate-test")).info.run_id
    result = run_evaluation(EvaluateConfig(model=str(model_dir), data=str(digits_dataset), out=str(tmp_path / "out"),
                                           held_out_class=9, tracking_uri=tracking_uri, run_id=run_id, **FAST))
    assert "30 samples per class drawn from the model" in result["notes"]["synthetic"]
    assert "the evaluated model, which never saw class 9" in result["notes"]["anomaly"]
    assert set(result["metrics"]) == LIKELIHOOD_KEYS | SYNTHETIC_KEYS | USEFULNESS_KEYS | ALWAYS_KEYS
    logged = client.get_run(run_id).data.metrics
    assert logged == pytest.approx(result["metrics"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/report.html", "evaluation/synthetic.png"} <= artifacts


@pytest.mark.parametrize("family", sorted(n for n, c in vaemodels.MODELS.items() if "image" in c.data_modalities))
def test_every_family_gets_the_metrics_that_apply_to_it(family, digits_dataset, tmp_path):
    """Untrained models, minimal budgets: the interface, not the numbers. Likelihood metrics and
    traversals need a posterior, synthetic-data metrics and prior samples need a generative model."""
    cls = vaemodels.MODELS[family]
    torch.manual_seed(0)
    model_dir = vaemodels.save_model(vaemodels.build(family, (1, 8, 8), 10, backbone="mlp", latent_dim=4,
                                                     hidden_dim=32), tmp_path / family)
    result = run_evaluation(EvaluateConfig(model=str(model_dir), data=str(digits_dataset), out=str(tmp_path / "out"),
                                           iwae_k=4, iwae_subset=16, num_synthetic=100, classifier_steps=20,
                                           anomaly_steps=20, seeds=1, augmentation_fractions=(0.1,)))
    expected = ALWAYS_KEYS | (LIKELIHOOD_KEYS if cls.is_variational else set()) | \
        (SYNTHETIC_KEYS if cls.is_generative else set()) | \
        (USEFULNESS_KEYS if cls.is_generative and cls.is_conditional else set())
    assert set(result["metrics"]) == expected and result["non_finite"] == []
    assert ("traversals.png" in result["figures"]) == cls.is_variational
    assert ("samples.png" in result["figures"]) == ("synthetic.png" in result["figures"]) == cls.is_generative
    assert {"reconstructions.png", "interpolation.png", "latent_pca.png"} <= set(result["figures"])


def test_load_split_draws_a_seeded_uniform_sample(digits_dataset):
    manifest = read_manifest(digits_dataset)
    everything = load_split(manifest, "train", 5000)
    first, again, other = (load_split(manifest, "train", 200, seed=s) for s in (0, 0, 1))
    assert len(everything.images) == 1617 and len(first.images) == 200
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)
    assert torch.bincount(first.labels, minlength=10).min() >= 8  # every digit, ~20 each
    assert len({tuple(x.flatten().tolist()) for x in first.images}) >= 195  # no sample twice (few duplicate digits)


def test_bad_requests_fail_before_any_work(digits_dataset, tmp_path):
    shapes_model = vaemodels.save_model(vaemodels.build("vae", (1, 64, 64), backbone="mlp", hidden_dim=8),
                                        tmp_path / "vae64")
    digits_model = vaemodels.save_model(vaemodels.build("vae", (1, 8, 8), backbone="mlp", hidden_dim=8),
                                        tmp_path / "vae8")
    with pytest.raises(ConfigError, match="unknown config key"):
        EvaluateConfig.from_dict({"model": "m", "data": "d", "out": "o", "iwae_samples": 5})
    with pytest.raises(ConfigError, match=r"augmentation_fractions must each be in \(0, 1\]"):
        EvaluateConfig(model="m", data="d", out="o", augmentation_fractions=(0.1, 1.5))
    with pytest.raises(ConfigError, match="reliability_floor must be in"):
        EvaluateConfig(model="m", data="d", out="o", reliability_floor=1.2)
    with pytest.raises(ConfigError, match="augmentation_fractions must be distinct"):
        EvaluateConfig.from_dict({"model": "m", "data": "d", "out": "o", "augmentation_fractions": [0.1, 0.1]})
    with pytest.raises(ConfigError, match="tracking_uri and run_id together"):
        EvaluateConfig(model="m", data="d", out="o", run_id="abc")
    with pytest.raises(ConfigError, match="held_out_class 10 is not a class"):
        run_evaluation(EvaluateConfig(model=str(digits_model), data=str(digits_dataset), out=str(tmp_path / "out"),
                                      held_out_class=10))
    with pytest.raises(ConfigError, match=r"shape \(1, 64, 64\).*\(1, 8, 8\)"):
        run_evaluation(EvaluateConfig(model=str(shapes_model), data=str(digits_dataset), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
