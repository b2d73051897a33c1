"""Disentanglement of a learned code against known generative factors: the Mutual Information
Gap (Chen et al. 2018, "Isolating Sources of Disentanglement in Variational Autoencoders"), in
the histogram-discretised form of Locatello et al.'s disentanglement_lib. Needs data whose
factors are known (the `shapes` source); not a measure of sample quality.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import mutual_info_score

NUM_BINS = 20  # equal-width bins per code dimension (disentanglement_lib's default)


def mutual_information_gap(codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """MIG in [0, 1]: per factor, the gap between the two code dimensions that share the most
    information with it, divided by the factor's entropy; averaged over factors. 1 means every
    factor is captured by exactly one dimension; codes unrelated to the factors give ~0."""
    return float(np.mean(factor_gaps(codes, factors, num_bins)))


def factor_gaps(codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Each non-constant factor's normalised gap (the terms MIG averages), in factor order."""
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes (N x D) and factors (N x F) must be 2-D with the same N, "
                         f"got {codes.shape} and {factors.shape}")
    if codes.shape[1] < 2:
        raise ValueError(f"MIG compares the top two code dimensions per factor; the code has {codes.shape[1]}")
    binned = [discretize(codes[:, d], num_bins) for d in range(codes.shape[1])]
    gaps = []
    for f in range(factors.shape[1]):
        # factor values are discrete grid points: each distinct value is its own class
        factor = np.unique(factors[:, f], return_inverse=True)[1]
        entropy = mutual_info_score(factor, factor)  # H(v) in nats
        if entropy <= 0:
            continue  # a constant factor carries no information to capture
        information = np.sort([mutual_info_score(factor, b) for b in binned])[::-1]
        gaps.append((information[0] - information[1]) / entropy)
    if not gaps:
        raise ValueError("every factor is constant over these samples: MIG is undefined")
    return np.asarray(gaps)


def discretize(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index per value, over num_bins equal-width bins spanning the values' range."""
    edges = np.histogram_bin_edges(values, bins=num_bins)
    return np.digitize(values, edges[1:-1])
