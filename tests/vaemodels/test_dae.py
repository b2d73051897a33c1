"""The denoising autoencoder: each corruption hits what its config says and is seeded, the loss
targets the clean image, and after training on real digits denoising beats the corrupted input."""
import pytest
import torch
from safetensors.torch import load_file

from tests.vaemodels.conftest import train_steps
from vaemodels.common import ConfigError
from vaemodels.dae import CORRUPTIONS, DAE, DAEConfig
from vaemodels.serialization import WEIGHTS_FILE, save_model

SHAPES = [(1, 28, 28), (1, 64, 64), (3, 32, 32)]


def tiny_config(backbone: str = "mlp", **overrides) -> DAEConfig:
    return DAEConfig(backbone=backbone, latent_dim=4, hidden_dim=32, conv_channels=(8, 16, 16), **overrides)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def trained(digits_batch):
    """One DAE per corruption, trained 300 steps on the 256 digits: {corruption: (model, losses)}."""
    out = {}
    for corruption in CORRUPTIONS:
        torch.manual_seed(0)
        model = DAE(DAEConfig(backbone="mlp", corruption=corruption, reconstruction_loss="mse"), (1, 8, 8))
        out[corruption] = (model, train_steps(model, digits_batch, 300))
    return out


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(backbone, shape):
    model = DAE(tiny_config(backbone), shape)
    x = torch.rand(3, *shape)
    assert model.encode(x).shape == (3, 4)
    assert model.corrupt(x).shape == (3, *shape)
    denoised = model.denoise(x)
    assert denoised.shape == (3, *shape)
    assert denoised.min() >= 0 and denoised.max() <= 1
    assert model.anomaly_score(x).shape == (3,)
    out = model.loss({"image": x, "label": torch.full((3,), -1)})
    assert set(out) == {"loss", "recon"} and all(v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
def test_loss_finite_and_differentiable(backbone):
    torch.manual_seed(0)
    model = DAE(tiny_config(backbone), (1, 28, 28))
    out = model.loss({"image": torch.rand(4, 1, 28, 28)})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for part in (model.encoder, model.to_code, model.decoder):
        for p in part.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_masking_zeroes_the_configured_fraction():
    model = DAE(tiny_config(corruption="masking", corruption_fraction=0.3), (1, 28, 28))
    x = 0.1 + 0.8 * torch.rand(8, 1, 28, 28)  # no pixel is already 0
    corrupted = model.corrupt(x, seeded(0))
    changed = corrupted != x
    assert abs(changed.float().mean().item() - 0.3) < 0.02
    assert (corrupted[changed] == 0).all()


def test_salt_and_pepper_sets_the_configured_fraction_to_0_or_1():
    model = DAE(tiny_config(corruption="salt_and_pepper", corruption_fraction=0.2), (1, 28, 28))
    x = 0.1 + 0.8 * torch.rand(8, 1, 28, 28)
    corrupted = model.corrupt(x, seeded(0))
    changed = corrupted != x
    assert abs(changed.float().mean().item() - 0.2) < 0.02
    hit = corrupted[changed]
    assert ((hit == 0) | (hit == 1)).all()
    assert abs((hit == 1).float().mean().item() - 0.5) < 0.05


def test_gaussian_noise_has_the_configured_std():
    model = DAE(tiny_config(corruption="gaussian", noise_std=0.1), (1, 28, 28))
    x = torch.full((8, 1, 28, 28), 0.5)  # 5 std from both clip edges
    noise = model.corrupt(x, seeded(0)) - x
    assert abs(noise.std().item() - 0.1) < 0.005
    assert abs(noise.mean().item()) < 0.005
    clipped = model.corrupt(torch.zeros(2, 1, 28, 28), seeded(0))
    assert clipped.min() >= 0 and clipped.max() <= 1


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corruption_is_seeded(corruption):
    model = DAE(tiny_config(corruption=corruption), (1, 8, 8))
    x = 0.1 + 0.8 * torch.rand(4, 1, 8, 8)
    assert torch.equal(model.corrupt(x, seeded(3)), model.corrupt(x, seeded(3)))
    assert not torch.equal(model.corrupt(x, seeded(3)), model.corrupt(x, seeded(4)))


def test_zero_corruption_is_the_identity():
    x = torch.rand(4, 1, 8, 8)
    gaussian = DAE(tiny_config(corruption="gaussian", noise_std=0.0), (1, 8, 8))
    assert torch.equal(gaussian.corrupt(x), x)
    masking = DAE(tiny_config(corruption="masking", corruption_fraction=0.0), (1, 8, 8))
    assert torch.equal(masking.corrupt(x), x)


# Thresholds sit between what this DAE reaches (0.37, 0.30, 0.25 of the corrupted error) and what
# the same network reaches when trained to reproduce its corrupted input (0.52, 0.74, 0.37).
@pytest.mark.parametrize("corruption, max_error_ratio",
                         [("gaussian", 0.45), ("masking", 0.45), ("salt_and_pepper", 0.32)])
def test_learns_to_denoise_digits(trained, digits_batch, corruption, max_error_ratio):
    model, history = trained[corruption]
    first, last = history[0], sum(history[-10:]) / 10
    assert last < 0.3 * first, f"{corruption}: loss {first:.2f} -> {last:.2f}"
    x = digits_batch["image"]
    corrupted = model.corrupt(x, seeded(1))
    corrupted_error = (corrupted - x).pow(2).mean()
    denoised_error = (model.denoise(corrupted) - x).pow(2).mean()
    assert denoised_error < max_error_ratio * corrupted_error, (denoised_error.item(), corrupted_error.item())


def test_is_not_generative():
    with pytest.raises(NotImplementedError, match="not generative"):
        DAE(tiny_config(), (1, 8, 8)).sample(2)


def test_save_and_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("conv", corruption="salt_and_pepper")
    model = DAE(config, (1, 28, 28)).eval()
    save_model(model, tmp_path)
    torch.manual_seed(1)
    fresh = DAE(DAEConfig.from_dict(config.to_dict()), (1, 28, 28)).eval()
    x = torch.rand(2, 1, 28, 28)
    assert not torch.equal(fresh.denoise(x), model.denoise(x))
    fresh.load_state_dict(load_file(str(tmp_path / WEIGHTS_FILE)))
    assert torch.equal(fresh.denoise(x), model.denoise(x))
    assert torch.equal(fresh.corrupt(x, seeded(0)), model.corrupt(x, seeded(0)))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"DAEConfig\.corruption must be one of"):
        DAEConfig(corruption="blur")
    with pytest.raises(ConfigError, match=r"DAEConfig\.corruption_fraction must be in \[0, 1\)"):
        DAEConfig(corruption_fraction=1.0)
    with pytest.raises(ConfigError, match=r"DAEConfig\.noise_std must be >= 0"):
        DAEConfig(noise_std=-0.1)
    with pytest.raises(ConfigError, match=r"DAEConfig\.reconstruction_loss must be one of"):
        DAEConfig(reconstruction_loss="l2")
    with pytest.raises(ConfigError, match=r"unknown DAEConfig field\(s\): noise"):
        DAEConfig.from_dict({"noise": 0.1})
