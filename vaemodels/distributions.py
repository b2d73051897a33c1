"""The probability pieces families share: the decoder likelihood p(x|z) (Bernoulli or Gaussian),
Gaussian helpers (reparameterization, KL terms, log-densities), one-hot labels, KL warm-up and the
active-units count (Burda et al. 2016). Pure tensor functions, no model state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


# ----------------------------------------------------------------------------------------------
# Decoder likelihood p(x|z): turns decoder output into log-probabilities and mean images.
# ----------------------------------------------------------------------------------------------


class DecoderLikelihood(nn.Module):
    """Bernoulli (logits) or Gaussian (sigmoid mean, fixed or learned per-channel std)."""

    def __init__(self, kind: str, num_channels: int, std: float):
        super().__init__()
        self.kind = kind
        if kind == "gaussian_learned":
            self.log_std = nn.Parameter(torch.full((num_channels,), math.log(std)))
        else:
            self.register_buffer("log_std", torch.full((num_channels,), math.log(std)), persistent=False)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: one number per sample, in nats."""
        if self.kind == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)
        log_std = self.log_std.clamp(min=-7.0).view(1, -1, 1, 1)
        mean = torch.sigmoid(params)
        logp = -0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI
        return logp.flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The image the decoder predicts, in [0, 1]."""
        return torch.sigmoid(params)

    def tempered_mean(self, mean: torch.Tensor, pixel_temperature: float) -> torch.Tensor:
        """Mean of the tempered likelihood p(x|z)^(1/T) (normalised), from the plain mean.

        Bernoulli: p^(1/T) / (p^(1/T) + (1-p)^(1/T)) = sigmoid(logit(p) / T); below 1 it moves every
        pixel towards its more likely value, the sharp strokes a Bernoulli mean smears out as grey
        (the per-pixel independence assumption turns stroke-position uncertainty into blur). A Gaussian
        tempered by 1/T keeps its mean, so Gaussian likelihoods are returned unchanged."""
        if self.kind != "bernoulli" or pixel_temperature == 1.0:
            return mean
        eps = 1e-6
        return torch.sigmoid(torch.logit(mean.clamp(eps, 1 - eps)) / pixel_temperature)


# ----------------------------------------------------------------------------------------------
# Gaussian helpers. logvar everywhere is log sigma^2; everything returns per-sample sums unless
# its name says per-dimension.
# ----------------------------------------------------------------------------------------------


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps (Kingma & Welling 2014), so gradients flow through mu and sigma."""
    eps = randn_like(mu, generator)
    return mu + torch.exp(0.5 * logvar) * eps


def randn_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like t; drawn on the generator's device, then moved."""
    if generator is None:
        return torch.randn_like(t)
    return torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, sigma^2) || N(0, 1)) per latent dimension (shape of mu)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL to the standard normal, summed over dimensions: one number per sample."""
    return gaussian_kl_per_dim(mu, logvar).flatten(1).sum(1)


def gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """Analytic KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over dimensions, per sample."""
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0)
    return kl.flatten(1).sum(1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, sigma^2) summed over the last dimension."""
    return (-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 / logvar.exp())).sum(-1)


def total_correlation(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Minibatch estimate of TC(z) = KL(q(z) || prod_d q(z_d)) (Chen et al. 2018, "Isolating Sources
    of Disentanglement in VAEs"), with the batch standing in for the data set: log q(z_i) is
    logsumexp_j log q(z_i | x_j) - log B, and the same per dimension. Against Chen's minibatch-
    weighted estimator this drops the constant (D - 1) log N: the same gradients, no data-set size.
    z, mu, logvar: B x D. Returns one number (the batch mean)."""
    batch = z.shape[0]
    # B x B x D: log q(z_i,d | x_j) for every pair (i, j)
    pairwise = -0.5 * (LOG_2PI + logvar.unsqueeze(0) + (z.unsqueeze(1) - mu.unsqueeze(0)) ** 2 / logvar.exp().unsqueeze(0))
    log_norm = math.log(batch)
    log_qz = torch.logsumexp(pairwise.sum(2), dim=1) - log_norm
    log_prod_marginals = (torch.logsumexp(pairwise, dim=1) - log_norm).sum(1)
    return (log_qz - log_prod_marginals).mean()


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return (-0.5 * (LOG_2PI + z**2)).sum(-1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).float()


def linear_warmup(step: int, warmup_steps: int) -> float:
    """KL weight for warm-up (Bowman et al. 2016; Sønderby et al. 2016): 0 -> 1 over warmup_steps."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def active_units(posterior_means: torch.Tensor, threshold: float = 0.01) -> int:
    """Active units (Burda et al. 2016): dims whose posterior mean varies over the data, Cov_x(E_q[z]) > threshold."""
    means = posterior_means.double()
    return active_units_from_moments(len(means), means.sum(0), (means**2).sum(0), threshold)


def active_units_from_moments(count, total: torch.Tensor, total_sq: torch.Tensor, threshold: float = 0.01) -> int:
    """The same count from the sums of the posterior means and of their squares over `count` samples:
    the population variance E[m^2] - E[m]^2, so sums gathered across workers give the one answer."""
    variance = total_sq / count - (total / count) ** 2
    return int((variance > threshold).sum().item())
