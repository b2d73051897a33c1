"""timevae / ctimevae on real series (aeon's bundled GunPoint, standardised): the shared interface (loss
keys, pickle-free round trip, seeded sampling, IWAE >= ELBO), shapes for odd and short lengths and many
channels, the config's refusals, and that a few hundred steps learn the data and the class prior."""
import numpy as np
import pytest
import torch

import vaemodels
from tests.vaemodels.conftest import train_steps

SERIES = ["timevae", "ctimevae"]


@pytest.fixture(scope="module")
def gunpoint_batch():
    """64 GunPoint windows (1 x 1 x 150), standardised over the batch, with labels 0/1."""
    from aeon.datasets import load_gunpoint

    x, y = load_gunpoint(split="train")
    x = (x - x.mean()) / x.std()
    labels = torch.as_tensor((y == "2").astype(np.int64))[:64]
    return {"image": torch.as_tensor(x[:64, :, None, :], dtype=torch.float32), "label": labels}


def build(name, shape=(1, 1, 150), **overrides):
    return vaemodels.build(name, shape, 2 if vaemodels.MODELS[name].is_conditional else None, **overrides)


@pytest.mark.parametrize("name", SERIES)
def test_loss_keys_round_trip_and_seeded_sampling(name, gunpoint_batch, tmp_path):
    torch.manual_seed(0)
    model = build(name).eval()
    out = model.loss(gunpoint_batch)
    assert {"loss", "recon", "kl", "elbo"} <= set(out) and all(torch.isfinite(v) for v in out.values())
    vaemodels.save_model(model, tmp_path / "m")
    loaded = vaemodels.load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    labels = model.condition_on(gunpoint_batch["label"][:6])
    x = gunpoint_batch["image"][:6]
    assert torch.equal(model.embed(x, labels), loaded.embed(x, labels))
    a, z = model.sample_with_latent(6, labels, torch.Generator().manual_seed(3))
    b = loaded.sample(6, labels, torch.Generator().manual_seed(3))
    assert a.shape == (6, 1, 1, 150) and z.shape == (6, 10) and torch.equal(a, b)
    assert model.anomaly_score(x).shape == (6,)


@pytest.mark.parametrize("name", SERIES)
def test_iwae_bounds_the_elbo(name, gunpoint_batch):
    torch.manual_seed(0)
    model = build(name).eval()
    x = gunpoint_batch["image"][:16]
    labels = model.condition_on(gunpoint_batch["label"][:16])
    elbo = model.elbo(x, labels, num_samples=100).mean()
    assert model.log_likelihood(x, k=100, labels=labels).mean() >= elbo


@pytest.mark.parametrize("shape", [(1, 1, 24), (6, 1, 100), (3, 1, 17), (2, 1, 5), (1, 1, 151)])
def test_every_window_shape_decodes_to_itself(shape):
    model = build("ctimevae", shape)
    x = torch.randn(3, *shape)
    labels = torch.tensor([0, 1, 0])
    assert model.reconstruct(x, labels).shape == x.shape
    assert model.sample(3, labels).shape == x.shape


@pytest.mark.parametrize("overrides, needle", [
    ({"likelihood": "bernoulli"}, "likelihood must be 'gaussian' or 'gaussian_learned'"),
    ({"backbone": "resconv"}, "backbone must be 'conv'"),
    ({"kernel_size": 4}, "kernel_size must be odd"),
    ({"trend_degree": -2}, "trend_degree must be >= -1"),
])
def test_bad_config_is_a_clear_error(overrides, needle):
    with pytest.raises(vaemodels.ConfigError, match=needle):
        build("timevae", **overrides)


def test_image_shaped_input_is_refused():
    with pytest.raises(ValueError, match="C x 1 x T"):
        build("timevae", (1, 8, 8))


def test_ctimevae_needs_labels_to_train(gunpoint_batch):
    with pytest.raises(ValueError, match="labelled windows only"):
        build("ctimevae").loss({"image": gunpoint_batch["image"], "label": torch.full((64,), -1)})


def test_a_few_hundred_steps_learn_gunpoint_and_its_classes(gunpoint_batch):
    """ELBO rises by far, and class-conditional samples differ the way the classes do (their means)."""
    torch.manual_seed(0)
    model = build("ctimevae", latent_dim=4)
    history = train_steps(model, gunpoint_batch, 300, lr=3e-3)
    assert np.mean(history[-10:]) < np.mean(history[:10]) - 150  # nats per window
    model.eval()
    x, y = gunpoint_batch["image"], gunpoint_batch["label"]
    samples = model.sample(200, torch.tensor([0] * 100 + [1] * 100), torch.Generator().manual_seed(0))
    real_gap = x[y == 1].mean(0) - x[y == 0].mean(0)
    sample_gap = samples[100:].mean(0) - samples[:100].mean(0)
    assert torch.corrcoef(torch.stack([real_gap.flatten(), sample_gap.flatten()]))[0, 1] > 0.5
