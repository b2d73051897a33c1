"""VAE with planar / IAF posterior flows: shapes, exact log-determinants, the flow_steps=0 case,
bounds, seeding, save/load and learning on real digits."""
import pytest
import torch
from safetensors.torch import load_file

from tests.vaemodels.conftest import train_steps
from vaemodels.common import ConfigError
from vaemodels.serialization import WEIGHTS_FILE, save_model
from vaemodels.vae import VAE, VAEConfig
from vaemodels.vae_flow import IAFStep, PlanarFlow, VAEFlow, VAEFlowConfig

TINY = dict(latent_dim=4, hidden_dim=32, conv_channels=(8, 16, 16), flow_steps=2, iaf_hidden_dim=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a shared 2-core box, intra-op threads cost far more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(flow="planar", **overrides):
    return VAEFlowConfig(**{**TINY, "flow": flow, **overrides})


def log_abs_det_jacobian(fn, z):
    jac = torch.autograd.functional.jacobian(fn, z)
    return torch.linalg.slogdet(jac).logabsdet, jac


@pytest.mark.parametrize("flow", ["planar", "iaf"])
@pytest.mark.parametrize("backbone", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 64, 64), (3, 32, 32)])
def test_shapes(flow, backbone, shape):
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow, backbone=backbone), shape)
    x = torch.rand(3, *shape)
    mu, logvar, context = model.encode(x)
    assert mu.shape == logvar.shape == (3, 4) and context.shape == (3, 32)
    assert model.kl_per_dimension(x).shape == (4,)
    assert model.embed(x).shape == (3, 4)
    assert model.decode(torch.randn(3, 4)).shape == (3, *shape)
    recon = model.reconstruct(x)
    assert recon.shape == (3, *shape) and recon.min() >= 0 and recon.max() <= 1
    assert model.sample(5).shape == (5, *shape)
    assert model.log_importance_weights(x, 6).shape == (6, 3)
    assert model.anomaly_score(x).shape == (3,)
    out = model.loss({"image": x})
    assert {"loss", "recon", "kl", "elbo"} <= set(out)
    assert all(v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_loss_finite_and_differentiable(flow):
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow), (1, 28, 28))
    out = model.loss({"image": torch.rand(4, 1, 28, 28)})
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))
    out["loss"].backward()
    flow_grads = [p.grad for p in model.flows.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in flow_grads)
    assert any(g.abs().sum() > 0 for g in flow_grads)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("use_context", [True, False])
def test_planar_log_det_matches_autograd(use_context):
    torch.manual_seed(0)
    layer = PlanarFlow(dim=4, context_dim=3).double()
    context = torch.randn(1, 3, dtype=torch.double) if use_context else None
    for _ in range(5):
        z = torch.randn(4, dtype=torch.double) * 2
        expected, _ = log_abs_det_jacobian(lambda v: layer(v[None], context)[0][0], z)
        _, log_det = layer(z[None], context)
        assert torch.allclose(log_det[0], expected, atol=1e-10)


def test_planar_constraint_keeps_flow_invertible():
    torch.manual_seed(0)
    layer = PlanarFlow(dim=3, context_dim=5).double()  # float64: wᵀu reaches -600, cancellation
    with torch.no_grad():
        layer.head.weight.mul_(20.0)  # large, adversarial raw u and w (often wᵀu << -1)
    context = torch.randn(1000, 5, dtype=torch.double)
    u, w, b = layer.flow_parameters(context)
    raw_u, raw_w, _ = layer.head(context).split([3, 3, 1], dim=-1)
    assert ((raw_u * raw_w).sum(-1) < -1).sum() > 100  # the constraint has real work to do
    raw_wu = (raw_u * raw_w).sum(-1)
    wu_hat = (w * u).sum(-1)
    # wᵀû = m(wᵀu) = -1 + softplus(wᵀu) > -1 (up to round-off where softplus underflows)
    assert torch.allclose(wu_hat, torch.nn.functional.softplus(raw_wu) - 1, atol=1e-9)
    assert (wu_hat >= -1 - 1e-9).all()
    # invertible means a positive Jacobian determinant everywhere, i.e. a finite log-det
    _, log_det = layer(torch.randn(1000, 3, dtype=torch.double) * 5, context)
    assert torch.isfinite(log_det).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_iaf_log_det_matches_autograd_and_jacobian_is_triangular(reverse):
    torch.manual_seed(0)
    layer = IAFStep(dim=5, hidden_dim=16, context_dim=3, reverse=reverse).double()
    context = torch.randn(1, 3, dtype=torch.double)
    z = torch.randn(5, dtype=torch.double)
    expected, jac = log_abs_det_jacobian(lambda v: layer(v[None], context)[0][0], z)
    _, log_det = layer(z[None], context)
    assert torch.allclose(log_det[0], expected, atol=1e-10)
    # output i depends only on inputs earlier in the ordering (reversed: later)
    off_diagonal = jac.triu(1) if not reverse else jac.tril(-1)
    assert off_diagonal.abs().max() == 0
    below_or_above = jac.tril(-1) if not reverse else jac.triu(1)
    assert below_or_above.abs().max() > 0  # and it really does depend on them
    assert torch.all((jac.diagonal() > 0) & (jac.diagonal() < 1))  # the gate σ


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_composed_flow_log_det_matches_autograd(flow):
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow, backbone="mlp", flow_steps=3), (1, 8, 8)).double()
    _, _, context = model.encode(torch.rand(1, 1, 8, 8, dtype=torch.double))
    context = context.detach()
    z0 = torch.randn(4, dtype=torch.double)
    expected, jac = log_abs_det_jacobian(lambda v: model.flow(v[None], context)[0][0], z0)
    _, log_det = model.flow(z0[None], context)
    assert torch.allclose(log_det[0], expected, atol=1e-9)
    if flow == "iaf":  # alternating orderings: the composition is no longer triangular
        assert jac.triu(1).abs().max() > 0 and jac.tril(-1).abs().max() > 0


def test_zero_flow_steps_is_exactly_the_vae():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**{k: v for k, v in TINY.items() if k not in ("flow_steps", "iaf_hidden_dim")}), (1, 28, 28))
    flow_model = VAEFlow(tiny(flow_steps=0), (1, 28, 28))
    flow_model.load_state_dict(vae.state_dict())  # same parameter names, nothing extra
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(1)
    expected = vae.loss({"image": x})
    torch.manual_seed(1)
    got = flow_model.loss({"image": x})
    for key in ("loss", "recon", "kl", "elbo"):
        assert torch.equal(got[key], expected[key]), key
    torch.manual_seed(2)
    expected_w = vae.log_importance_weights(x, 5)
    torch.manual_seed(2)
    assert torch.allclose(flow_model.log_importance_weights(x, 5), expected_w)


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_flow_posterior_is_a_normalised_density(flow):
    # With a decoder that ignores z, log p(x) = log p(x|z) exactly, and the IWAE estimate can only
    # converge to it if log q_K = log q0 - Σ log|det| is the true density of z_K.
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow, backbone="mlp", latent_dim=2, flow_steps=3), (1, 8, 8)).eval()
    with torch.no_grad():
        model.decoder.net[-2].weight.zero_()
        model.decoder.net[-2].bias.zero_()  # Bernoulli logits 0: log p(x|z) = -64 log 2
        model.posterior.weight.zero_()
        model.posterior.bias.copy_(torch.tensor([0.0, 0.0, 1.4, 1.4]))  # q0 = N(0, 2^2): wider than p(z)
    x = torch.rand(1, 1, 8, 8)
    log_px = model.log_likelihood(x, k=40000, chunk_size=10000)
    assert abs(log_px.item() + 64 * torch.log(torch.tensor(2.0)).item()) < 0.05


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_loss_elbo_matches_importance_weights(flow):
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow, backbone="mlp"), (1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(1)
    elbo = model.loss({"image": x})["elbo"]
    torch.manual_seed(1)  # same noise: both paths must compute the same one-sample bound
    assert torch.allclose(elbo, model.log_importance_weights(x, 1).mean(), atol=1e-5)


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_iwae_bound_is_above_elbo(flow):
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow, backbone="mlp"), (1, 8, 8)).eval()
    x = torch.rand(8, 1, 8, 8)
    elbo = model.elbo(x, num_samples=200).mean()
    iwae = model.log_likelihood(x, k=200).mean()
    assert torch.isfinite(iwae) and iwae > elbo


def test_sample_is_seeded():
    model = VAEFlow(tiny("iaf"), (1, 28, 28)).eval()
    a = model.sample(4, generator=torch.Generator().manual_seed(7))
    b = model.sample(4, generator=torch.Generator().manual_seed(7))
    c = model.sample(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_save_load_round_trip(flow, tmp_path):
    torch.manual_seed(0)
    model = VAEFlow(tiny(flow), (1, 28, 28))
    train_steps(model, {"image": torch.rand(4, 1, 28, 28)}, 2)  # move weights off their init
    model.eval()
    save_model(model, tmp_path / "m")
    restored = VAEFlow(tiny(flow), (1, 28, 28))
    restored.load_state_dict(load_file(str(tmp_path / "m" / WEIGHTS_FILE)))
    restored.eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.embed(x), restored.embed(x))
    assert torch.equal(model.reconstruct(x), restored.reconstruct(x))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(2, generator=g()), restored.sample(2, generator=g()))


@pytest.mark.parametrize("flow", ["planar", "iaf"])
def test_learns_digits(flow, digits_batch):
    torch.manual_seed(0)
    model = VAEFlow(VAEFlowConfig(backbone="mlp", hidden_dim=64, latent_dim=4, flow=flow, flow_steps=2,
                                  iaf_hidden_dim=16), (1, 8, 8))
    history = train_steps(model, digits_batch, 300, lr=3e-3)
    start, end = sum(history[:10]) / 10, sum(history[-10:]) / 10
    # measured: ~41 -> ~25 nats per image (planar and iaf)
    assert end < start - 10, (start, end)


@pytest.mark.parametrize("field, value", [("flow", "glow"), ("flow_steps", -1), ("iaf_hidden_dim", 0),
                                          ("kl_warmup_steps", -5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"VAEFlowConfig.{field}"):
        VAEFlowConfig(**{field: value})


def test_wrong_config_class_and_unknown_field():
    with pytest.raises(ConfigError, match="VAEFlowConfig"):
        VAEFlow(VAEConfig(), (1, 28, 28))
    with pytest.raises(ConfigError, match="flows"):
        VAEFlowConfig.from_dict({"flows": 3})
