"""Tabular VAE in the TVAE style (Xu, Skoularidou, Cuesta-Infante & Veeramachaneni, "Modeling Tabular
Data using Conditional GAN", NeurIPS 2019, section 4 and appendix: TVAE), conditioned on the label column.

A row arrives encoded by the dataset's column transformer (pipelines/data/table_transform.py), laid out
as `column_layout` says: a continuous column is its mode-specific normalised value alpha in [-1, 1]
(one Gaussian per column, learned sigma, decoded through tanh) followed by a one-hot over its modes
(plus a "missing" slot when the column has nulls); a categorical or boolean column is a one-hot over its
categories (plus "missing"). Each one-hot group is a softmax head with cross-entropy. As in the paper
the reconstruction term is weighted by `loss_factor` (2). The label conditions encoder and decoder
(one-hot) and, by default, a learned prior p(z|y) per class (as in cvae.py), so `--per-class` draws
rows of a rare class where that class's codes live. The model is built from the table spec (the
manifest's `table` section), which it saves in its config.json: the transformer travels with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vaemodels.common import (ConfigError, ModelConfig, VariationalModel, _require, gaussian_kl_between,
                              linear_warmup, log_normal, one_hot)

COLUMN_KINDS = ("continuous", "categorical", "boolean")
LOG_2PI = math.log(2.0 * math.pi)


def column_layout(columns: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """The encoded row's spans in order: ("alpha", start, 1) or ("softmax", start, width), per column.
    The one definition of the layout: the transformer writes it, the model reads it."""
    spans, start = [], 0
    for column in columns:
        missing = 1 if column.get("nullable") else 0
        if column["kind"] == "continuous":
            spans.append(("alpha", start, 1))
            width = len(column["modes"]["means"]) + missing
            spans.append(("softmax", start + 1, width))
            start += 1 + width
        else:
            width = len(column["categories"]) + missing
            spans.append(("softmax", start, width))
            start += width
    return spans


def check_table_spec(spec: Any) -> dict[str, Any]:
    """A table spec as the model needs it; ConfigError names what is wrong."""
    if not isinstance(spec, dict) or not isinstance(spec.get("columns"), list) or not spec["columns"]:
        raise ConfigError("a table model needs the dataset's table spec (a dict with a non-empty 'columns' list), "
                          f"got {type(spec).__name__}")
    for column in spec["columns"]:
        if column.get("kind") not in COLUMN_KINDS:
            raise ConfigError(f"table column {column.get('name')!r} has kind {column.get('kind')!r}; "
                              f"known kinds: {', '.join(COLUMN_KINDS)}")
        if column["kind"] == "continuous" and not column.get("modes", {}).get("means"):
            raise ConfigError(f"continuous column {column['name']!r} has no modes")
        if column["kind"] != "continuous" and not column.get("categories"):
            raise ConfigError(f"column {column['name']!r} has no categories")
    return spec


@dataclass(frozen=True)
class TVAEConfig(ModelConfig):
    latent_dim: int = 128  # TVAE's embedding_dim
    hidden_dim: int = 128  # width of the encoder's and decoder's hidden layers (TVAE: 128, 128)
    mlp_layers: int = 2  # hidden layers in the encoder and in the decoder
    beta: float = 1.0  # KL weight in the training loss (tune searches it)
    loss_factor: float = 2.0  # weight on the reconstruction term (TVAE's loss_factor)
    kl_warmup_steps: int = 0  # steps over which the KL weight rises linearly from 0 to beta (0 = off)
    prior: str = "learned"  # p(z|y): "learned" N(mu_y, sigma_y^2) per class, or "standard" N(0, I)
    # backbone / conv_channels / likelihood / gaussian_std are image fields: a table model ignores them

    def _check(self) -> None:
        super()._check()
        _require(self.beta >= 0, self, "beta", "must be >= 0")
        _require(self.loss_factor > 0, self, "loss_factor", "must be > 0")
        _require(self.kl_warmup_steps >= 0, self, "kl_warmup_steps", "must be >= 0")
        _require(self.prior in ("learned", "standard"), self, "prior", "must be 'learned' or 'standard'")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class TVAE(VariationalModel):
    name = "tvae"
    description = "Tabular VAE (Xu et al. 2019, TVAE): mode-specific normalisation, softmax heads, label-conditional"
    config_class = TVAEConfig
    is_conditional = True
    modality = "table"
    input_key = "row"

    def __init__(self, config: TVAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        width, layers = config.hidden_dim, config.mlp_layers
        dim, k = self.input_shape[0], num_classes
        self.encoder = _mlp([dim + k] + [width] * layers + [2 * config.latent_dim])
        self.decoder = _mlp([config.latent_dim + k] + [width] * layers + [dim])
        alphas = [start for kind, start, _ in self.spans if kind == "alpha"]
        self.register_buffer("alpha_index", torch.tensor(alphas, dtype=torch.long), persistent=False)
        # sigma in (0.01, 1) per continuous column (TVAE clamps it to [0.01, 1]); starts at 0.1
        self.sigma_logit = nn.Parameter(torch.full((len(alphas),), math.log(0.09 / 0.90)))
        if config.prior == "learned":
            self.class_prior = nn.Embedding(k, 2 * config.latent_dim)
            nn.init.zeros_(self.class_prior.weight)

    # -- what the model is built for ----------------------------------------------------------
    @classmethod
    def prepare_input(cls, input_shape: Any) -> Any:
        return input_shape  # the table spec dict, checked in _checked_input

    def _checked_input(self, input_shape: Any) -> tuple[int]:
        self.table_spec = check_table_spec(input_shape)
        self.spans = column_layout(self.table_spec["columns"])
        _, start, width = self.spans[-1]
        return (start + width,)

    def input_spec(self) -> dict[str, Any]:
        return self.table_spec

    # -- the networks ---------------------------------------------------------------------------
    def kl_weight(self) -> float:
        return self.config.beta * linear_warmup(self.training_step, self.config.kl_warmup_steps)

    def sigmas(self) -> torch.Tensor:
        return 0.01 + 0.99 * torch.sigmoid(self.sigma_logit)

    def _posterior(self, x: torch.Tensor, labels: torch.Tensor):
        mu, logvar = self.encoder(torch.cat([x, one_hot(labels, self.num_classes)], 1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _prior(self, labels: torch.Tensor):
        if self.config.prior == "standard":
            zeros = torch.zeros(len(labels), self.config.latent_dim, device=labels.device)
            return zeros, zeros
        mu, logvar = self.class_prior(labels).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _decoder_out(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, one_hot(labels, self.num_classes)], 1))

    def _log_px(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per row in nats: Gaussian alphas around tanh(out) plus log-softmax of each one-hot group.
        An all-zero group (a category the transformer did not know) adds nothing."""
        sigma = self.sigmas()
        alpha, mean = x[:, self.alpha_index], torch.tanh(out[:, self.alpha_index])
        log_p = (-0.5 * ((alpha - mean) / sigma) ** 2 - sigma.log() - 0.5 * LOG_2PI).sum(1)
        for kind, start, width in self.spans:
            if kind == "softmax":
                log_p = log_p + (x[:, start:start + width] * F.log_softmax(out[:, start:start + width], 1)).sum(1)
        return log_p

    def _mean(self, out: torch.Tensor) -> torch.Tensor:
        mean = out.clone()
        for kind, start, width in self.spans:
            part = out[:, start:start + width]
            mean[:, start:start + width] = torch.tanh(part) if kind == "alpha" else F.softmax(part, 1)
        return mean

    def _batch_labels(self, batch) -> torch.Tensor:
        labels = batch.get("label")
        if labels is None or bool((torch.as_tensor(labels) < 0).any()):
            raise ValueError(f"model {self.name!r} trains on labelled rows only: every row needs its label")
        return self._check_labels(labels, batch[self.input_key].shape[0])

    # -- the interface ------------------------------------------------------------------------
    def encode(self, x, labels=None):
        return self._posterior(x, self._check_labels(labels, x.shape[0]))

    def decode(self, z, labels=None):
        """The decoder's mean row: tanh(alpha) and the softmax probabilities of every one-hot group."""
        return self._mean(self._decoder_out(z, self._check_labels(labels, z.shape[0])))

    def loss(self, batch):
        x = batch[self.input_key]
        labels = self._batch_labels(batch)
        mu, logvar = self._posterior(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        log_px = self._log_px(x, self._decoder_out(z, labels))
        kl = gaussian_kl_between(mu, logvar, *self._prior(labels))
        recon, kl_mean = -log_px.mean(), kl.mean()
        return {"loss": self.config.loss_factor * recon + self.kl_weight() * kl_mean, "recon": recon,
                "kl": kl_mean, "elbo": (log_px - kl).mean()}

    def log_importance_weights(self, x, num_samples, labels=None):
        labels = self._check_labels(labels, x.shape[0])
        mu, logvar = self._posterior(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        out = self._decoder_out(z.flatten(0, 1), labels.repeat(num_samples))
        log_px = self._log_px(x.repeat(num_samples, 1), out).view(num_samples, -1)
        prior_mu, prior_logvar = self._prior(labels)
        return log_px + log_normal(z, prior_mu, prior_logvar) - log_normal(z, mu, logvar)

    @torch.no_grad()
    def anomaly_score(self, x):
        """-log p(x) with the class marginalised out under a uniform p(y) (as cvae.py does)."""
        per_class = [self.elbo(x, torch.full((x.shape[0],), y, dtype=torch.long, device=x.device), num_samples=10)
                     for y in range(self.num_classes)]
        return -(torch.logsumexp(torch.stack(per_class), 0) - math.log(self.num_classes))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        return self.sample_with_latent(n, labels, generator, temperature)[0]

    @torch.no_grad()
    def sample_with_latent(self, n, labels=None, generator=None, temperature=1.0):
        """(rows, z): z from the class's prior, then a draw from p(x|z, y) itself, as TVAE samples: each
        alpha is tanh(mean) plus its sigma times noise, each one-hot group one category drawn from its
        softmax. Every draw comes from `generator` on the CPU, so the rows do not depend on the device."""
        labels = self._check_labels(labels, n).to(self.device)
        mu, logvar = self._prior(labels)
        z = mu + torch.exp(0.5 * logvar) * self._prior_noise(n, self.config.latent_dim, generator, temperature)
        mean = self._mean(self._decoder_out(z, labels)).float().cpu()
        rows = torch.zeros_like(mean)
        noise = torch.randn(n, len(self.alpha_index), generator=generator)
        rows[:, self.alpha_index.cpu()] = (mean[:, self.alpha_index.cpu()] + self.sigmas().cpu() * noise).clamp(-1, 1)
        for kind, start, width in self.spans:
            if kind == "softmax" and n:
                pick = torch.multinomial(mean[:, start:start + width].clamp_min(1e-12), 1, generator=generator)
                rows[:, start:start + width] = F.one_hot(pick[:, 0], width).float()
        return rows.to(self.device), z
