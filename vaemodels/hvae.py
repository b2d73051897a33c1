"""Hierarchical VAE in the Ladder VAE style (Sønderby et al., "Ladder Variational Autoencoders",
NeurIPS 2016): a bottom-up deterministic pass, a top-down generative path
p(z_L) p(z_{L-1}|z_L) ... p(x|z_1), and posteriors that merge the two by precision weighting.
KL is analytic per layer against the top-down prior, with linear KL warm-up. Dense blocks sit
between the stochastic layers; the shared backbones sit at the pixel end. Not an NVAE-style deep model.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    reparameterize,
)


@dataclass(frozen=True)
class HVAEConfig(ModelConfig):
    lower_latent_dims: tuple[int, ...] = (32,)  # sizes of z_1..z_{L-1}, bottom (next to x) first; latent_dim is z_L
    kl_warmup_steps: int = 0  # steps over which the KL weight rises linearly from 0 to 1 (0 = off)

    def __post_init__(self) -> None:
        # JSON gives lists; keep the config hashable like conv_channels.
        if isinstance(self.lower_latent_dims, list):
            object.__setattr__(self, "lower_latent_dims", tuple(self.lower_latent_dims))
        super().__post_init__()

    def _check(self) -> None:
        super()._check()
        dims = self.lower_latent_dims
        _require(
            isinstance(dims, tuple) and len(dims) >= 1
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims),
            self, "lower_latent_dims", "must be a non-empty list of positive ints (one per layer below the top)",
        )
        _require(self.kl_warmup_steps >= 0, self, "kl_warmup_steps", "must be >= 0")

    @property
    def latent_dims(self) -> tuple[int, ...]:
        """Every stochastic layer's size, bottom first: (z_1, ..., z_L)."""
        return (*self.lower_latent_dims, self.latent_dim)


def precision_weighted(mu_a, logvar_a, mu_b, logvar_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Product of two Gaussians (Sønderby et al. eq. 18-19): precisions add, means weight by precision."""
    # sigmoid(logvar_b - logvar_a) = prec_a / (prec_a + prec_b), written so extreme variances don't overflow
    weight_a = torch.sigmoid(logvar_b - logvar_a)
    mu = weight_a * mu_a + (1.0 - weight_a) * mu_b
    logvar = -torch.logaddexp(-logvar_a, -logvar_b)
    return mu, logvar


def _split(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = params.chunk(2, dim=1)
    return mu, logvar.clamp(-12.0, 8.0)  # same range as the VAE: keeps exp(logvar) finite either way


class HVAE(VariationalModel):
    name = "hvae"
    description = "Hierarchical (Ladder) VAE (Sønderby et al. 2016): top-down priors, precision-weighted posteriors"
    config_class = HVAEConfig

    def __init__(self, config: HVAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        dims = config.latent_dims
        width = config.dense_width
        # Bottom-up: d_1 = backbone(x), d_l = block(d_{l-1}); each d_l has a head giving x's own
        # estimate (mu_hat_l, logvar_hat_l) of layer l.
        self.encoder = build_encoder(config, self.input_shape)
        self.bottom_up = nn.ModuleList(
            nn.Sequential(nn.Linear(self.encoder.feature_dim if i == 0 else width, width), nn.ReLU())
            for i in range(len(dims) - 1)
        )
        self.bottom_up_heads = nn.ModuleList(
            nn.Linear(self.encoder.feature_dim if i == 0 else width, 2 * d) for i, d in enumerate(dims)
        )
        # Top-down: top_down[i] maps z_{i+2} to the parameters of p(z_{i+1} | z_{i+2}) (1-based layers).
        self.top_down = nn.ModuleList(
            nn.Sequential(nn.Linear(dims[i + 1], width), nn.ReLU(), nn.Linear(width, 2 * dims[i]))
            for i in range(len(dims) - 1)
        )
        self.decoder = build_decoder(config, self.input_shape, dims[0])
        self.likelihood = DecoderLikelihood(config.likelihood, self.input_shape[0], config.gaussian_std)

    def kl_weight(self) -> float:
        """Weight on the KL terms in the training loss (the ELBO itself always uses 1)."""
        return linear_warmup(self.training_step, self.config.kl_warmup_steps)

    # -- the two passes ------------------------------------------------------------------------
    def _bottom_up(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(mu_hat, logvar_hat) per layer, bottom first: what x alone says about each z_l."""
        d = self.encoder(x)
        estimates = [_split(self.bottom_up_heads[0](d))]
        for block, head in zip(self.bottom_up, self.bottom_up_heads[1:]):
            d = block(d)
            estimates.append(_split(head(d)))
        return estimates

    def _prior(self, i: int, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of p(z_{i+1} | z_{i+2}), layers 1-based, i the 0-based index of the lower one."""
        return _split(self.top_down[i](z_above))

    def _posterior(self, estimates, sample: bool = True) -> list[tuple[torch.Tensor, ...]]:
        """Top-down inference: per layer, bottom first, (z, mu_q, logvar_q, mu_p, logvar_p).

        The top posterior is the bottom-up estimate alone and its prior is N(0, I); every lower
        posterior merges the bottom-up estimate with the top-down prior given the z drawn above.
        `sample=False` follows the posterior means instead of drawing.
        """
        layers = []
        z = None
        for i in reversed(range(len(estimates))):
            mu_hat, logvar_hat = estimates[i]
            if z is None:
                mu_p, logvar_p = torch.zeros_like(mu_hat), torch.zeros_like(logvar_hat)
                mu_q, logvar_q = mu_hat, logvar_hat
            else:
                mu_p, logvar_p = self._prior(i, z)
                mu_q, logvar_q = precision_weighted(mu_hat, logvar_hat, mu_p, logvar_p)
            z = reparameterize(mu_q, logvar_q) if sample else mu_q
            layers.append((z, mu_q, logvar_q, mu_p, logvar_p))
        return layers[::-1]

    # -- the interface -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        """Posterior parameters (mu, logvar) of the TOP layer z_L, each B x latent_dim.

        q(z_L|x) depends on x only, so this is exact; the lower layers' posteriors depend on the
        z drawn above them and are internal to `loss`/`log_importance_weights`.
        """
        return self._bottom_up(x)[-1]

    def decode(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        """Top-layer code -> mean image, following the prior means down through the lower layers."""
        for i in reversed(range(len(self.top_down))):
            z = self._prior(i, z)[0]
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """Decode the posterior means of every layer; decode(embed(x)) would drop what the lower layers carry."""
        z1 = self._posterior(self._bottom_up(x), sample=False)[0][0]
        return self.likelihood.mean(self.decoder(z1))

    def loss(self, batch):
        x = batch["image"]
        layers = self._posterior(self._bottom_up(x))
        log_px = self.likelihood.log_prob(x, self.decoder(layers[0][0]))
        # Analytic KL per layer given the z sampled above it: an unbiased estimate of that layer's KL.
        kls = [gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p) for _, mu_q, logvar_q, mu_p, logvar_p in layers]
        kl = torch.stack(kls).sum(0)
        recon = -log_px.mean()
        kl_mean = kl.mean()
        out = {
            "loss": recon + self.kl_weight() * kl_mean,
            "recon": recon,
            "kl": kl_mean,
            "elbo": (log_px - kl).mean(),
        }
        out.update({f"kl_z{layer + 1}": k.mean() for layer, k in enumerate(kls)})
        return out

    def log_importance_weights(self, x, num_samples, labels=None):
        # One bottom-up pass, then num_samples top-down draws per image (sample-major, like x.repeat).
        estimates = [(mu.repeat(num_samples, 1), logvar.repeat(num_samples, 1)) for mu, logvar in self._bottom_up(x)]
        layers = self._posterior(estimates)
        log_w = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), self.decoder(layers[0][0]))
        for z, mu_q, logvar_q, mu_p, logvar_p in layers:
            log_w = log_w + log_normal(z, mu_p, logvar_p) - log_normal(z, mu_q, logvar_q)
        return log_w.view(num_samples, -1)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        return self.sample_with_latent(n, labels, generator, temperature)[0]

    @torch.no_grad()
    def sample_with_latent(self, n, labels=None, generator=None, temperature=1.0):
        """(images, top-layer z): ancestral sampling through every layer, not decode(z_top)."""
        dims = self.config.latent_dims
        top = z = self._prior_noise(n, dims[-1], generator, temperature)
        for i in reversed(range(len(dims) - 1)):
            mu_p, logvar_p = self._prior(i, z)
            z = mu_p + torch.exp(0.5 * logvar_p) * self._prior_noise(n, dims[i], generator, temperature)
        return self.likelihood.mean(self.decoder(z)), top
