"""The quality metrics on inputs whose answers are known: FID of a set against itself and against
closed-form Gaussians, PRDC on hand-made point clouds, MIG of the true shapes factors against
random codes, TSTR with real data standing in for synthetic, and held-out-digit anomaly detection."""
import numpy as np
import pytest
import torch

import vaemodels
from pipelines.data import read_manifest, shapes
from pipelines.evaluate import load_split
from pipelines.metrics import (augmentation_gain, detection_metrics, factor_gaps, frechet_distance,
                               held_out_class_detection, mutual_information_gap, precision_recall_density_coverage,
                               stratified_subset, train_test_accuracy)


@pytest.fixture(scope="module")
def digits(digits_dataset):
    manifest = read_manifest(digits_dataset)
    return load_split(manifest, "train", 5000), load_split(manifest, "val", 5000)


@pytest.fixture(scope="module")
def shapes_factors():
    """Factor values of 5,000 distinct shapes grid points (no images needed for MIG)."""
    chosen = np.random.default_rng(0).choice(shapes.NUM_COMBINATIONS, size=5000, replace=False)
    return shapes.factor_values(shapes.factor_indices(chosen))


# -- Fréchet distance ----------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits_dataset):
    pixels = load_split(read_manifest(digits_dataset), "train", 5000).images.flatten(1).double().numpy()  # 64-D
    assert frechet_distance(pixels, pixels) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=pixels.shape)
    distances = [frechet_distance(pixels, pixels + level * noise) for level in (0.01, 0.05, 0.1, 0.3, 1.0)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    # white noise of std s turns covariance eigenvalues l into l + s^2 (and barely moves the mean), so
    # FID -> sum over eigenvalues of (sqrt(l + s^2) - sqrt(l))^2
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(pixels, rowvar=False)), 0, None)
    assert distances[-1] == pytest.approx(np.sum((np.sqrt(eigenvalues + 1.0) - np.sqrt(eigenvalues)) ** 2), rel=0.05)


def test_fid_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 8))
    shifted = rng.normal(size=(20000, 8)) + np.eye(8)[0] * 2.0  # |mu|^2 = 4
    wider = rng.normal(size=(20000, 8)) * 2.0  # tr(I + 4I - 2*2I) = 8
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, wider) == pytest.approx(8.0, rel=0.05)


def test_fid_survives_dead_features():
    """ReLU features that are 0 everywhere make the covariances singular; FID stays finite and right."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 6))
    a[:, 2] = 0.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-3)


# -- precision / recall / density / coverage -----------------------------------------------------

def test_prdc_of_identical_sets_is_one():
    cloud = np.random.default_rng(0).normal(size=(500, 16))
    result = precision_recall_density_coverage(cloud, cloud.copy(), k=5)
    assert result == {"precision": 1.0, "recall": 1.0, "density": pytest.approx(1.0), "coverage": 1.0}


def test_prdc_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 100.0
    assert precision_recall_density_coverage(real, fake) == {"precision": 0.0, "recall": 0.0, "density": 0.0,
                                                             "coverage": 0.0}


def test_prdc_on_a_line_worked_by_hand():
    """k=1 on a line. Real radii (distance to the nearest other real point): -5:5, 0:1, 1:1, 3:2, 7:4;
    fake radii: 1.5:3.5, 5:3.5, 20:15. precision: 1.5 (in 1's ball) and 5 (in 7's), not 20 -> 2/3.
    recall: every real point but -5 lies in a fake ball -> 4/5. density: 1.5 in the balls of 1 and 3,
    5 in 7's, 20 in none -> 3 / (1 * 3). coverage: balls of 1, 3 and 7 hold a fake point -> 3/5.
    (The same numbers as the authors' `prdc` package.)"""
    real, fake = np.array([[-5.0], [0.0], [1.0], [3.0], [7.0]]), np.array([[1.5], [5.0], [20.0]])
    assert precision_recall_density_coverage(real, fake, k=1) == pytest.approx(
        {"precision": 2 / 3, "recall": 0.8, "density": 1.0, "coverage": 0.6})


def test_mode_collapse_keeps_precision_and_loses_recall_and_coverage():
    """Real: four clusters. Fake: fresh draws from only one of them."""
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8) * 20.0
    real = np.concatenate([c + rng.normal(size=(200, 8)) for c in centres])
    fake = centres[0] + rng.normal(size=(800, 8))
    result = precision_recall_density_coverage(real, fake)
    assert result["precision"] > 0.9 and result["density"] > 0.8  # every fake sample looks real
    assert 0.15 < result["recall"] < 0.3 and 0.15 < result["coverage"] < 0.3  # a quarter of the data
    spread = precision_recall_density_coverage(real, np.concatenate([c + rng.normal(size=(200, 8)) for c in centres]))
    assert spread["recall"] > 0.9 and spread["coverage"] > 0.9


# -- MIG -----------------------------------------------------------------------------------------

def test_mig_of_the_true_factors_is_high_and_of_random_codes_near_zero(shapes_factors):
    assert mutual_information_gap(shapes_factors, shapes_factors) > 0.8
    random_codes = np.random.default_rng(0).normal(size=(len(shapes_factors), 10))
    assert mutual_information_gap(random_codes, shapes_factors) < 0.1


def test_mig_gap_vanishes_for_a_factor_split_over_two_dimensions(shapes_factors):
    """Copying the scale factor into a second dimension leaves no gap for it: MIG drops by a fifth."""
    duplicated = np.concatenate([shapes_factors, shapes_factors[:, 1:2]], axis=1)
    true_gaps, dup_gaps = factor_gaps(shapes_factors, shapes_factors), factor_gaps(duplicated, shapes_factors)
    assert dup_gaps[1] == pytest.approx(0.0, abs=1e-12)
    assert np.delete(dup_gaps, 1) == pytest.approx(np.delete(true_gaps, 1))


# -- classifier-based metrics --------------------------------------------------------------------

def test_tstr_on_real_data_matches_trtr(digits):
    """Real train images standing in for synthetic ones: TSTR (another seed) ~ TRTR, both high."""
    train, val = digits
    trtr = train_test_accuracy(train.images, train.labels, val.images, val.labels, 10, steps=500, seed=0)
    tstr = train_test_accuracy(train.images, train.labels, val.images, val.labels, 10, steps=500, seed=1)
    assert trtr > 0.9
    assert abs(tstr - trtr) <= 0.03


def test_augmentation_with_real_data_helps_and_with_noise_does_not(digits):
    train, val = digits
    held = torch.ones(len(train.labels), dtype=torch.bool)
    held[stratified_subset(train.labels, 0.1, 0)] = False  # extra real data the seed-0 subset lacks
    real_extra = augmentation_gain(train.images, train.labels, train.images[held], train.labels[held], val.images,
                                   val.labels, 10, seeds=2, steps=300)
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 1, 8, 8, generator=generator)
    noise_labels = torch.randint(0, 10, (1000,), generator=generator)
    junk = augmentation_gain(train.images, train.labels, noise, noise_labels, val.images, val.labels, 10, seeds=2,
                             steps=300)
    assert real_extra["gain"] > 0.01 and len(real_extra["gains"]) == 2 and real_extra["std"] >= 0
    assert junk["gain"] < real_extra["gain"] - 0.02


def test_stratified_subset_takes_a_tenth_of_every_class(digits):
    train, _ = digits
    subset = stratified_subset(train.labels, 0.1, seed=3)
    counts = torch.bincount(train.labels[subset], minlength=10)
    expected = torch.round(torch.bincount(train.labels, minlength=10) * 0.1)
    assert torch.equal(counts, expected.long())
    assert not torch.equal(subset, stratified_subset(train.labels, 0.1, seed=4))


# -- anomaly detection ---------------------------------------------------------------------------

def test_detection_metrics_on_hand_made_scores():
    assert detection_metrics([0, 1, 2], [3, 4])["auroc"] == 1.0
    assert detection_metrics([0, 1, 2], [3, 4])["average_precision"] == 1.0
    assert detection_metrics([3, 4], [0, 1, 2])["auroc"] == 0.0
    assert detection_metrics([1, 1, 1], [1, 1])["auroc"] == 0.5
    with pytest.raises(ValueError, match="NaN"):
        detection_metrics([0.0, float("nan")], [1.0])


def test_vae_trained_without_nines_flags_nines(digits):
    """A VAE (mlp) trained briefly on digits 0-8 gives 9s a higher -ELBO than unseen 0-8s.
    (Digit 1 is the hard case: simple strokes get high likelihood whether seen or not.)"""
    train, val = digits
    anomalous = torch.cat([train.images[train.labels == 9], val.images[val.labels == 9]])
    normal = val.images[val.labels != 9]

    def make_model():
        torch.manual_seed(0)
        return vaemodels.build("vae", (1, 8, 8), backbone="mlp", latent_dim=8, hidden_dim=128)

    result = held_out_class_detection(make_model, train.images, train.labels, normal, anomalous, anomaly_class=9,
                                      steps=2000, seed=0)
    assert result["auroc"] > 0.8
    assert result["average_precision"] > result["anomaly_fraction"] + 0.2
