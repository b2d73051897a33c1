"""An ex-post latent prior: a Gaussian mixture fitted to the posterior means of real training images,
one mixture per class (or one for an unconditional model), to sample codes from instead of the
model's own prior. A trained VAE's aggregate posterior rarely fills its prior: codes drawn from
N(0, I) (or a cvae's per-class Gaussian) land between the regions real images occupy and decode to
the wrong class or to blends. Fitting a density to where the codes really are is the "ex-post
density estimation" of Ghosh et al., "From Variational to Deterministic Autoencoders" (ICLR 2020).

The fit is numpy/scikit-learn (deterministic for a seed); sampling is torch with the caller's
generator, so a generation block's bytes depend only on its seed. Parameters travel as plain arrays.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

UNCONDITIONAL = -1  # the key of the single mixture an unconditional model gets


@dataclass(frozen=True)
class MixturePrior:
    """Per key (a class id, or UNCONDITIONAL): mixture weights (K,), means (K, D) and the Cholesky
    factors (K, D, D) of the components' covariances. Every key has the same K and D."""

    keys: tuple[int, ...]
    weights: np.ndarray  # (len(keys), K)
    means: np.ndarray  # (len(keys), K, D)
    cholesky: np.ndarray  # (len(keys), K, D, D), lower triangular

    @property
    def components(self) -> int:
        return int(self.weights.shape[1])

    @property
    def latent_dim(self) -> int:
        return int(self.means.shape[2])

    def sha256(self) -> str:
        digest = hashlib.sha256(np.asarray(self.keys, np.int64).tobytes())
        for array in (self.weights, self.means, self.cholesky):
            digest.update(np.ascontiguousarray(array, np.float32).tobytes())
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "weights": self.weights.tolist(), "means": self.means.tolist(),
                "cholesky": self.cholesky.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "MixturePrior":
        return cls(tuple(int(k) for k in data["keys"]), np.asarray(data["weights"], np.float64),
                   np.asarray(data["means"], np.float64), np.asarray(data["cholesky"], np.float64))

    @functools.cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """weights, means and Cholesky factors as float64 tensors, made once (sampling runs per batch)."""
        return tuple(torch.as_tensor(a, dtype=torch.float64) for a in (self.weights, self.means, self.cholesky))

    def sample(self, n: int, labels: torch.Tensor | None, generator: torch.Generator,
               temperature: float = 1.0) -> torch.Tensor:
        """n codes (n x D, float32, on the CPU): a component drawn by weight, then mean + T * L @ eps.
        labels: n class ids for a per-class prior, None for an unconditional one."""
        if labels is None:
            rows = torch.full((n,), self.keys.index(UNCONDITIONAL), dtype=torch.long)
        else:
            index = {k: i for i, k in enumerate(self.keys)}
            missing = sorted({int(y) for y in labels.tolist()} - set(index))
            if missing:
                raise ValueError(f"the mixture prior has no component for classes {missing} "
                                 f"(it was fitted on classes {list(self.keys)})")
            rows = torch.tensor([index[int(y)] for y in labels.tolist()], dtype=torch.long)
        weights, means, factors = self._tensors
        component = torch.multinomial(weights[rows], 1, generator=generator).squeeze(1)
        noise = torch.randn((n, self.latent_dim), generator=generator, dtype=torch.float64)
        means, factors = means[rows, component], factors[rows, component]
        return (means + temperature * torch.einsum("nij,nj->ni", factors, noise)).float()


def fit_mixture_prior(codes: np.ndarray, labels: np.ndarray | None, components: int, seed: int) -> MixturePrior:
    """A full-covariance Gaussian mixture of `components` components per class of `labels` (one for
    all codes when labels is None). A class with fewer than 2 codes per component gets fewer
    components (padded with zero-weight copies so every key has the same K)."""
    from sklearn.mixture import GaussianMixture

    codes = np.asarray(codes, np.float64)
    if codes.ndim != 2 or len(codes) < 2:
        raise ValueError(f"a mixture prior needs at least 2 codes of shape (N, D), got {codes.shape}")
    if labels is None:
        groups = {UNCONDITIONAL: codes}
    else:
        labels = np.asarray(labels)
        groups = {int(k): codes[labels == k] for k in np.unique(labels)}
        small = {k: len(v) for k, v in groups.items() if len(v) < 2}
        if small:
            raise ValueError(f"a mixture prior needs at least 2 codes per class; classes {sorted(small)} have fewer")
    dim = codes.shape[1]
    weights = np.zeros((len(groups), components))
    means = np.zeros((len(groups), components, dim))
    cholesky = np.tile(np.eye(dim), (len(groups), components, 1, 1))
    for i, group in enumerate(groups.values()):
        k = max(1, min(components, len(group) // 2))
        mixture = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed).fit(group)
        weights[i, :k] = mixture.weights_
        means[i, :k] = mixture.means_
        cholesky[i, :k] = np.linalg.cholesky(mixture.covariances_)
    weights /= weights.sum(axis=1, keepdims=True)
    return MixturePrior(tuple(groups), weights, means, cholesky)
