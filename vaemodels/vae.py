"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

Gaussian posterior q(z|x) with the reparameterization trick, standard normal prior, analytic KL,
and an optional linear KL warm-up (Bowman et al. 2016). The reference for the other families.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vaemodels.common import (
    ModelConfig,
    VariationalModel,
    _require,
    build_decoder,
    build_encoder,
    DecoderLikelihood,
    gaussian_kl,
    linear_warmup,
    log_normal,
    log_standard_normal,
    reparameterize,
)


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    kl_warmup_steps: int = 0  # steps over which the KL weight rises linearly from 0 to 1 (0 = off)

    def _check(self) -> None:
        super()._check()
        _require(self.kl_warmup_steps >= 0, self, "kl_warmup_steps", "must be >= 0")


class VAE(VariationalModel):
    name = "vae"
    description = "Variational autoencoder (Kingma & Welling 2014) with analytic KL and KL warm-up"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        self.encoder = build_encoder(config, self.input_shape)
        self.posterior = nn.Linear(self.encoder.feature_dim, 2 * config.latent_dim)
        self.decoder = build_decoder(config, self.input_shape, config.latent_dim)
        self.likelihood = DecoderLikelihood(config.likelihood, self.input_shape[0], config.gaussian_std)

    def kl_weight(self) -> float:
        """Weight on the KL term in the training loss (the ELBO itself always uses 1)."""
        return linear_warmup(self.training_step, self.config.kl_warmup_steps)

    def encode(self, x: torch.Tensor):
        """Posterior parameters (mu, logvar), each B x latent_dim."""
        mu, logvar = self.posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z))

    def loss(self, batch):
        x = batch["image"]
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        log_px = self.likelihood.log_prob(x, self.decoder(z))
        kl = gaussian_kl(mu, logvar)
        recon = -log_px.mean()
        kl_mean = kl.mean()
        return {
            "loss": recon + self.kl_weight() * kl_mean,
            "recon": recon,
            "kl": kl_mean,
            "elbo": (log_px - kl).mean(),
        }

    def log_importance_weights(self, x, num_samples, labels=None):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        params = self.decoder(z.flatten(0, 1))
        log_px = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), params).view(num_samples, -1)
        return log_px + log_standard_normal(z) - log_normal(z, mu, logvar)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        return self.decode(self._prior_noise(n, self.config.latent_dim, generator, temperature))
