"""Every registered family through the one interface: build by name, pickle-free save/load round
trip via the registry, seeded sampling, and the IWAE bound (log p(x) >= ELBO, tighter with k)."""
import pytest
import torch

import vaemodels
from pipelines.cli import main

# the image families (the table family, tvae, and the series families, timevae/ctimevae, have their own
# tests in test_tvae.py and test_timevae.py)
NAMES = [name for name, cls in vaemodels.MODELS.items() if cls.modality == "image"]
SERIES_NAMES = ["timevae", "ctimevae"]  # series windows (C x 1 x T): the same interface
IMAGE_NAMES = NAMES


def build(name, shape=(1, 8, 8)):
    cls = vaemodels.MODELS[name]
    return vaemodels.build(name, shape, num_classes=10 if cls.is_conditional else None, backbone="mlp")


def test_all_families_are_registered(capsys):
    assert NAMES == ["ae", "dae", "vae", "beta_vae", "cvae", "vae_gan", "hvae", "vae_flow", "ssvae"]
    assert list(vaemodels.MODELS) == [*NAMES, "tvae", *SERIES_NAMES]
    assert [n for n, cls in vaemodels.MODELS.items() if cls.modality == "series"] == SERIES_NAMES
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(vaemodels.MODELS)
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_save_load_round_trip_through_the_registry(name, tmp_path, digits_batch):
    torch.manual_seed(0)
    model = build(name).eval()
    vaemodels.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = vaemodels.load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    x = digits_batch["image"][:8]
    labels = digits_batch["label"][:8] if model.is_conditional else None
    assert torch.equal(model.embed(x, labels) if labels is not None else model.embed(x),
                       loaded.embed(x, labels) if labels is not None else loaded.embed(x))
    if model.is_generative:
        a = model.sample(4, labels=labels[:4] if labels is not None else None, generator=torch.Generator().manual_seed(1))
        b = loaded.sample(4, labels=labels[:4] if labels is not None else None, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_loss_has_the_shared_keys(name, digits_batch):
    model = build(name)
    out = model.loss({"image": digits_batch["image"][:16], "label": digits_batch["label"][:16]})
    assert {"loss", "recon"} <= set(out)
    if model.is_variational:
        assert {"kl", "elbo"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    assert model.anomaly_score(digits_batch["image"][:5]).shape == (5,)


@pytest.mark.parametrize("name", [n for n in IMAGE_NAMES if vaemodels.MODELS[n].is_variational])
def test_iwae_bounds_the_elbo_and_tightens_with_k(name, digits_batch):
    torch.manual_seed(0)
    model = build(name).eval()
    x = digits_batch["image"][:32]
    labels = digits_batch["label"][:32] if name == "cvae" else None
    elbo = model.elbo(x, labels, num_samples=200).mean()
    # E[IWAE_k] grows with k; one k=5 draw is noisy on an untrained model, so average 20 of them
    ll_5 = torch.stack([model.log_likelihood(x, k=5, labels=labels).mean() for _ in range(20)]).mean()
    ll_500 = model.log_likelihood(x, k=500, labels=labels).mean()
    assert ll_500 >= elbo
    assert ll_500 >= ll_5 - 0.05


def test_unknown_names_and_fields_are_clear_errors():
    with pytest.raises(vaemodels.ConfigError, match="unknown model 'vqvae'; registered models: ae, dae"):
        vaemodels.build("vqvae", (1, 8, 8))
    with pytest.raises(vaemodels.ConfigError, match="unknown VAEConfig field.*latent_size"):
        vaemodels.build("vae", (1, 8, 8), latent_size=3)
    with pytest.raises(vaemodels.ConfigError, match="latent_dim must be int"):
        vaemodels.build("vae", (1, 8, 8), latent_dim="3")


def test_load_refuses_a_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        vaemodels.load_model(tmp_path)


@pytest.mark.parametrize("name", [n for n in IMAGE_NAMES if vaemodels.MODELS[n].is_generative])
def test_sample_with_latent_returns_what_sample_draws(name):
    """Batch generation records z with sample_with_latent: its images must be sample()'s images."""
    torch.manual_seed(0)
    model = build(name).eval()
    labels = torch.arange(6) % 10 if model.is_conditional else None
    images = model.sample(6, labels, torch.Generator().manual_seed(3))
    again, z = model.sample_with_latent(6, labels, torch.Generator().manual_seed(3))
    assert torch.equal(images, again)
    assert z.shape[0] == 6 and torch.isfinite(z).all()


def test_cvae_latents_come_from_the_class_prior():
    """With the learned per-class prior, generation must draw z around mu_y, not from N(0, I)."""
    torch.manual_seed(0)
    model = build("cvae").eval()
    with torch.no_grad():
        model.class_prior.weight.zero_()
        model.class_prior.weight[7, : model.config.latent_dim] = 5.0  # mu_7 = 5, sigma_7 = 1
    labels = torch.tensor([7] * 500 + [2] * 500)
    _, z = model.sample_with_latent(1000, labels, torch.Generator().manual_seed(0))
    assert abs(z[:500].mean().item() - 5.0) < 0.2 and abs(z[500:].mean().item()) < 0.2


def test_tempered_pixels_sharpen_bernoulli_means_only():
    """p(x|z)^(1/T): a Bernoulli mean moves away from 0.5 (0.5 and the ordering kept, 1 = unchanged);
    Gaussian likelihoods and models without p(x|z) return their images untouched."""
    means = torch.linspace(0.01, 0.99, 99).view(1, 1, 9, 11)
    bernoulli = build("vae")
    sharp = bernoulli.temper_pixels(means, 0.25)
    assert torch.equal(bernoulli.temper_pixels(means, 1.0), means)
    assert torch.allclose(sharp.flatten()[49], torch.tensor(0.5), atol=1e-5)  # 0.5 is its own mode
    assert ((sharp - 0.5).abs() >= (means - 0.5).abs() - 1e-6).all() and (sharp.flatten().diff() > 0).all()
    p = torch.tensor(0.7)  # closed form: p^4 / (p^4 + (1-p)^4)
    assert torch.allclose(bernoulli.temper_pixels(p.view(1, 1, 1, 1), 0.25).squeeze(), p ** 4 / (p ** 4 + (1 - p) ** 4))
    gaussian = vaemodels.build("vae", (1, 8, 8), backbone="mlp", likelihood="gaussian")
    assert torch.equal(gaussian.temper_pixels(means, 0.25), means)
    assert torch.equal(build("ae").temper_pixels(means, 0.25), means)
