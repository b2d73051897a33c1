"""β-VAE: shapes on both backbones, the loss is recon + β·KL (or recon + γ|KL − C|) while `elbo`
stays the true ELBO, the capacity schedule, and on real digits: larger β -> smaller KL, KL follows C."""
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.vaemodels.conftest import train_steps
from vaemodels.beta_vae import BetaVAE, BetaVAEConfig
from vaemodels.common import ConfigError, log_normal, log_standard_normal
from vaemodels.distributions import total_correlation
from vaemodels.serialization import WEIGHTS_FILE, save_model

SHAPES = [(1, 28, 28), (1, 64, 64), (3, 32, 32)]


def tiny_config(backbone: str = "mlp", **overrides) -> BetaVAEConfig:
    return BetaVAEConfig(backbone=backbone, latent_dim=4, hidden_dim=32, conv_channels=(8, 16, 16), **overrides)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def trained(digits_batch):
    """β = 1, β = 8 and a capacity run (C: 0 -> 5 nats over 100 steps), 300 steps each on the digits."""
    configs = {
        "beta1": BetaVAEConfig(backbone="mlp", beta=1.0),
        "beta8": BetaVAEConfig(backbone="mlp", beta=8.0),
        "capacity": BetaVAEConfig(backbone="mlp", capacity_max=5.0, capacity_steps=100, gamma=100.0),
    }
    out = {}
    for key, config in configs.items():
        torch.manual_seed(0)
        model = BetaVAE(config, (1, 8, 8))
        out[key] = (model, train_steps(model, digits_batch, 300))
    return out


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(backbone, shape):
    model = BetaVAE(tiny_config(backbone), shape)
    x = torch.rand(3, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 4)
    image = model.decode(mu)
    assert image.shape == (3, *shape) and image.min() >= 0 and image.max() <= 1
    assert model.reconstruct(x).shape == (3, *shape)
    assert model.sample(5).shape == (5, *shape)
    assert model.log_importance_weights(x, 7).shape == (7, 3)
    assert model.anomaly_score(x).shape == (3,)
    out = model.loss({"image": x, "label": torch.full((3,), -1)})
    assert set(out) == {"loss", "recon", "kl", "elbo"} and all(v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("capacity_max", [0.0, 5.0])
@pytest.mark.parametrize("backbone", ["mlp", "conv"])
def test_loss_finite_and_differentiable(backbone, capacity_max):
    torch.manual_seed(0)
    model = BetaVAE(tiny_config(backbone, capacity_max=capacity_max), (1, 28, 28))
    out = model.loss({"image": torch.rand(4, 1, 28, 28)})
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for part in (model.encoder, model.posterior, model.decoder):
        for p in part.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_beta_weighs_the_loss_but_not_the_elbo():
    torch.manual_seed(0)
    out = BetaVAE(tiny_config(beta=6.0), (1, 8, 8)).loss({"image": torch.rand(4, 1, 8, 8)})
    assert torch.allclose(out["loss"], out["recon"] + 6.0 * out["kl"])
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))


def test_tc_mode_adds_beta_minus_one_total_correlations():
    torch.manual_seed(0)
    model = BetaVAE(tiny_config(beta=6.0, beta_target="total_correlation"), (1, 8, 8))
    out = model.loss({"image": torch.rand(16, 1, 8, 8)})
    assert out["tc"].item() > 0
    assert torch.allclose(out["loss"], out["recon"] + out["kl"] + 5.0 * out["tc"])
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())


def test_total_correlation_tells_dependent_from_independent_codes():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(1024, 4, generator=gen)
    logvar = torch.full_like(mu, -2.0)
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen)
    independent = total_correlation(z, mu, logvar).item()
    tied_mu = mu.clone()
    tied_mu[:, 1] = tied_mu[:, 0]
    tied_mu[:, 3] = -tied_mu[:, 2]
    tied_z = tied_mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen)
    dependent = total_correlation(tied_z, tied_mu, logvar).item()
    # Each tied pair is bivariate normal with correlation rho = 1 / (1 + sigma^2); its mutual
    # information -0.5 log(1 - rho^2) is the pair's share of the true TC.
    rho = 1.0 / (1.0 + math.exp(-2.0))
    truth = 2 * -0.5 * math.log(1.0 - rho**2)
    assert dependent == pytest.approx(truth, abs=0.3), (dependent, truth)
    assert abs(independent) < 0.3, independent


def test_capacity_mode_penalises_distance_to_capacity():
    torch.manual_seed(0)
    model = BetaVAE(tiny_config(capacity_max=4.0, capacity_steps=10, gamma=50.0), (1, 8, 8))
    model.set_training_step(5)
    out = model.loss({"image": torch.rand(4, 1, 8, 8)})
    assert out["capacity"].item() == pytest.approx(2.0)
    assert torch.allclose(out["loss"], out["recon"] + 50.0 * (out["kl"] - 2.0).abs())
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))


def test_capacity_schedule_values():
    model = BetaVAE(tiny_config(capacity_start=1.0, capacity_max=5.0, capacity_steps=100), (1, 8, 8))
    assert [model.capacity(s) for s in (0, 25, 50, 100, 1000)] == pytest.approx([1.0, 2.0, 3.0, 5.0, 5.0])
    model.set_training_step(75)
    assert model.capacity() == pytest.approx(4.0)
    jump = BetaVAE(tiny_config(capacity_max=3.0, capacity_steps=0), (1, 8, 8))
    assert jump.capacity(0) == 3.0


def test_analytic_kl_matches_monte_carlo(trained, digits_batch):
    model, _ = trained["beta1"]
    x = digits_batch["image"][:16]
    torch.manual_seed(0)
    analytic = model.loss({"image": x})["kl"]
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * torch.randn(20000, *mu.shape)
    monte_carlo = (log_normal(z, mu, logvar) - log_standard_normal(z)).mean()
    assert analytic.item() > 0.5  # a trained posterior, so the comparison is not 0 vs 0
    assert monte_carlo.item() == pytest.approx(analytic.item(), rel=0.03)


@pytest.mark.parametrize("key", ["beta1", "beta8"])
def test_learns_digits(trained, key):
    _, history = trained[key]
    first, last = history[0], sum(history[-10:]) / 10
    assert last < 0.7 * first, f"{key}: loss {first:.2f} -> {last:.2f}"


def test_larger_beta_gives_smaller_kl(trained, digits_batch):
    torch.manual_seed(0)
    kl1 = trained["beta1"][0].loss(digits_batch)["kl"].item()
    kl8 = trained["beta8"][0].loss(digits_batch)["kl"].item()
    assert kl8 < 0.25 * kl1, (kl1, kl8)


def test_capacity_mode_kl_follows_the_capacity(trained, digits_batch):
    model, _ = trained["capacity"]
    torch.manual_seed(0)
    out = model.loss(digits_batch)
    assert out["capacity"].item() == 5.0
    assert out["kl"].item() == pytest.approx(5.0, abs=1.0)


def test_sample_is_seeded():
    model = BetaVAE(tiny_config(), (1, 8, 8))
    assert torch.equal(model.sample(4, generator=seeded(0)), model.sample(4, generator=seeded(0)))
    assert not torch.equal(model.sample(4, generator=seeded(0)), model.sample(4, generator=seeded(1)))


def test_save_and_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("conv", likelihood="gaussian_learned", capacity_max=5.0)
    model = BetaVAE(config, (3, 32, 32)).eval()
    with torch.no_grad():
        model.likelihood.log_std.fill_(-1.5)  # a learned value the fresh model does not start from
    save_model(model, tmp_path)
    torch.manual_seed(1)
    fresh = BetaVAE(BetaVAEConfig.from_dict(config.to_dict()), (3, 32, 32)).eval()
    assert not torch.equal(fresh.sample(2, generator=seeded(0)), model.sample(2, generator=seeded(0)))
    fresh.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)))
    x = torch.rand(2, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(fresh.encode(x), model.encode(x)))
    assert torch.equal(fresh.sample(2, generator=seeded(0)), model.sample(2, generator=seeded(0)))
    assert torch.equal(fresh.likelihood.log_std, model.likelihood.log_std)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.beta must be >= 0"):
        BetaVAEConfig(beta=-1.0)
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.beta_target must be one of"):
        BetaVAEConfig(beta_target="tc")
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.beta_target total_correlation does not combine"):
        BetaVAEConfig(beta_target="total_correlation", capacity_max=5.0)
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.gamma must be > 0"):
        BetaVAEConfig(gamma=0.0)
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.capacity_start must be in \[0, capacity_max=2.0\]"):
        BetaVAEConfig(capacity_max=2.0, capacity_start=3.0)
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.capacity_steps must be >= 0"):
        BetaVAEConfig(capacity_steps=-5)
    with pytest.raises(ConfigError, match=r"unknown BetaVAEConfig field\(s\): warmup"):
        BetaVAEConfig.from_dict({"warmup": 100})
    with pytest.raises(ConfigError, match=r"BetaVAEConfig\.kl_warmup_steps must be >= 0"):
        BetaVAEConfig(kl_warmup_steps=-1)


def test_kl_warmup_ramps_the_beta_weight():
    model = BetaVAE(BetaVAEConfig(beta=4.0, kl_warmup_steps=100, backbone="mlp"), (1, 8, 8))
    weights = []
    for step in (0, 50, 100, 500):
        model.set_training_step(step)
        weights.append(model.kl_weight())
    assert weights == [0.0, 2.0, 4.0, 4.0]
