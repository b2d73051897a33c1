"""Fidelity and diversity of a synthetic set against a real one, measured in a feature space:
the Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
to a Local Nash Equilibrium"), improved precision/recall (Kynkäänniemi et al. 2019) and
density/coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
Models"). Not here: which features to use (see classifier.py) or where the sets come from.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist

CHUNK_ROWS = 1024  # rows per block of pairwise distances: memory stays at CHUNK_ROWS x N doubles


def frechet_distance(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N x D, M x D):
    |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)). 0 for identical sets."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real has {real.shape[1]}, fake has {fake.shape[1]}")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    sigma_r, sigma_f = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_r @ sigma_f)
    if caught or not np.isfinite(covmean).all():
        # a singular product (dead ReLU features, fewer samples than dimensions): nudge both
        # covariances, as pytorch-fid does, so the square root is well defined
        offset = np.eye(sigma_r.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_r + offset) @ (sigma_f + offset))
    # rounding gives the square root of a PSD product a tiny imaginary part; the trace is real
    covmean = np.real(covmean)
    diff = mu_r - mu_f
    value = diff @ diff + np.trace(sigma_r) + np.trace(sigma_f) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))  # identical sets give 0 up to rounding, which may be -1e-12


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """The four k-NN manifold metrics, each in [0, 1] except density (mean ~1 when fake ~ real).

    Every real point gets a ball reaching its k-th nearest real neighbour (fake points likewise
    for recall). precision: share of fake points inside some real ball; recall: share of real
    points inside some fake ball; density: real balls holding each fake point, / k, averaged;
    coverage: share of real balls holding at least one fake point. Balls are open (strict <),
    as in the authors' `prdc` package, so identical sets give exactly 1, 1, 1, 1 without ties.
    """
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} points in each set, got {len(real)} real and {len(fake)} fake")
    real_radii = _kth_neighbour_distance(real, k)
    fake_radii = _kth_neighbour_distance(fake, k)

    inside_counts = np.zeros(len(fake))  # real balls holding each fake point
    for start, d in _distance_blocks(fake, real):  # fake x real
        inside_counts[start:start + len(d)] = (d < real_radii[None, :]).sum(1)
    recalled = np.zeros(len(real), dtype=bool)  # real points inside some fake ball
    covered = np.zeros(len(real), dtype=bool)  # real balls holding some fake point
    for start, d in _distance_blocks(real, fake):  # real x fake
        recalled[start:start + len(d)] = (d < fake_radii[None, :]).any(1)
        covered[start:start + len(d)] = d.min(1) < real_radii[start:start + len(d)]
    return {
        "precision": float((inside_counts > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(inside_counts.sum() / (k * len(fake))),
        "coverage": float(covered.mean()),
    }


def _distance_blocks(rows: np.ndarray, columns: np.ndarray):
    """(start, Euclidean distances of rows[start:start+CHUNK_ROWS] to every column point).

    scipy's cdist sums squared differences pair by pair, so d(a, b) is the same number in every
    block and both directions; the dot-product shortcut (sklearn, torch.cdist) is not, and a k-th
    neighbour a rounding error inside its own radius would count as a second neighbour."""
    for start in range(0, len(rows), CHUNK_ROWS):
        yield start, cdist(rows[start:start + CHUNK_ROWS], columns)


def _kth_neighbour_distance(points: np.ndarray, k: int) -> np.ndarray:
    """The k-NN radius: distance from each point to its k-th nearest neighbour in the same set.
    Each point's own distance 0 sorts first, so the k-th neighbour is the (k+1)-th smallest."""
    radii = np.empty(len(points))
    for start, d in _distance_blocks(points, points):
        radii[start:start + len(d)] = np.partition(d, k, axis=1)[:, k]
    return radii


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} features must be an N x D array with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features hold NaN or infinite values")
    return x
