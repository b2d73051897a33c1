"""The ex-post mixture prior: fitted per class, it samples where that class's codes are (in the
proportions they have there), reproducibly for a generator seed, survives a dict round trip, and
refuses what it cannot do with errors that name the problem."""
import numpy as np
import pytest
import torch

from vaemodels.mixture_prior import UNCONDITIONAL, MixturePrior, fit_mixture_prior

CENTRES = {0: [(-4.0, 0.0), (4.0, 0.0)], 1: [(0.0, 6.0), (0.0, -6.0)]}  # two clusters per class in 2-d


def clustered_codes(n=1200, seed=0):
    """Class 0: 70% at (-4, 0), 30% at (4, 0); class 1: 70% at (0, 6), 30% at (0, -6); std 0.3."""
    rng = np.random.default_rng(seed)
    codes, labels = [], []
    for label, (major, minor) in CENTRES.items():
        for centre, share in ((major, 0.7), (minor, 0.3)):
            count = int(n * share)
            codes.append(rng.normal(centre, 0.3, size=(count, 2)))
            labels += [label] * count
    return np.concatenate(codes), np.array(labels)


@pytest.fixture(scope="module")
def prior():
    codes, labels = clustered_codes()
    return fit_mixture_prior(codes, labels, components=2, seed=0)


def nearest_centre(z, label):
    centres = torch.tensor(CENTRES[label])
    return torch.cdist(z.double(), centres.double()).min(dim=1)


def test_samples_land_on_their_class_clusters_in_their_proportions(prior):
    assert prior.keys == (0, 1) and prior.components == 2 and prior.latent_dim == 2
    for label in (0, 1):
        z = prior.sample(4000, torch.full((4000,), label), torch.Generator().manual_seed(1))
        distance, which = nearest_centre(z, label)
        assert z.shape == (4000, 2) and z.dtype == torch.float32
        assert float((distance < 1.2).float().mean()) > 0.99  # within 4 std of one of its own centres
        assert abs(float((which == 0).float().mean()) - 0.7) < 0.03  # the 70/30 split is kept
        other = nearest_centre(z, 1 - label)[0]
        assert float(other.min()) > 3.0  # never on the other class's clusters
        assert 0.25 < float(z[which == 0].std(dim=0).mean()) < 0.35  # the clusters' own spread (0.3)


def test_temperature_scales_the_spread_around_each_component(prior):
    labels = torch.zeros(3000, dtype=torch.long)
    wide = prior.sample(3000, labels, torch.Generator().manual_seed(2), temperature=1.0)
    tight = prior.sample(3000, labels, torch.Generator().manual_seed(2), temperature=0.1)
    assert float(nearest_centre(tight, 0)[0].mean()) < 0.2 * float(nearest_centre(wide, 0)[0].mean())


def test_same_generator_seed_same_codes_and_a_round_trip_keeps_them(prior):
    labels = torch.tensor([0, 1, 1, 0, 1])
    first = prior.sample(5, labels, torch.Generator().manual_seed(7))
    assert torch.equal(first, prior.sample(5, labels, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, prior.sample(5, labels, torch.Generator().manual_seed(8)))
    copy = MixturePrior.from_dict(prior.to_dict())
    assert copy.sha256() == prior.sha256()
    assert torch.equal(copy.sample(5, labels, torch.Generator().manual_seed(7)), first)
    refit = fit_mixture_prior(*clustered_codes(), components=2, seed=0)
    assert refit.sha256() == prior.sha256()  # the fit is deterministic for a seed
    assert fit_mixture_prior(*clustered_codes(seed=1), components=2, seed=0).sha256() != prior.sha256()


def test_an_unconditional_prior_is_one_mixture_over_all_codes():
    codes, _ = clustered_codes()
    prior = fit_mixture_prior(codes, None, components=4, seed=0)
    assert prior.keys == (UNCONDITIONAL,)
    z = prior.sample(4000, None, torch.Generator().manual_seed(3))
    centres = torch.tensor([c for pair in CENTRES.values() for c in pair], dtype=torch.float64)
    distance, which = torch.cdist(z.double(), centres).min(dim=1)
    assert float((distance < 1.2).float().mean()) > 0.99
    shares = [float((which == i).float().mean()) for i in range(4)]
    assert np.allclose(shares, [0.35, 0.15, 0.35, 0.15], atol=0.03)  # half the codes per class, 70/30 within


def test_a_small_class_gets_fewer_components_padded_with_zero_weight():
    codes, labels = clustered_codes()
    codes = np.concatenate([codes, [[9.0, 9.0], [9.1, 9.0], [9.0, 9.1], [9.1, 9.1]]])
    labels = np.concatenate([labels, [2] * 4])
    prior = fit_mixture_prior(codes, labels, components=5, seed=0)
    assert prior.weights.shape == (3, 5)
    assert np.count_nonzero(prior.weights[2]) == 2 and np.allclose(prior.weights.sum(axis=1), 1.0)
    z = prior.sample(200, torch.full((200,), 2), torch.Generator().manual_seed(0))
    assert float(torch.linalg.norm(z - torch.tensor([9.0, 9.0]), dim=1).max()) < 1.0


def test_errors_name_the_problem(prior):
    codes, labels = clustered_codes()
    with pytest.raises(ValueError, match=r"classes \[2\] have fewer"):
        fit_mixture_prior(np.concatenate([codes, [[0.0, 0.0]]]), np.concatenate([labels, [2]]), 2, 0)
    with pytest.raises(ValueError, match=r"shape \(N, D\), got \(5,\)"):
        fit_mixture_prior(np.zeros(5), None, 2, 0)
    with pytest.raises(ValueError, match=r"no component for classes \[3\] \(it was fitted on classes \[0, 1\]\)"):
        prior.sample(2, torch.tensor([0, 3]), torch.Generator().manual_seed(0))
