"""Semi-supervised VAE (M2): shapes, mixed labelled/unlabelled batches, label handling, bounds,
seeding, save/load, and learning a classifier from a few labelled real digits."""
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.vaemodels.conftest import train_steps
from vaemodels.common import ConfigError
from vaemodels.serialization import WEIGHTS_FILE, save_model
from vaemodels.ssvae import SSVAE, SSVAEConfig

TINY = dict(latent_dim=4, hidden_dim=32, conv_channels=(8, 16, 16))
K = 3  # classes in the small tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a shared 2-core box, intra-op threads cost far more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**overrides):
    return SSVAEConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 64, 64), (3, 32, 32)])
def test_shapes(backbone, shape):
    torch.manual_seed(0)
    model = SSVAE(tiny(backbone=backbone), shape, num_classes=K)
    x = torch.rand(4, *shape)
    labels = torch.tensor([0, 2, 1, 0])
    probs = model.classify(x)
    assert probs.shape == (4, K) and torch.allclose(probs.sum(1), torch.ones(4))
    for given in (labels, None, torch.tensor([0, -1, -1, 2])):
        mu, logvar = model.encode(x, given)
        assert mu.shape == logvar.shape == (4, 4)
    assert model.kl_per_dimension(x).shape == (4,)
    assert model.embed(x).shape == (4, 4)  # no labels: the classifier's guess picks q(z|x,y)
    assert model.decode(torch.randn(4, 4), labels).shape == (4, *shape)
    for given in (labels, None):
        recon = model.reconstruct(x, given)
        assert recon.shape == (4, *shape) and recon.min() >= 0 and recon.max() <= 1
    assert model.sample(5, labels=torch.tensor([0, 1, 2, 1, 0])).shape == (5, *shape)
    assert model.log_importance_weights(x, 6, labels).shape == (6, 4)
    assert model.log_importance_weights(x, 6).shape == (6, 4)
    assert model.anomaly_score(x).shape == (4,)
    out = model.loss({"image": x, "label": torch.tensor([0, -1, 2, -1])})
    assert {"loss", "recon", "kl", "elbo", "classifier_loss", "accuracy"} <= set(out)
    assert all(v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("labels", [[0, -1, 2, -1], [0, 1, 2, 1], [-1, -1, -1, -1]],
                         ids=["mixed", "labelled", "unlabelled"])
def test_loss_finite_and_differentiable(labels):
    torch.manual_seed(0)
    model = SSVAE(tiny(), (1, 28, 28), num_classes=K)
    out = model.loss({"image": torch.rand(4, 1, 28, 28), "label": torch.tensor(labels)})
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))
    assert out["labelled"] == sum(y >= 0 for y in labels)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # q(y|x) weighs the per-class bounds of unlabelled images, so they train the classifier too;
    # labelled ones train it through the cross-entropy
    classifier_grad = sum(p.grad.abs().sum() for p in model.classifier.parameters())
    assert classifier_grad > 0


def test_labelled_kl_counts_the_label_prior():
    # with one label, KL(q(y|x) || p(y)) = log K, so kl exceeds the Gaussian KL by exactly that
    torch.manual_seed(0)
    model = SSVAE(tiny(), (1, 28, 28), num_classes=K)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 1])
    mu, logvar = model.encode(x, y)
    gaussian = (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).sum(1).mean()
    assert torch.allclose(model.loss({"image": x, "label": y})["kl"], gaussian + torch.log(torch.tensor(K)))


def constant_decoder_model():
    """A model whose p(x|y,z) ignores y and z (Bernoulli logits 0: log p(x|y,z) = -64 log 2) and
    whose q(z|x,y) is N(0, 2^2) for every input, so every bound has a closed form."""
    torch.manual_seed(0)
    model = SSVAE(tiny(backbone="mlp", latent_dim=2), (1, 8, 8), num_classes=K).eval()
    with torch.no_grad():
        model.decoder.net[-2].weight.zero_()
        model.decoder.net[-2].bias.zero_()
        model.posterior.weight.zero_()
        model.posterior.bias.copy_(torch.tensor([0.0, 0.0, 1.4, 1.4]))
    return model


LOG_PX = -64 * math.log(2.0)


def test_unlabelled_bound_is_U():
    # U(x) = Σ_y q(y|x) L(x, y) + H(q(y|x)) with L = log p(x|y,z) + log p(y) - KL(q(z|x,y) || p(z))
    model = constant_decoder_model()
    x = torch.rand(4, 1, 8, 8)
    q = model.classify(x)
    entropy = -(q * q.log()).sum(1)
    kl_z = 2 * 0.5 * (math.exp(1.4) - 1.0 - 1.4)
    expected = LOG_PX + (-math.log(K) - kl_z) + entropy
    with torch.no_grad():
        out = model.loss({"image": x, "label": torch.full((4,), -1)})
    assert torch.allclose(out["elbo"], expected.mean(), atol=1e-4)
    assert torch.allclose(out["kl"], (kl_z + math.log(K) - entropy).mean(), atol=1e-4)


def test_conditional_and_marginal_likelihoods_are_normalised():
    # p(x|y) = p(x) = exp(LOG_PX) here, so both IWAE estimates must converge to it
    model = constant_decoder_model()
    x = torch.rand(2, 1, 8, 8)
    conditional = model.log_likelihood(x, k=20000, chunk_size=10000, labels=torch.tensor([0, 2]))
    marginal = model.log_likelihood(x, k=20000, chunk_size=10000)
    assert torch.allclose(conditional, torch.full((2,), LOG_PX), atol=0.05)
    assert torch.allclose(marginal, torch.full((2,), LOG_PX), atol=0.05)


def test_unlabelled_images_pull_the_classifier_toward_the_class_that_explains_them():
    torch.manual_seed(0)
    model = SSVAE(tiny(backbone="mlp"), (1, 8, 8), num_classes=K)
    with torch.no_grad():
        model.decoder.net[0].weight[:, 4:] *= 30.0  # make the classes decode to very different images
        # q(0|x) starts above 1/K, so the entropy term alone would push it down
        model.classifier[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        x = model.decode(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)).round()  # class 0's image
    before = model.classify(x)[:, 0].mean()
    optimizer = torch.optim.SGD(model.classifier.parameters(), lr=0.01)
    for _ in range(10):
        optimizer.zero_grad()
        model.loss({"image": x, "label": torch.full((8,), -1)})["loss"].backward()
        optimizer.step()
    after = model.classify(x)[:, 0].mean()
    assert before > 1 / K and after > before + 0.2, (before, after)


def test_missing_or_bad_labels_are_clear_errors():
    model = SSVAE(tiny(), (1, 28, 28), num_classes=K)
    with pytest.raises(ValueError, match="pass labels"):
        model.sample(3)
    with pytest.raises(ValueError, match="pass labels"):
        model.decode(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model.sample(2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="num_classes"):
        SSVAE(tiny(), (1, 28, 28))
    with pytest.raises(ConfigError, match="num_classes"):
        SSVAE(tiny(), (1, 28, 28), num_classes=1)


@pytest.mark.parametrize("with_labels", [True, False])
def test_iwae_bound_is_above_elbo(with_labels):
    torch.manual_seed(0)
    model = SSVAE(tiny(backbone="mlp"), (1, 8, 8), num_classes=K).eval()
    x = torch.rand(8, 1, 8, 8)
    labels = torch.arange(8) % K if with_labels else None
    elbo = model.elbo(x, labels, num_samples=100).mean()
    iwae = model.log_likelihood(x, k=100, labels=labels).mean()
    assert torch.isfinite(iwae) and iwae > elbo


def test_marginal_bound_is_tighter_than_the_classifier_bound():
    # Exact marginalisation of y beats U(x), which pays KL(q(y|x) || p(y)) for a classifier that is
    # confident without reason: here every class explains x equally well.
    model = constant_decoder_model()
    with torch.no_grad():
        model.classifier[-1].bias.copy_(torch.tensor([6.0, 0.0, 0.0]))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        u_bound = model.loss({"image": x, "label": torch.full((8,), -1)})["elbo"]
    marginal = model.elbo(x, num_samples=100).mean()
    assert marginal > u_bound + 0.5, (marginal, u_bound)  # log 3 - H(q): about 1 nat apart


def test_sample_is_seeded_and_follows_labels():
    torch.manual_seed(0)
    model = SSVAE(tiny(), (1, 28, 28), num_classes=K).eval()
    labels = torch.tensor([0, 1, 2, 0])
    a = model.sample(4, labels, generator=torch.Generator().manual_seed(7))
    b = model.sample(4, labels, generator=torch.Generator().manual_seed(7))
    c = model.sample(4, labels, generator=torch.Generator().manual_seed(8))
    d = model.sample(4, torch.tensor([1, 2, 0, 1]), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SSVAE(tiny(), (1, 28, 28), num_classes=K)
    batch = {"image": torch.rand(4, 1, 28, 28), "label": torch.tensor([0, -1, 2, -1])}
    train_steps(model, batch, 2)  # move weights off their init
    model.eval()
    save_model(model, tmp_path / "m")
    restored = SSVAE(tiny(), (1, 28, 28), num_classes=K)
    restored.load_state_dict(load_file(str(tmp_path / "m" / WEIGHTS_FILE)))
    restored.eval()
    x, labels = torch.rand(3, 1, 28, 28), torch.tensor([2, 0, 1])
    assert torch.equal(model.classify(x), restored.classify(x))
    assert torch.equal(model.embed(x), restored.embed(x))
    assert torch.equal(model.reconstruct(x, labels), restored.reconstruct(x, labels))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(3, labels, generator=g()), restored.sample(3, labels, generator=g()))


def test_learns_from_few_labels(digits_batch):
    torch.manual_seed(0)
    num_labelled = 30  # about 3 per class; the other 226 digits train through U(x) only
    labels = digits_batch["label"].clone()
    labels[num_labelled:] = -1
    batch = {"image": digits_batch["image"], "label": labels}
    model = SSVAE(SSVAEConfig(backbone="mlp", hidden_dim=64, latent_dim=4), (1, 8, 8), num_classes=10)
    history = train_steps(model, batch, 300, lr=3e-3)
    start, end = sum(history[:10]) / 10, sum(history[-10:]) / 10
    model.eval()
    correct = model.classify(digits_batch["image"]).argmax(1) == digits_batch["label"]
    labelled_acc, held_out_acc = correct[:num_labelled].float().mean(), correct[num_labelled:].float().mean()
    # measured: loss ~55 -> ~21; accuracy 1.00 on the labelled digits, 0.99 on the other 226
    assert end < start - 20, (start, end)
    assert labelled_acc > 0.9, labelled_acc
    assert held_out_acc > 0.5, held_out_acc  # chance is 0.1


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="SSVAEConfig.classifier_weight"):
        SSVAEConfig(classifier_weight=-1.0)
    with pytest.raises(ConfigError, match="SSVAEConfig.latent_dim"):
        SSVAEConfig(latent_dim=0)
    with pytest.raises(ConfigError, match="classifier_wieght"):
        SSVAEConfig.from_dict({"classifier_wieght": 1.0})
