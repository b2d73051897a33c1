"""The deterministic autoencoder: shapes on both backbones, the loss it claims, learning on real
digits, reconstruction-error anomaly scores, and a weights round trip."""
import pytest
import torch
from safetensors.torch import load_file

from tests.vaemodels.conftest import train_steps
from vaemodels.ae import AE, AEConfig
from vaemodels.common import ConfigError
from vaemodels.serialization import WEIGHTS_FILE, save_model
from vaemodels.vae import VAEConfig

SHAPES = [(1, 28, 28), (1, 64, 64), (3, 32, 32)]


def tiny_config(backbone: str = "mlp", **overrides) -> AEConfig:
    return AEConfig(backbone=backbone, latent_dim=4, hidden_dim=32, conv_channels=(8, 16, 16), **overrides)


@pytest.fixture(scope="module")
def trained(digits_batch):
    """One AE per loss, trained 200 steps on the 256 digits: {loss: (model, loss history)}."""
    out = {}
    for loss in ("bce", "mse"):
        torch.manual_seed(0)
        model = AE(AEConfig(backbone="mlp", reconstruction_loss=loss), (1, 8, 8))
        out[loss] = (model, train_steps(model, digits_batch, 200))
    return out


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(backbone, shape):
    model = AE(tiny_config(backbone), shape)
    x = torch.rand(3, *shape)
    z = model.encode(x)
    assert z.shape == (3, 4)
    image = model.decode(z)
    assert image.shape == (3, *shape)
    assert image.min() >= 0 and image.max() <= 1
    assert model.reconstruct(x).shape == (3, *shape)
    assert model.embed(x).shape == (3, 4)
    assert model.anomaly_score(x).shape == (3,)
    out = model.loss({"image": x, "label": torch.full((3,), -1)})
    assert set(out) == {"loss", "recon"} and all(v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("loss", ["bce", "mse"])
@pytest.mark.parametrize("backbone", ["mlp", "conv"])
def test_loss_finite_and_differentiable(backbone, loss):
    torch.manual_seed(0)
    model = AE(tiny_config(backbone, reconstruction_loss=loss), (1, 28, 28))
    out = model.loss({"image": torch.rand(4, 1, 28, 28), "label": torch.zeros(4, dtype=torch.long)})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for part in (model.encoder, model.to_code, model.decoder):
        for p in part.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_loss_is_the_configured_error_summed_over_pixels():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    mse = AE(tiny_config(reconstruction_loss="mse"), (1, 8, 8)).eval()
    expected = (mse.reconstruct(x) - x).pow(2).flatten(1).sum(1)
    assert torch.allclose(mse.loss({"image": x})["recon"], expected.mean(), atol=1e-5)
    assert torch.allclose(mse.anomaly_score(x), expected, atol=1e-5)

    bce = AE(tiny_config(reconstruction_loss="bce"), (1, 8, 8)).eval()
    p = bce.reconstruct(x)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(bce.loss({"image": x})["recon"], expected.mean(), atol=1e-4)
    assert torch.allclose(bce.anomaly_score(x), expected, atol=1e-4)


@pytest.mark.parametrize("loss, max_ratio", [("bce", 0.5), ("mse", 0.15)])
def test_learns_digits(trained, loss, max_ratio):
    _, history = trained[loss]
    first, last = history[0], sum(history[-10:]) / 10
    assert last < max_ratio * first, f"{loss}: loss {first:.2f} -> {last:.2f}"


def test_trained_model_scores_noise_as_anomalous(trained, digits_batch):
    model, _ = trained["mse"]
    torch.manual_seed(0)
    digits = model.anomaly_score(digits_batch["image"][:64])
    noise = model.anomaly_score(torch.rand(64, 1, 8, 8))
    assert noise.min() > digits.median()
    assert noise.mean() > 3 * digits.mean()


def test_is_not_generative():
    model = AE(tiny_config(), (1, 8, 8))
    assert not model.is_generative and not model.is_variational
    with pytest.raises(NotImplementedError, match="not generative"):
        model.sample(2)


def test_save_and_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("conv", reconstruction_loss="mse")
    model = AE(config, (3, 32, 32)).eval()
    save_model(model, tmp_path)
    torch.manual_seed(1)
    fresh = AE(AEConfig.from_dict(config.to_dict()), (3, 32, 32)).eval()
    x = torch.rand(2, 3, 32, 32)
    assert not torch.equal(fresh.reconstruct(x), model.reconstruct(x))
    fresh.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)))
    assert torch.equal(fresh.encode(x), model.encode(x))
    assert torch.equal(fresh.reconstruct(x), model.reconstruct(x))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"AEConfig\.reconstruction_loss must be one of"):
        AEConfig(reconstruction_loss="l1")
    with pytest.raises(ConfigError, match=r"AEConfig\.latent_dim must be int"):
        AEConfig(latent_dim="4")
    with pytest.raises(ConfigError, match=r"unknown AEConfig field\(s\): reconstruction_los"):
        AEConfig.from_dict({"reconstruction_los": "mse"})
    with pytest.raises(ConfigError, match="needs a AEConfig"):
        AE(VAEConfig(), (1, 8, 8))
