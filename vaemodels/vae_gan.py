"""VAE-GAN (Larsen et al., "Autoencoding beyond pixels using a learned similarity metric", ICML 2016).

A VAE whose decoder doubles as a GAN generator: reconstructions are scored in the feature space of
a discriminator layer (Dis_l) rather than pixel by pixel, and a discriminator learns to tell data
from reconstructions and prior samples. Two optimizers (see `optimizer_losses`). The pixel ELBO is
still computed, reported and (weighted) trained, so numbers compare with the other families.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vaemodels.common import (
    DecoderLikelihood,
    ModelConfig,
    VariationalModel,
    _require,
    build_decoder,
    build_encoder,
    gaussian_kl,
    linear_warmup,
    log_normal,
    log_standard_normal,
    reparameterize,
)
from vaemodels.vae import VAEConfig


@dataclass(frozen=True)
class VAEGANConfig(VAEConfig):
    # Weights measured on mnist5k (3 epochs, FID against vae): with Larsen's unit weights and raw
    # features the feature term swamped the pixel likelihood (val ELBO -644, recall 0.13); with
    # normalised features, 0.1 on the feature term and 0.03 on the GAN term gave FID 2.15 against
    # vae's 2.65, while 0.3 / 0.1 gave 6.3. See BENCHMARKS.md (vae_gan vs vae on FID).
    recon_feature_weight: float = 0.1  # weight on the Dis_l feature-space reconstruction term (Larsen's L_llike)
    # Dis_l features have no fixed scale: the discriminator can grow them until the feature term
    # swamps the pixel likelihood (measured on mnist5k: 2 active units, -424 nats after 150 steps).
    # Layer-normalising both sides (no learned affine) pins each feature vector to unit scale.
    normalize_features: bool = True
    pixel_recon_weight: float = 1.0  # weight on the pixel log-likelihood; anchors training (Dis_l alone drifts)
    adversarial_weight: float = 0.03  # weight on the generator's GAN term (-log D(fake), ~1 nat per sample)
    real_label: float = 0.9  # target for real images in the discriminator loss; < 1 is one-sided label smoothing

    def _check(self) -> None:
        super()._check()
        _require(self.recon_feature_weight >= 0, self, "recon_feature_weight", "must be >= 0")
        _require(self.pixel_recon_weight >= 0, self, "pixel_recon_weight", "must be >= 0")
        _require(self.recon_feature_weight + self.pixel_recon_weight > 0, self, "pixel_recon_weight",
                 "must be > 0 when recon_feature_weight is 0 (nothing would train reconstruction)")
        _require(self.adversarial_weight >= 0, self, "adversarial_weight", "must be >= 0")
        _require(0.5 < self.real_label <= 1.0, self, "real_label", "must be in (0.5, 1]")


class Discriminator(nn.Module):
    """Real/fake classifier; its backbone output is the similarity feature Dis_l."""

    def __init__(self, config: ModelConfig, input_shape: tuple[int, int, int]):
        super().__init__()
        # Same backbone as the encoder (mlp or conv, sized from the image); Dis_l sits one dense
        # layer below the logit, so it is a learned representation rather than the decision itself.
        self.backbone = build_encoder(config, input_shape)
        width = self.backbone.feature_dim
        self.head = nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Dis_l features B x feature_dim, real/fake logits B)."""
        features = self.backbone(x)
        return features, self.head(features).squeeze(1)


class VAEGAN(VariationalModel):
    """Training contract: `loss` feeds only the "generator" group (encoder, decoder, likelihood)
    and `disc_loss` only the "discriminator" group, so a loop may backward their sum once and then
    step both optimizers without the two objectives leaking into each other. Every backward must
    come before any step: the generator's graph holds (detached views of) the discriminator weights."""

    name = "vae_gan"
    description = "VAE-GAN (Larsen et al. 2016): reconstruction in discriminator feature space plus a GAN loss"
    config_class = VAEGANConfig
    # Which entry of loss() each optimizer in param_groups() minimizes.
    optimizer_losses: ClassVar[dict[str, str]] = {"generator": "loss", "discriminator": "disc_loss"}

    def __init__(self, config: VAEGANConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        self.encoder = build_encoder(config, self.input_shape)
        self.posterior = nn.Linear(self.encoder.feature_dim, 2 * config.latent_dim)
        self.decoder = build_decoder(config, self.input_shape, config.latent_dim)
        self.likelihood = DecoderLikelihood(config.likelihood, self.input_shape[0], config.gaussian_std)
        self.discriminator = Discriminator(config, self.input_shape)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        disc = list(self.discriminator.parameters())
        disc_ids = {id(p) for p in disc}
        return {"generator": [p for p in self.parameters() if id(p) not in disc_ids], "discriminator": disc}

    def kl_weight(self) -> float:
        """Weight on the KL term in the training loss (the ELBO itself always uses 1)."""
        return linear_warmup(self.training_step, self.config.kl_warmup_steps)

    # Copied from vaemodels.vae.VAE.encode
    def encode(self, x: torch.Tensor):
        """Posterior parameters (mu, logvar), each B x latent_dim."""
        mu, logvar = self.posterior(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z))

    def _judged_by_frozen_discriminator(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator with detached weights: gradients reach x (so the generator learns from
        it) but never the discriminator's own parameters, whatever optimizer steps afterwards."""
        weights = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, weights, (x,))

    def loss(self, batch):
        x = batch["image"]
        n = x.shape[0]
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        params = self.decoder(z)
        log_px = self.likelihood.log_prob(x, params)
        kl = gaussian_kl(mu, logvar)
        x_tilde = self.likelihood.mean(params)
        # Fakes for the GAN game: reconstructions and prior samples (Larsen Alg. 1). Their code is
        # detached so that, as in the paper, the encoder learns from KL and reconstruction only.
        fakes = self.decode(torch.cat([z.detach(), torch.randn_like(z)]))

        features, logits = self._judged_by_frozen_discriminator(torch.cat([x, x_tilde, fakes]))
        real_features, recon_features = features[:n], features[n:2 * n]
        if self.config.normalize_features:
            real_features = F.layer_norm(real_features, real_features.shape[1:])
            recon_features = F.layer_norm(recon_features, recon_features.shape[1:])
        # p(Dis_l(x) | z) = N(Dis_l(x); Dis_l(x_tilde), I)   (Larsen eq. 8)
        recon = -log_normal(real_features, recon_features, torch.zeros_like(recon_features)).mean()
        # Non-saturating generator loss -log D(fake): strong gradients while the discriminator wins.
        fake_logits = logits[2 * n:]
        adv = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

        _, disc_logits = self.discriminator(torch.cat([x, fakes.detach()]))
        real_logits, fake_logits = disc_logits[:n], disc_logits[n:]
        real_targets = torch.full_like(real_logits, self.config.real_label)
        disc_loss = (F.binary_cross_entropy_with_logits(real_logits, real_targets)
                     + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

        pixel_recon = -log_px.mean()
        kl_mean = kl.mean()
        cfg = self.config
        total = (cfg.recon_feature_weight * recon + cfg.pixel_recon_weight * pixel_recon
                 + self.kl_weight() * kl_mean + cfg.adversarial_weight * adv)
        return {
            "loss": total,
            "disc_loss": disc_loss,
            "recon": recon,
            "pixel_recon": pixel_recon,
            "kl": kl_mean,
            "elbo": (log_px - kl).mean(),
            "adv": adv,
        }

    # Copied from vaemodels.vae.VAE.log_importance_weights
    def log_importance_weights(self, x, num_samples, labels=None):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        params = self.decoder(z.flatten(0, 1))
        log_px = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), params).view(num_samples, -1)
        return log_px + log_standard_normal(z) - log_normal(z, mu, logvar)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        return self.decode(self._prior_noise(n, self.config.latent_dim, generator, temperature))
