"""Conditional VAE (Sohn, Lee & Yan, "Learning Structured Output Representation using Deep
Conditional Generative Models", NeurIPS 2015): q(z|x,y) and p(x|z,y) both see a one-hot class y.

Class-conditional generation: by default the prior is learned per class, p(z|y) = N(mu_y, sigma_y^2)
(the paper's prior network, for a one-hot input), so `sample(n, labels)` draws z where class y's
codes actually live. With the plain N(0, I) prior ("standard") the encoder still puts class identity
into z early in training (the KL saving for removing it is only ~log K nats), and prior samples then
come out as the wrong digit. Needs labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vaemodels.common import (
    DecoderLikelihood,
    ModelConfig,
    VariationalModel,
    _require,
    build_decoder,
    build_encoder,
    gaussian_kl_between,
    linear_warmup,
    log_normal,
    one_hot,
    reparameterize,
)


@dataclass(frozen=True)
class CVAEConfig(ModelConfig):
    kl_warmup_steps: int = 0  # steps over which the KL weight rises linearly from 0 to beta (0 = off)
    beta: float = 1.0  # KL weight in the training loss (β-weighted conditional VAE; 1 = Sohn et al.)
    prior: str = "learned"  # p(z|y): "learned" N(mu_y, sigma_y^2) per class, or "standard" N(0, I) for all

    # models saved before `prior` existed used the standard normal prior
    legacy_defaults: ClassVar[dict[str, Any]] = {"prior": "standard"}

    def _check(self) -> None:
        super()._check()
        _require(self.prior in ("learned", "standard"), self, "prior", "must be 'learned' or 'standard'")
        _require(self.kl_warmup_steps >= 0, self, "kl_warmup_steps", "must be >= 0")
        _require(self.beta >= 0, self, "beta", "must be >= 0")


class CVAE(VariationalModel):
    name = "cvae"
    description = "Conditional VAE (Sohn et al. 2015): encoder and decoder conditioned on a one-hot class"
    config_class = CVAEConfig
    is_conditional = True

    def __init__(self, config: CVAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        self.encoder = build_encoder(config, self.input_shape)
        self.posterior = nn.Linear(self.encoder.feature_dim + num_classes, 2 * config.latent_dim)
        self.decoder = build_decoder(config, self.input_shape, config.latent_dim + num_classes)
        self.likelihood = DecoderLikelihood(config.likelihood, self.input_shape[0], config.gaussian_std)
        if config.prior == "learned":
            # (mu_y, log sigma_y^2) per class; zeros = N(0, I), so training starts from the standard prior
            self.class_prior = nn.Embedding(num_classes, 2 * config.latent_dim)
            nn.init.zeros_(self.class_prior.weight)

    def kl_weight(self) -> float:
        """Weight on the KL term in the training loss (the ELBO itself always uses 1)."""
        return self.config.beta * linear_warmup(self.training_step, self.config.kl_warmup_steps)

    # -- the networks, on already-checked labels ----------------------------------------------
    def _posterior(self, x: torch.Tensor, labels: torch.Tensor):
        features = torch.cat([self.encoder(x), one_hot(labels, self.num_classes)], dim=1)
        mu, logvar = self.posterior(features).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _prior(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of p(z|y), each B x latent_dim."""
        if self.config.prior == "standard":
            zeros = torch.zeros(len(labels), self.config.latent_dim, device=labels.device)
            return zeros, zeros
        mu, logvar = self.class_prior(labels).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _decoder_params(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, one_hot(labels, self.num_classes)], dim=1))

    def _batch_labels(self, batch) -> torch.Tensor:
        labels = batch.get("label")
        n = batch["image"].shape[0]
        if labels is None:
            raise ValueError(f"model {self.name!r} trains on labelled data: the batch has no 'label'")
        unlabelled = int((torch.as_tensor(labels) < 0).sum())
        if unlabelled:
            raise ValueError(f"model {self.name!r} trains on labelled data only: "
                             f"{unlabelled} of {n} samples in the batch are unlabelled (label -1)")
        return self._check_labels(labels, n)

    # -- the interface ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """Posterior parameters (mu, logvar) of q(z|x,y), each B x latent_dim; labels are required."""
        return self._posterior(x, self._check_labels(labels, x.shape[0]))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of p(x|z,y) in [0, 1]; labels are required."""
        return self.likelihood.mean(self._decoder_params(z, self._check_labels(labels, z.shape[0])))

    def loss(self, batch):
        x = batch["image"]
        labels = self._batch_labels(batch)
        mu, logvar = self._posterior(x, labels)
        z = reparameterize(mu, logvar)
        log_px = self.likelihood.log_prob(x, self._decoder_params(z, labels))
        kl = gaussian_kl_between(mu, logvar, *self._prior(labels))
        recon = -log_px.mean()
        kl_mean = kl.mean()
        return {
            "loss": recon + self.kl_weight() * kl_mean,
            "recon": recon,
            "kl": kl_mean,
            "elbo": (log_px - kl).mean(),
        }

    def log_importance_weights(self, x, num_samples, labels=None):
        """log p(x, z_k | y) - log q(z_k | x, y): shape (num_samples, B); labels are required."""
        labels = self._check_labels(labels, x.shape[0])
        mu, logvar = self._posterior(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        params = self._decoder_params(z.flatten(0, 1), labels.repeat(num_samples))
        log_px = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), params).view(num_samples, -1)
        prior_mu, prior_logvar = self._prior(labels)
        return log_px + log_normal(z, prior_mu, prior_logvar) - log_normal(z, mu, logvar)

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample -log p(x) with the class marginalised out under a uniform p(y):
        log p(x) ≈ logsumexp_y ELBO(x | y) - log K, each ELBO a 10-sample average as in the base class,
        so no labels are needed (costs K ELBO passes)."""
        per_class = []
        for y in range(self.num_classes):
            labels = torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
            per_class.append(self.elbo(x, labels, num_samples=10))
        log_px = torch.logsumexp(torch.stack(per_class), dim=0) - math.log(self.num_classes)
        return -log_px

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        """n images, the i-th of class labels[i] (z ~ N(mu_y, T^2 sigma_y^2)); labels are required."""
        return self.sample_with_latent(n, labels, generator, temperature)[0]

    @torch.no_grad()
    def sample_with_latent(self, n, labels=None, generator=None, temperature=1.0):
        """(images, z) with z drawn from the class's own prior N(mu_y, T^2 sigma_y^2)."""
        labels = self._check_labels(labels, n).to(self.device)
        mu, logvar = self._prior(labels)
        z = mu + torch.exp(0.5 * logvar) * self._prior_noise(n, self.config.latent_dim, generator, temperature)
        return self.likelihood.mean(self._decoder_params(z, labels)), z
