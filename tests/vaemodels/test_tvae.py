"""The tabular VAE: built from a table spec, it learns, samples valid one-hot rows per class with a
seed, and saves/loads with its column transformer inside config.json (no pickle)."""
import json

import pytest
import torch

import vaemodels
from vaemodels.tvae import column_layout

SPEC = {
    "label": "fraud", "label_dtype": "object", "class_names": ["no", "yes"], "index_column": "__vaepipe_index__",
    "columns": [
        {"name": "amount", "kind": "continuous", "dtype": "float64", "nullable": True, "min": -8.0, "max": 25.0,
         "integer": False, "decimals": 3, "modes": {"means": [-5.0, 20.0], "stds": [1.0, 2.0], "weights": [0.5, 0.5]}},
        {"name": "city", "kind": "categorical", "dtype": "object", "nullable": False, "categories": ["lima", "oslo"]},
        {"name": "flag", "kind": "boolean", "dtype": "bool", "nullable": False, "categories": [False, True]},
    ],
}


def tiny(**overrides):
    return vaemodels.build("tvae", SPEC, 2, latent_dim=4, hidden_dim=16, **overrides)


def fake_rows(n, generator):
    """Rows in the encoded layout: class 1 always has the second mode and 'oslo', class 0 the first and 'lima'."""
    labels = torch.arange(n) % 2
    x = torch.zeros(n, 8)
    x[:, 0] = torch.rand(n, generator=generator) - 0.5
    x[torch.arange(n), 1 + labels] = 1.0  # amount's mode (slot 3 = missing, unused here)
    x[torch.arange(n), 4 + labels] = 1.0  # city
    x[torch.arange(n), 6 + labels] = 1.0  # flag
    return x, labels


def test_layout_and_width_follow_the_spec():
    assert column_layout(SPEC["columns"]) == [("alpha", 0, 1), ("softmax", 1, 3), ("softmax", 4, 2), ("softmax", 6, 2)]
    model = tiny()
    assert model.input_shape == (8,) and model.modality == "table" and model.input_key == "row"
    assert model.is_conditional and model.is_generative


def test_training_lowers_the_loss_and_learns_the_class_conditional_columns():
    torch.manual_seed(0)
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    x, labels = fake_rows(256, generator)
    first = float(model.loss({"row": x, "label": labels})["loss"].detach())
    for _ in range(300):
        out = model.loss({"row": x, "label": labels})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert float(out["loss"]) < first / 2
    assert set(out) == {"loss", "recon", "kl", "elbo"}
    rows = model.eval().sample(200, labels=torch.ones(200, dtype=torch.long), generator=generator)
    assert (rows[:, 5] == 1).float().mean() > 0.9  # class 1 -> oslo
    assert (rows[:, 2] == 1).float().mean() > 0.9  # class 1 -> the second mode


def test_samples_are_one_hot_per_group_seeded_and_need_labels():
    model = tiny().eval()
    labels = torch.tensor([0, 1, 1, 0])
    a = model.sample(4, labels=labels, generator=torch.Generator().manual_seed(7))
    b = model.sample(4, labels=labels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    for kind, start, width in column_layout(SPEC["columns"]):
        if kind == "softmax":
            assert torch.equal(a[:, start:start + width].sum(1), torch.ones(4))
        else:
            assert bool((a[:, start].abs() <= 1).all())
    with pytest.raises(ValueError, match="conditional"):
        model.sample(4)


def test_save_and_load_keep_the_transformer_and_the_weights(tmp_path):
    model = tiny(beta=0.5).eval()
    vaemodels.save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["name"] == "tvae" and saved["input_shape"] == SPEC  # the fitted transformer, as JSON
    loaded = vaemodels.load_model(tmp_path / "m")
    assert loaded.input_spec() == SPEC and loaded.config.beta == 0.5
    labels = torch.tensor([0, 1])
    assert torch.equal(model.sample(2, labels=labels, generator=torch.Generator().manual_seed(1)),
                       loaded.sample(2, labels=labels, generator=torch.Generator().manual_seed(1)))


def test_a_missing_or_malformed_spec_is_a_config_error():
    with pytest.raises(vaemodels.ConfigError, match="table spec"):
        vaemodels.build("tvae", (1, 8, 8), 2)
    bad = {**SPEC, "columns": [{"name": "x", "kind": "text"}]}
    with pytest.raises(vaemodels.ConfigError, match="kind 'text'"):
        vaemodels.build("tvae", bad, 2)
    with pytest.raises(vaemodels.ConfigError, match="num_classes"):
        vaemodels.build("tvae", SPEC, None)


def test_iwae_and_anomaly_scores_are_finite():
    model = tiny().eval()
    x, labels = fake_rows(6, torch.Generator().manual_seed(0))
    assert torch.isfinite(model.log_likelihood(x, k=5, labels=labels)).all()
    assert torch.isfinite(model.anomaly_score(x)).all()


def test_an_image_model_on_a_table_spec_is_a_config_error():
    with pytest.raises(vaemodels.ConfigError, match="model 'cvae' reads images.*table model, e.g. tvae"):
        vaemodels.build("cvae", SPEC, 2)
