"""`vaepipe generate --latent-prior mixture`: the rows' codes are exactly draws from the mixture fitted
to the real train codes (recorded in the manifest by its sha256), a rerun gives the same bytes, the
request differs from the model-prior one, and a dataset that does not fit fails before anything is
written."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vaemodels
from pipelines.batch.generate import GenerateConfig, block_seed, run_generation
from pipelines.batch.job import OutputExistsError
from pipelines.batch.latent_prior import fit_latent_prior
from pipelines.config import ConfigError
from pipelines.data.manifest import read_manifest
from pipelines.evaluation.data import embed, load_split

PER_CLASS, BLOCK, BATCH, COMPONENTS = 30, 100, 64, 3


@pytest.fixture(scope="module")
def cvae_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), 10, backbone="mlp", latent_dim=4, hidden_dim=32)
    return str(vaemodels.save_model(model, tmp_path_factory.mktemp("models") / "cvae"))


def request(model_dir, out, **overrides):
    return GenerateConfig.from_dict({"model_dir": model_dir, "out": str(out), "per_class": PER_CLASS,
                                     "block_size": BLOCK, "batch_size": BATCH, "workers": 1, "seed": 5,
                                     **overrides})


def mixture(model_dir, out, data, **overrides):
    return request(model_dir, out, **{"latent_prior": "mixture", "prior_data": str(data),
                                      "prior_components": COMPONENTS, **overrides})


@pytest.fixture(scope="module")
def generated(ray_session, cvae_dir, digits_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture") / "run"
    return run_generation(mixture(cvae_dir, out, digits_dataset))


def rows(out):
    return pd.read_parquet(Path(out) / "parquet").sort_values("sample_index").reset_index(drop=True)


def test_rows_hold_exact_draws_from_the_mixture_fitted_to_the_train_codes(generated, cvae_dir, digits_dataset):
    model = vaemodels.load_model(cvae_dir)
    prior, entry = fit_latent_prior(model, str(digits_dataset), COMPONENTS, 20_000, 5)
    manifest = json.loads((Path(generated["out"]) / "manifest.json").read_text())
    assert manifest["request"]["latent_prior"] == entry
    assert entry["kind"] == "mixture" and entry["components"] == COMPONENTS
    assert entry["images"] == read_manifest(str(digits_dataset)).num_samples("train")
    assert entry["data_sha256"] == read_manifest(str(digits_dataset)).sha256()

    table = rows(generated["out"])
    assert len(table) == 10 * PER_CLASS
    # replay block 0: its labels (class by class), the block's CPU generator, BATCH codes at a time
    labels = torch.tensor(np.repeat(np.arange(10), PER_CLASS)[:BLOCK])
    generator = torch.Generator().manual_seed(block_seed(5, 0))
    replay = torch.cat([prior.sample(len(labels[i:i + BATCH]), labels[i:i + BATCH], generator)
                        for i in range(0, BLOCK, BATCH)])
    written = torch.tensor(np.stack(table["latent"][:BLOCK].to_numpy()))
    assert torch.equal(written, replay)

    # and those codes sit where each class's real codes are: per class, the codes' mean is near the mean
    # of that class's posterior means (the model's own learned prior starts at N(0, I) for every class)
    split = load_split(read_manifest(str(digits_dataset)), "train", 20_000, 5)
    with torch.no_grad():
        codes = embed(model.eval(), split)
    all_written = torch.tensor(np.stack(table["latent"].to_numpy()))
    written_labels = torch.tensor(table["sample_index"].to_numpy() // PER_CLASS)
    for label in range(10):
        real = codes[split.labels == label]
        gap = torch.linalg.norm(all_written[written_labels == label].mean(0) - real.mean(0))
        assert gap < 0.5 * float(real.std(0).mean()) + 0.05


def test_a_rerun_is_the_same_bytes_and_the_model_prior_is_another_request(generated, cvae_dir, digits_dataset,
                                                                           tmp_path):
    again = run_generation(mixture(cvae_dir, tmp_path / "again", digits_dataset))
    first, second = rows(generated["out"]), rows(again["out"])
    assert first["image"].tolist() == second["image"].tolist()
    assert np.array_equal(np.stack(first["latent"]), np.stack(second["latent"]))

    plain = run_generation(request(cvae_dir, tmp_path / "plain"))
    plain_manifest = json.loads((Path(plain["out"]) / "manifest.json").read_text())
    assert "latent_prior" not in plain_manifest["request"]  # model-prior requests are what they always were
    assert not np.array_equal(np.stack(rows(plain["out"])["latent"]), np.stack(first["latent"]))
    with pytest.raises(OutputExistsError, match=r"a different request \(differs in: .*latent_prior"):
        run_generation(request(cvae_dir, generated["out"]))


def test_bad_prior_requests_fail_before_anything_is_written(cvae_dir, digits_dataset, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="latent_prior=mixture needs prior_data"):
        request(cvae_dir, out, latent_prior="mixture")
    with pytest.raises(ConfigError, match="prior_data is only read with latent_prior=mixture"):
        request(cvae_dir, out, prior_data=str(digits_dataset))
    with pytest.raises(ConfigError, match="latent_prior must be one of model, mixture, got 'gmm'"):
        request(cvae_dir, out, latent_prior="gmm")
    with pytest.raises(ConfigError, match="prior_components must be >= 1, got 0"):
        mixture(cvae_dir, out, digits_dataset, prior_components=0)
    with pytest.raises(ConfigError, match=r"prior_data: no dataset manifest at .*nowhere"):
        run_generation(mixture(cvae_dir, out, tmp_path / "nowhere"))
    wrong_shape = r"prior_data: the model takes images of shape \(1, 8, 8\) but the dataset .* holds \(1, 64, 64\)"
    with pytest.raises(ConfigError, match=wrong_shape):
        run_generation(mixture(cvae_dir, out, shapes_dataset))
    three = vaemodels.build("cvae", (1, 64, 64), 10, backbone="mlp", latent_dim=4, hidden_dim=16)
    with pytest.raises(ConfigError, match="prior_data: the 'cvae' model has 10 classes but the dataset has 3"):
        run_generation(mixture(str(vaemodels.save_model(three, tmp_path / "m64")), out, shapes_dataset))
    assert not out.exists()
