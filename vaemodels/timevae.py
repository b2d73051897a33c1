"""TimeVAE (Desai, Freeman, Wang & Beaver, "TimeVAE: A Variational Auto-Encoder for Multivariate Time
Series Generation", 2021): 1-D convolutional encoder and decoder over fixed-length windows, plus the
paper's interpretable trend block (a low-degree polynomial in time per channel, its coefficients
decoded from z) added to the convolutional residual. `ctimevae` is the conditional variant: encoder,
decoder and a learned per-class prior p(z|y) see the one-hot label (as in cvae.py).

Inputs are series windows standardised per channel, shaped like a one-row image: B x C x 1 x T (what
the series reader yields), so training, tuning, registry and IWAE code treat them like any input.
p(x|z) is Gaussian with the decoder output as its mean (no sigmoid: values are unbounded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import nn

from vaemodels.common import (ModelConfig, VariationalModel, _require, gaussian_kl_between, linear_warmup,
                              log_normal, one_hot, reparameterize)
from vaemodels.distributions import LOG_2PI


@dataclass(frozen=True)
class TimeVAEConfig(ModelConfig):
    # the shared fields keep their meaning where it applies: latent_dim, hidden_dim (0 = 256),
    # conv_channels (channels of the stride-2 Conv1d stages), gaussian_std; the others are fixed below
    backbone: str = "conv"  # always "conv": 1-D convolutions over time (the image backbones do not apply)
    likelihood: str = "gaussian_learned"  # "gaussian_learned" (a std per channel, learned) or "gaussian" (fixed)
    gaussian_std: float = 0.3  # fixed std, and the learned one's start, in standardised units
    kl_warmup_steps: int = 0  # steps over which the KL weight rises linearly from 0 to beta (0 = off)
    beta: float = 1.0  # KL weight in the training loss (the ELBO itself always uses 1)
    trend_degree: int = 2  # degree of the trend polynomial (0 = a level only; -1 = no trend block)
    kernel_size: int = 5  # Conv1d kernel along time (odd)
    prior: str = "learned"  # ctimevae: p(z|y) "learned" N(mu_y, sigma_y^2) per class, or "standard" N(0, I)

    def _check(self) -> None:
        super()._check()
        _require(self.backbone == "conv", self, "backbone", "must be 'conv' (1-D convolutions over time)")
        _require(self.likelihood in ("gaussian", "gaussian_learned"), self, "likelihood",
                 "must be 'gaussian' or 'gaussian_learned' (series values are unbounded)")
        _require(self.kl_warmup_steps >= 0, self, "kl_warmup_steps", "must be >= 0")
        _require(self.beta >= 0, self, "beta", "must be >= 0")
        _require(self.trend_degree >= -1, self, "trend_degree", "must be >= -1")
        _require(self.kernel_size >= 1 and self.kernel_size % 2 == 1, self, "kernel_size", "must be odd and >= 1")
        _require(self.prior in ("learned", "standard"), self, "prior", "must be 'learned' or 'standard'")


def stage_lengths(length: int, stages: int) -> list[int]:
    """Lengths after each stride-2 stage; stops before a stage would go below 4 steps (may be empty)."""
    out, cur = [], length
    for _ in range(stages):
        if cur // 2 < 4:
            break
        cur = (cur + 1) // 2
        out.append(cur)
    return out


class SeriesGaussian(nn.Module):
    """p(x|z) = N(mean, std_c^2) per channel c, the mean decoded as it is (no squashing)."""

    def __init__(self, kind: str, channels: int, std: float):
        super().__init__()
        log_std = torch.full((channels,), math.log(std))
        if kind == "gaussian_learned":
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std, persistent=False)

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        log_std = self.log_std.clamp(-5.0, 3.0).view(1, -1, 1, 1)
        return (-0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI).flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def tempered_mean(self, mean: torch.Tensor, pixel_temperature: float) -> torch.Tensor:
        return mean  # a tempered Gaussian keeps its mean


class TimeVAE(VariationalModel):
    name = "timevae"
    description = "TimeVAE (Desai et al. 2021): 1-D conv VAE with a trend block, for series windows"
    config_class = TimeVAEConfig
    modality = "series"  # windows C x 1 x T under the batch key "image" (input_key's default)

    def __init__(self, config: TimeVAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        channels, height, length = self.input_shape
        if height != 1:
            raise ValueError(f"{self.name} takes series windows shaped C x 1 x T, got {self.input_shape}")
        extra = num_classes if self.is_conditional else 0
        width, k = config.dense_width, config.kernel_size
        lengths = stage_lengths(length, len(config.conv_channels))
        strides = [2] * len(lengths)
        if not lengths:  # windows too short to halve: one stride-1 stage
            lengths, strides = [length], [1]
        convs, in_c = [], channels
        for c, stride in zip(config.conv_channels, strides):
            convs += [nn.Conv1d(in_c, c, k, stride=stride, padding=k // 2), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            in_c = c
        self.encoder = nn.Sequential(*convs, nn.Flatten(), nn.Linear(in_c * lengths[-1], width), nn.SiLU())
        self.posterior = nn.Linear(width + extra, 2 * config.latent_dim)
        code = config.latent_dim + extra
        # decoder: dense -> (C_last, L_last) -> transposed convs back up the encoder's lengths -> C channels
        self.stem = nn.Sequential(nn.Linear(code, width), nn.SiLU(), nn.Linear(width, in_c * lengths[-1]))
        self.stem_shape = (in_c, lengths[-1])
        ups = []
        targets = (lengths[:-1][::-1] + [length]) if strides[0] == 2 else []
        outs = (list(config.conv_channels[:len(lengths)])[:-1][::-1] + [config.conv_channels[0]])[:len(targets)]
        cur = lengths[-1]
        for target, out_c in zip(targets, outs):
            ups += [nn.ConvTranspose1d(in_c, out_c, 4, stride=2, padding=1, output_padding=0),
                    nn.GroupNorm(min(8, out_c), out_c), nn.SiLU()]
            # 2 * cur may overshoot the target by one (odd lengths): a crop in forward fixes it
            in_c, cur = out_c, target
        self.ups = nn.Sequential(*ups)
        self.head = nn.Conv1d(in_c, channels, k, padding=k // 2)
        self.targets = targets
        # trend block: z -> polynomial coefficients per channel, evaluated on t in [0, 1]
        self.trend = None
        if config.trend_degree >= 0:
            self.trend = nn.Linear(code, channels * (config.trend_degree + 1))
            powers = torch.linspace(0.0, 1.0, length)[None, :] ** torch.arange(config.trend_degree + 1)[:, None]
            self.register_buffer("time_powers", powers, persistent=False)  # (degree + 1) x T
        self.likelihood = SeriesGaussian(config.likelihood, channels, config.gaussian_std)

    def kl_weight(self) -> float:
        return self.config.beta * linear_warmup(self.training_step, self.config.kl_warmup_steps)

    # -- the networks; `extra` is the one-hot label for the conditional variant, else None -----------
    def _posterior(self, x: torch.Tensor, extra: torch.Tensor | None):
        features = self.encoder(x.flatten(2))
        if extra is not None:
            features = torch.cat([features, extra], dim=1)
        mu, logvar = self.posterior(features).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _decoder_mean(self, z: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        code = z if extra is None else torch.cat([z, extra], dim=1)
        h = self.stem(code).view(len(code), *self.stem_shape)
        for i in range(0, len(self.ups), 3):
            h = self.ups[i + 2](self.ups[i + 1](self.ups[i](h)))
            h = h[..., :self.targets[i // 3]]
        out = self.head(h)
        if self.trend is not None:
            coefficients = self.trend(code).view(len(code), self.input_shape[0], -1)
            out = out + coefficients @ self.time_powers
        return out[:, :, None, :]

    def _extra(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def _prior(self, n: int, labels: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(n, self.config.latent_dim, device=device)
        return zeros, zeros

    def _batch_labels(self, batch) -> torch.Tensor | None:
        return None

    # -- the interface ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """Posterior parameters (mu, logvar), each B x latent_dim."""
        return self._posterior(x, self._extra(self._labels_for(labels, x.shape[0])))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean window B x C x 1 x T (standardised units)."""
        return self._decoder_mean(z, self._extra(self._labels_for(labels, z.shape[0])))

    def _labels_for(self, labels, n):
        return self._check_labels(labels, n) if self.is_conditional else None

    def loss(self, batch):
        x = batch["image"]
        labels = self._batch_labels(batch)
        extra = self._extra(labels)
        mu, logvar = self._posterior(x, extra)
        z = reparameterize(mu, logvar)
        log_px = self.likelihood.log_prob(x, self._decoder_mean(z, extra))
        kl = gaussian_kl_between(mu, logvar, *self._prior(len(x), labels, x.device))
        recon, kl_mean = -log_px.mean(), kl.mean()
        return {"loss": recon + self.kl_weight() * kl_mean, "recon": recon, "kl": kl_mean,
                "elbo": (log_px - kl).mean()}

    def log_importance_weights(self, x, num_samples, labels=None):
        labels = self._labels_for(labels, x.shape[0])
        extra = self._extra(labels)
        mu, logvar = self._posterior(x, extra)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        mean = self._decoder_mean(z.flatten(0, 1), None if extra is None else extra.repeat(num_samples, 1))
        log_px = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), mean).view(num_samples, -1)
        prior_mu, prior_logvar = self._prior(len(x), labels, x.device)
        return log_px + log_normal(z, prior_mu, prior_logvar) - log_normal(z, mu, logvar)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        return self.sample_with_latent(n, labels, generator, temperature)[0]

    @torch.no_grad()
    def sample_with_latent(self, n, labels=None, generator=None, temperature=1.0):
        """(windows, z): z from the prior (the class's own for ctimevae), scaled by the temperature."""
        labels = self._labels_for(labels, n)
        mu, logvar = self._prior(n, labels, self.device)
        z = mu + torch.exp(0.5 * logvar) * self._prior_noise(n, self.config.latent_dim, generator, temperature)
        return self._decoder_mean(z, self._extra(labels)), z


class ConditionalTimeVAE(TimeVAE):
    """TimeVAE conditioned on the class: the one-hot label enters the posterior, the decoder (stem and
    trend) and a learned prior p(z|y), so `sample(n, labels)` draws windows of the asked class."""

    name = "ctimevae"
    description = "Conditional TimeVAE: encoder, decoder and a per-class prior see the label (series windows)"
    is_conditional = True

    def __init__(self, config: TimeVAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        if config.prior == "learned":
            self.class_prior = nn.Embedding(num_classes, 2 * config.latent_dim)
            nn.init.zeros_(self.class_prior.weight)  # starts as N(0, I)

    def _extra(self, labels):
        return one_hot(labels, self.num_classes)

    def _prior(self, n, labels, device):
        if self.config.prior == "standard":
            return super()._prior(n, labels, device)
        mu, logvar = self.class_prior(labels).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _batch_labels(self, batch):
        labels = batch.get("label")
        if labels is None or bool((torch.as_tensor(labels) < 0).any()):
            raise ValueError(f"model {self.name!r} trains on labelled windows only")
        return self._check_labels(labels, batch["image"].shape[0])

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(x) with the class marginalised out under a uniform p(y) (as cvae does)."""
        per_class = [self.elbo(x, torch.full((len(x),), y, dtype=torch.long, device=x.device), num_samples=10)
                     for y in range(self.num_classes)]
        return -(torch.logsumexp(torch.stack(per_class), dim=0) - math.log(self.num_classes))
