"""Conditional VAE: shapes on both backbones, labels required everywhere (with clear errors),
conditioning that matters (trained samples look like their class), the marginal anomaly score."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.vaemodels.conftest import train_steps
from vaemodels.common import ConfigError, log_normal
from vaemodels.cvae import CVAE, CVAEConfig
from vaemodels.serialization import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model

SHAPES = [(1, 28, 28), (1, 64, 64), (3, 32, 32)]


def tiny_config(backbone: str = "mlp", **overrides) -> CVAEConfig:
    return CVAEConfig(backbone=backbone, latent_dim=4, hidden_dim=32, conv_channels=(8, 16, 16), **overrides)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def trained(digits_batch):
    """A CVAE trained 300 steps on the 256 labelled digits: (model, loss history)."""
    torch.manual_seed(0)
    model = CVAE(CVAEConfig(backbone="mlp"), (1, 8, 8), num_classes=10)
    return model, train_steps(model, digits_batch, 300)


@pytest.mark.parametrize("backbone", ["mlp", "conv", "resconv"])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(backbone, shape):
    model = CVAE(tiny_config(backbone), shape, num_classes=3)
    x = torch.rand(4, *shape)
    labels = torch.tensor([0, 1, 2, 1])
    mu, logvar = model.encode(x, labels)
    assert mu.shape == logvar.shape == (4, 4)
    image = model.decode(mu, labels)
    assert image.shape == (4, *shape) and image.min() >= 0 and image.max() <= 1
    assert model.reconstruct(x, labels).shape == (4, *shape)
    assert model.sample(4, labels=labels).shape == (4, *shape)
    assert model.log_importance_weights(x, 5, labels).shape == (5, 4)
    assert model.log_likelihood(x, k=6, chunk_size=4, labels=labels).shape == (4,)
    assert model.kl_per_dimension(x, labels).shape == (4,)
    assert model.anomaly_score(x).shape == (4,)
    out = model.loss({"image": x, "label": labels})
    assert set(out) == {"loss", "recon", "kl", "elbo"} and all(v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("backbone", ["mlp", "conv", "resconv"])
def test_loss_finite_and_differentiable(backbone):
    torch.manual_seed(0)
    model = CVAE(tiny_config(backbone), (1, 28, 28), num_classes=10)
    out = model.loss({"image": torch.rand(4, 1, 28, 28), "label": torch.tensor([0, 3, 9, 3])})
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]), atol=1e-4)
    out["loss"].backward()
    for part in (model.encoder, model.posterior, model.decoder):
        for p in part.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_labels_are_required_with_clear_errors():
    model = CVAE(tiny_config(), (1, 8, 8), num_classes=10)
    x, z = torch.rand(3, 1, 8, 8), torch.randn(3, 4)
    with pytest.raises(ValueError, match="is conditional: pass labels"):
        model.sample(3)
    with pytest.raises(ValueError, match="is conditional: pass labels"):
        model.decode(z)
    with pytest.raises(ValueError, match="is conditional: pass labels"):
        model.encode(x)
    with pytest.raises(ValueError, match="is conditional: pass labels"):
        model.log_likelihood(x, k=4)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        model.sample(3, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        model.decode(z, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"labelled data only: 2 of 3 samples .* unlabelled \(label -1\)"):
        model.loss({"image": x, "label": torch.tensor([-1, 4, -1])})
    with pytest.raises(ValueError, match="the batch has no 'label'"):
        model.loss({"image": x})
    with pytest.raises(ConfigError, match="needs num_classes"):
        CVAE(tiny_config(), (1, 8, 8))


def test_decoder_uses_the_label():
    torch.manual_seed(0)
    model = CVAE(tiny_config(), (1, 8, 8), num_classes=10)
    z = torch.randn(1, 4).repeat(10, 1)
    images = model.decode(z, torch.arange(10))
    assert all(not torch.allclose(images[0], images[k]) for k in range(1, 10))


def test_encoder_uses_the_label():
    torch.manual_seed(0)
    model = CVAE(tiny_config(), (1, 8, 8), num_classes=10)
    x = torch.rand(1, 1, 8, 8).repeat(2, 1, 1, 1)
    mu, _ = model.encode(x, torch.tensor([2, 7]))
    assert not torch.allclose(mu[0], mu[1])


def test_sample_is_seeded():
    model = CVAE(tiny_config(), (1, 8, 8), num_classes=10)
    labels = torch.tensor([1, 5, 5, 9])
    assert torch.equal(model.sample(4, labels, seeded(0)), model.sample(4, labels, seeded(0)))
    assert not torch.equal(model.sample(4, labels, seeded(0)), model.sample(4, labels, seeded(1)))


def test_learns_digits(trained):
    _, history = trained
    first, last = history[0], sum(history[-10:]) / 10
    assert last < 0.6 * first, f"loss {first:.2f} -> {last:.2f}"


def test_trained_samples_look_like_their_class(trained, digits_batch):
    """Samples of class y sit nearest to the mean real digit of class y (a nearest-centroid check)."""
    model, _ = trained
    x, y = digits_batch["image"].flatten(1), digits_batch["label"]
    centroids = torch.stack([x[y == k].mean(0) for k in range(10)])
    labels = torch.arange(10).repeat_interleave(20)
    samples = model.sample(200, labels, seeded(0)).flatten(1)
    accuracy = (torch.cdist(samples, centroids).argmin(1) == labels).float().mean().item()
    assert accuracy >= 0.8, accuracy


def test_analytic_kl_matches_monte_carlo(trained, digits_batch):
    model, _ = trained
    x, labels = digits_batch["image"][:16], digits_batch["label"][:16]
    torch.manual_seed(0)
    analytic = model.loss({"image": x, "label": labels})["kl"]
    mu, logvar = model.encode(x, labels)
    z = mu + (0.5 * logvar).exp() * torch.randn(20000, *mu.shape)
    prior_mu, prior_logvar = model._prior(labels)  # the learned p(z|y)
    monte_carlo = (log_normal(z, mu, logvar) - log_normal(z, prior_mu, prior_logvar)).mean()
    assert analytic.item() > 0.5
    assert monte_carlo.item() == pytest.approx(analytic.item(), rel=0.03)


def test_iwae_bound_is_tighter_than_the_elbo(trained, digits_batch):
    model, _ = trained
    x, labels = digits_batch["image"][:32], digits_batch["label"][:32]
    torch.manual_seed(0)
    elbo = model.elbo(x, labels, num_samples=200).mean()
    log_px = model.log_likelihood(x, k=200, labels=labels).mean()
    assert elbo < log_px < elbo + 10.0


def test_anomaly_score_marginalises_the_class(trained, digits_batch):
    model, _ = trained
    x = digits_batch["image"][:16]
    torch.manual_seed(0)
    score = model.anomaly_score(x)
    torch.manual_seed(0)  # replay the same posterior draws, one class at a time
    per_class = torch.stack([model.elbo(x, torch.full((16,), k), num_samples=10) for k in range(10)])
    assert torch.allclose(score, -(torch.logsumexp(per_class, 0) - math.log(10)))
    # the true class dominates the sum, so the score is close to -ELBO(x | true y) + log 10
    true_class = per_class[digits_batch["label"][:16], torch.arange(16)]
    assert (score - (-true_class + math.log(10))).abs().median() < 1.0


def test_trained_model_scores_noise_as_anomalous(trained, digits_batch):
    model, _ = trained
    torch.manual_seed(0)
    digits = model.anomaly_score(digits_batch["image"][:64])
    noise = model.anomaly_score(torch.rand(64, 1, 8, 8))
    assert noise.min() > digits.max()


def test_save_and_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("conv", kl_warmup_steps=10)
    model = CVAE(config, (1, 28, 28), num_classes=10).eval()
    save_model(model, tmp_path)
    torch.manual_seed(1)
    fresh = CVAE(CVAEConfig.from_dict(config.to_dict()), (1, 28, 28), num_classes=10).eval()
    labels = torch.tensor([0, 7])
    assert not torch.equal(fresh.sample(2, labels, seeded(0)), model.sample(2, labels, seeded(0)))
    fresh.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)))
    x = torch.rand(2, 1, 28, 28)
    assert all(torch.equal(a, b) for a, b in zip(fresh.encode(x, labels), model.encode(x, labels)))
    assert torch.equal(fresh.sample(2, labels, seeded(0)), model.sample(2, labels, seeded(0)))


def test_kl_warmup():
    model = CVAE(tiny_config(kl_warmup_steps=10), (1, 8, 8), num_classes=10)
    model.set_training_step(5)
    assert model.kl_weight() == 0.5
    model.set_training_step(50)
    assert model.kl_weight() == 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"CVAEConfig\.kl_warmup_steps must be >= 0"):
        CVAEConfig(kl_warmup_steps=-1)
    with pytest.raises(ConfigError, match=r"CVAEConfig\.likelihood must be one of"):
        CVAEConfig(likelihood="poisson")
    with pytest.raises(ConfigError, match=r"unknown CVAEConfig field\(s\): num_classes"):
        CVAEConfig.from_dict({"num_classes": 10})


def test_beta_weights_the_kl_in_the_training_loss_only():
    torch.manual_seed(0)
    plain = CVAE(CVAEConfig(backbone="mlp", beta=1.0), (1, 8, 8), num_classes=10)
    heavy = CVAE(CVAEConfig(backbone="mlp", beta=4.0), (1, 8, 8), num_classes=10)
    heavy.load_state_dict(plain.state_dict())
    batch = {"image": torch.rand(6, 1, 8, 8), "label": torch.arange(6)}
    torch.manual_seed(1)
    a = plain.loss(batch)
    torch.manual_seed(1)
    b = heavy.loss(batch)
    assert torch.allclose(b["loss"], a["recon"] + 4.0 * a["kl"])
    assert torch.allclose(a["elbo"], b["elbo"])  # the ELBO itself always weighs KL by 1


def test_learned_prior_starts_standard_and_sampling_follows_it():
    torch.manual_seed(0)
    learned = CVAE(tiny_config(), (1, 8, 8), num_classes=3)
    standard = CVAE(tiny_config(prior="standard"), (1, 8, 8), num_classes=3)
    standard.load_state_dict({k: v for k, v in learned.state_dict().items() if not k.startswith("class_prior")})
    batch = {"image": torch.rand(6, 1, 8, 8), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    torch.manual_seed(1)
    a = learned.loss(batch)
    torch.manual_seed(1)
    b = standard.loss(batch)
    assert torch.allclose(a["kl"], b["kl"]) and torch.allclose(a["elbo"], b["elbo"])  # zero-initialised = N(0, I)
    with torch.no_grad():  # move class 2's prior far away: its samples must be decoded from there
        learned.class_prior.weight[2, :4] = 5.0
    labels = torch.tensor([2, 2])
    expected = learned.decode(5.0 + torch.randn(2, 4, generator=seeded(0)), labels)
    assert torch.allclose(learned.sample(2, labels, seeded(0)), expected, atol=1e-6)
    assert not torch.allclose(standard.sample(2, labels, seeded(0)), expected, atol=1e-3)
    # the bound is taken against p(z|y): a far-away prior mean costs KL
    assert learned.loss(batch)["kl"] > a["kl"] + 10


def test_model_saved_before_the_prior_field_loads_with_the_standard_prior(tmp_path):
    """Saved configs that predate a field take its legacy value (here: the N(0, I) prior)."""
    torch.manual_seed(0)
    old = CVAE(tiny_config("conv", prior="standard"), (1, 28, 28), num_classes=10).eval()
    save_model(old, tmp_path)
    spec = json.loads((tmp_path / CONFIG_FILE).read_text())
    del spec["config"]["prior"]  # what vaepipe wrote before the field existed
    (tmp_path / CONFIG_FILE).write_text(json.dumps(spec))
    loaded = load_model(tmp_path)
    assert loaded.config.prior == "standard" and loaded.config.backbone == "conv"
    labels = torch.tensor([3, 4])
    assert torch.equal(loaded.sample(2, labels, seeded(0)), old.sample(2, labels, seeded(0)))
    with pytest.raises(ConfigError, match=r"CVAEConfig\.prior must be 'learned' or 'standard'"):
        CVAEConfig(prior="flow")
