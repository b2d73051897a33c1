"""What every model answers for pipelines (common.AutoEncoderModel): condition_on, interpolate and
traverse, on an unconditional and a conditional family, plus the one active-units rule."""
import torch

import vaemodels
from vaemodels.distributions import active_units, active_units_from_moments


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    num_classes = 10 if name in ("cvae", "ssvae") else None
    return vaemodels.build(name, (1, 8, 8), num_classes, backbone="mlp", latent_dim=3, hidden_dim=16, **overrides).eval()


def test_condition_on_gives_labels_only_to_conditional_models():
    labels = torch.tensor([3, -1, 5])
    assert tiny("vae").condition_on(labels) is None
    cvae = tiny("cvae")
    assert cvae.condition_on(labels).tolist() == [3, -1, 5] and cvae.condition_on(labels).dtype == torch.long
    assert cvae.condition_on(labels, all_known=True) is None
    assert cvae.condition_on(torch.tensor([3, 5]), all_known=True).tolist() == [3, 5]
    assert cvae.condition_on(None) is None


def test_interpolate_runs_from_the_first_code_to_the_second(digits_batch):
    for name, labels in (("vae", None), ("cvae", digits_batch["label"][:2])):
        model = tiny(name)
        x = digits_batch["image"][:2]
        line = model.interpolate(x, 5, labels)
        assert line.shape == (5, 1, 8, 8)
        known = model.condition_on(labels)
        ends = model.reconstruct(x, None if known is None else known[:1].repeat(2))
        assert torch.allclose(line[0], ends[0], atol=1e-5)
        # the far end is the second code, decoded in the first sample's class
        z = model.embed(x, known)[1:]
        assert torch.allclose(line[-1], model.decode(z, None if known is None else known[:1])[0], atol=1e-5)


def test_traverse_sweeps_one_dimension_per_row(digits_batch):
    model = tiny("cvae")
    x, y = digits_batch["image"][:1], digits_batch["label"][:1]
    values = torch.linspace(-3, 3, 4)
    grid = model.traverse(x, values, dims=[2, 0], labels=y)
    assert grid.shape == (8, 1, 8, 8)
    base = model.embed(x, y)[0]
    z = base.repeat(4, 1)
    z[:, 2] = values
    assert torch.allclose(grid[:4], model.decode(z, y.repeat(4)), atol=1e-5)
    assert model.traverse(x, values, labels=y).shape == (3 * 4, 1, 8, 8)  # every dimension by default


def test_active_units_from_moments_matches_all_means_at_once():
    means = torch.cat([torch.randn(500, 1) * 2.0, torch.randn(500, 1) * 0.05, torch.zeros(500, 1)], dim=1)
    assert active_units(means) == 1
    halves = [means[:250].double(), means[250:].double()]
    total = sum(h.sum(0) for h in halves)
    total_sq = sum((h**2).sum(0) for h in halves)
    assert active_units_from_moments(500, total, total_sq) == active_units(means)
