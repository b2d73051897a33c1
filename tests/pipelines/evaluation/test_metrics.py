"""The quality metrics on inputs whose answers are known: FID of a set against itself and against
closed-form Gaussians, PRDC on hand-made point clouds, MIG of the true shapes factors against
random codes, the reference classifier and its reliability verdict, CAS and memorisation with real
held-out data (or copies, black frames, noise) standing in for synthetic, and held-out-digit
anomaly detection."""
import numpy as np
import pytest
import torch

import vaemodels
from pipelines.data import read_manifest, shapes
from pipelines.evaluation.data import load_split
from pipelines.evaluation.metrics import (accuracy, augmentation_gain, chance_accuracy, detection_metrics, factor_gaps,
                               features, fit_classifier, frechet_distance, held_out_class_detection, judge,
                               load_classifier, memorisation, mutual_information_gap, per_class_accuracy,
                               precision_recall_density_coverage, predict_proba, save_classifier, stratified_subset,
                               train_test_accuracy)
from pipelines.evaluation.metrics.classifier import random_shift, stage_channels


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
    """From 2% of the digits (~3 per class), adding the rest of the real train set helps a lot and
    adding labelled noise does not; every arm stops on the same real split."""
    train, val = digits
    stop = stratified_subset(train.labels, 0.1, 5)
    rest = torch.ones(len(train.labels), dtype=torch.bool)
    rest[stop] = False
    x, y, holdout = train.images[rest], train.labels[rest], (train.images[stop], train.labels[stop])
    held = torch.ones(len(y), dtype=torch.bool)
    held[stratified_subset(y, 0.02, 0)] = False  # extra real data the seed-0 subset lacks
    real_extra = augmentation_gain(x, y, x[held], y[held], val.images, val.labels, 10, real_fraction=0.02, seeds=2,
                                   steps=400, holdout=holdout)
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1000, 1, 8, 8, generator=generator)
    noise_labels = torch.randint(0, 10, (1000,), generator=generator)
    junk = augmentation_gain(x, y, noise, noise_labels, val.images, val.labels, 10, real_fraction=0.02, seeds=2,
                             steps=400, holdout=holdout)
    assert real_extra["gain"] > 0.1 and len(real_extra["gains"]) == 2 and real_extra["std"] >= 0
    assert junk["gain"] < real_extra["gain"] - 0.1


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


# -- the reference classifier and whether it can judge -------------------------------------------

@pytest.fixture(scope="module")
def reference(digits):
    """The evaluator's recipe on digits: train on 90% of train, stop on the other 10%, test on val."""
    train, val = digits
    stop = stratified_subset(train.labels, 0.1, 0)
    keep = torch.ones(len(train.labels), dtype=torch.bool)
    keep[stop] = False
    holdout = (train.images[stop], train.labels[stop])
    classifier, report = fit_classifier(train.images[keep], train.labels[keep], 10, steps=1500, holdout=holdout)
    return classifier, report, holdout, keep


def test_reference_classifier_learns_digits_and_stops_early(digits, reference):
    train, val = digits
    classifier, report, holdout, _ = reference
    assert accuracy(classifier, val.images, val.labels) >= 0.93
    assert report.stopped_early and report.best_step < report.steps < 1500
    assert report.holdout_accuracy == pytest.approx(accuracy(classifier, *holdout))  # the best weights were kept
    verdict = judge(accuracy(classifier, val.images, val.labels), chance_accuracy(val.labels), 0.9, ["fid", "cas"])
    assert verdict.reliable and verdict.affected == ("cas", "fid")


def test_one_step_classifier_is_judged_unreliable(digits):
    train, val = digits
    classifier, report = fit_classifier(train.images, train.labels, 10, steps=1, holdout=(val.images, val.labels))
    assert report.steps == 1
    score = accuracy(classifier, val.images, val.labels)
    verdict = judge(score, chance_accuracy(val.labels), 0.9,
                    ["fid", "precision", "cas", "augmentation_gain_1pct", "recon", "mig"])
    assert score < 0.5 and not verdict.reliable and "below the floor of 0.90" in verdict.reason
    assert verdict.affected == ("augmentation_gain_1pct", "cas", "fid", "precision")  # not recon, not mig


def test_judge_refuses_a_classifier_near_chance_even_under_a_low_floor():
    assert judge(0.95, 0.5, 0.9, []).reliable
    near_chance = judge(0.6, 0.5, 0.0, [])  # above a floor of 0, but closes only a fifth of the gap to 1
    assert not near_chance.reliable and "chance" in near_chance.reason
    assert chance_accuracy(torch.tensor([0, 0, 0, 1])) == 0.75


def test_black_and_noise_sets_get_large_fid_low_prdc_and_chance_cas(digits, reference):
    """Blank frames and uniform noise, labelled like a balanced conditional sample: far from real digits
    in the reference features (FID far above real-vs-real, almost no real ball covered), and a
    classifier trained on them guesses (CAS ~ chance). Precision is asserted for noise only: 600
    identical black frames are one point, and k-NN precision counts it as real when it falls in the
    ball of a single outlier digit (measured: density 0.2 = one ball of k=5, coverage 0.003), the
    weakness Naeem et al.'s density and coverage were made for."""
    train, val = digits
    classifier, _, holdout, keep = reference
    real = features(classifier, torch.cat([val.images, holdout[0]]))  # images it did not train on
    twin = features(classifier, train.images[keep][:len(real)])  # real vs real: the scale of a good FID
    labels = torch.arange(10).repeat_interleave(60)
    black = torch.zeros(len(labels), 1, 8, 8)
    noise = torch.rand(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    chance = chance_accuracy(val.labels)
    for name, images in (("black", black), ("noise", noise)):
        fake = features(classifier, images)
        fid = frechet_distance(real, fake)
        assert fid > 10 * frechet_distance(real, twin), name
        prdc = precision_recall_density_coverage(real, fake[:len(real)])
        assert prdc["recall"] <= 0.1 and prdc["coverage"] <= 0.1 and prdc["density"] <= 0.25, (name, prdc)
        assert name == "black" or prdc["precision"] <= 0.2, (name, prdc)
        cas = train_test_accuracy(images, labels, val.images, val.labels, 10, steps=300, seed=1, holdout=holdout)
        assert cas <= chance + 0.1, (name, cas)


def test_real_held_out_images_as_synthetic_give_cas_near_trtr_and_no_memorisation(digits):
    """Half of train plays the training set, the other half (real, unseen) the synthetic set."""
    train, val = digits
    half_a = stratified_subset(train.labels, 0.5, 0)
    rest = torch.ones(len(train.labels), dtype=torch.bool)
    rest[half_a] = False
    a, b = (train.images[half_a], train.labels[half_a]), (train.images[rest], train.labels[rest])
    trtr = train_test_accuracy(*a, val.images, val.labels, 10, steps=600, seed=0)
    cas = train_test_accuracy(*b, val.images, val.labels, 10, steps=600, seed=1)
    assert trtr > 0.9 and abs(cas - trtr) <= 0.04
    result = memorisation(b[0], a[0], val.images)
    assert 0.85 <= result["memorisation_ratio"] <= 1.15
    assert result["copy_fraction"] <= 0.02 and result["val_copy_fraction"] <= 0.02


def test_copies_of_train_images_are_flagged(digits):
    train, val = digits
    exact = memorisation(train.images[:500], train.images, val.images)
    assert exact["memorisation_ratio"] == pytest.approx(0.0, abs=1e-3) and exact["copy_fraction"] == 1.0
    # near-exact copies: each pixel moved by ~1% of its range
    jitter = 0.01 * torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    near = memorisation((train.images[:500] + jitter).clamp(0, 1), train.images, val.images)
    assert near["memorisation_ratio"] < 0.1 and near["copy_fraction"] >= 0.95
    with pytest.raises(ValueError, match="image sizes differ"):
        memorisation(torch.zeros(5, 1, 4, 4), train.images, val.images)
    with pytest.raises(ValueError, match="exact copy in train"):
        memorisation(val.images, train.images, train.images)


def test_per_class_accuracy_surfaces_the_class_a_set_lacks(digits):
    """A classifier trained without any 3s gets 0 recall on real 3s and high recall elsewhere."""
    train, val = digits
    keep = train.labels != 3
    per_class = per_class_accuracy(
        fit_classifier(train.images[keep], train.labels[keep], 10, steps=500)[0], val.images, val.labels, 10)
    assert per_class[3] == 0.0
    assert np.mean([v for c, v in enumerate(per_class) if c != 3]) > 0.85


def test_saved_classifier_round_trips_without_pickle(digits, reference, tmp_path):
    _, val = digits
    classifier = reference[0]
    folder = save_classifier(classifier, tmp_path / "ref", val_accuracy=0.97)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded, spec = load_classifier(folder)
    assert spec["val_accuracy"] == 0.97 and spec["input_shape"] == [1, 8, 8] and spec["num_classes"] == 10
    assert torch.equal(predict_proba(loaded, val.images), predict_proba(classifier, val.images))
    with pytest.raises(ValueError, match="config.json is missing"):
        load_classifier(tmp_path / "nowhere")
    model_dir = vaemodels.save_model(vaemodels.build("vae", (1, 8, 8), backbone="mlp", hidden_dim=8), tmp_path / "vae")
    with pytest.raises(ValueError, match="not a reference classifier"):
        load_classifier(model_dir)


def test_random_shift_moves_content_and_keeps_shape():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    shifted = random_shift(image.repeat(200, 1, 1, 1), 2, torch.Generator().manual_seed(0))
    assert shifted.shape == (200, 1, 9, 9) and torch.equal(shifted.sum((1, 2, 3)), torch.ones(200))
    positions = {tuple(torch.nonzero(s[0])[0].tolist()) for s in shifted}
    assert positions == {(r, c) for r in range(2, 7) for c in range(2, 7)}  # every offset in [-2, 2]^2
    assert torch.equal(random_shift(image, 0, torch.Generator()), image)


def test_trunk_depth_follows_the_image_size():
    assert stage_channels((1, 8, 8)) == ((16, 1), (32, 2))  # 8 x 8 -> 4 x 4
    assert stage_channels((1, 28, 28)) == ((16, 2), (32, 2))  # -> 14 -> 7
    assert stage_channels((1, 64, 64)) == ((16, 2), (32, 2), (32, 2))  # pooled to 32 x 32 first, -> 4 x 4
