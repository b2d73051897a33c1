"""Semi-supervised VAE, the M2 model of Kingma, Rezende, Mohamed & Welling, "Semi-Supervised
Learning with Deep Generative Models" (NeurIPS 2014): p(x|y,z) p(y) p(z) with a classifier q(y|x)
and posterior q(z|x,y). One batch mixes labelled and unlabelled images (label -1); unlabelled
ones sum the bound over every class, weighted by the classifier. Not the stacked M1+M2 model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaemodels.common import (
    ConfigError,
    DecoderLikelihood,
    ModelConfig,
    VariationalModel,
    _require,
    build_decoder,
    build_encoder,
    gaussian_kl,
    log_normal,
    log_standard_normal,
    one_hot,
    reparameterize,
)


@dataclass(frozen=True)
class SSVAEConfig(ModelConfig):
    # α of the paper per labelled sample, against the per-sample -ELBO. The paper's α = 0.1·N
    # (N = all training images) comes to 0.1 · N / N_labelled here: 50 for 100 labels of 50k MNIST.
    classifier_weight: float = 50.0  # weight on each labelled sample's classification cross-entropy

    def _check(self) -> None:
        super()._check()
        _require(self.classifier_weight >= 0, self, "classifier_weight", "must be >= 0")


class SSVAE(VariationalModel):
    name = "ssvae"
    description = "Semi-supervised VAE M2 (Kingma et al. 2014): generative model and classifier from partly labelled data"
    config_class = SSVAEConfig
    is_conditional = True

    def __init__(self, config: SSVAEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        if num_classes < 2:
            raise ConfigError(f"model {self.name!r} needs num_classes >= 2, got {num_classes!r}")
        # the paper uses separate networks for q(y|x) and q(z|x,y); sharing a trunk would let the
        # classification loss pull the posterior's features around
        classifier_trunk = build_encoder(config, self.input_shape)
        self.classifier = nn.Sequential(classifier_trunk, nn.Linear(classifier_trunk.feature_dim, num_classes))
        self.encoder = build_encoder(config, self.input_shape)
        self.posterior = nn.Linear(self.encoder.feature_dim + num_classes, 2 * config.latent_dim)
        self.decoder = build_decoder(config, self.input_shape, config.latent_dim + num_classes)
        self.likelihood = DecoderLikelihood(config.likelihood, self.input_shape[0], config.gaussian_std)

    # -- the classifier q(y|x) ----------------------------------------------------------------
    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities q(y|x), B x num_classes."""
        return F.softmax(self.classifier(x), dim=1)

    def _labels_or_guess(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Given labels where known; the classifier's argmax where labels is None or -1 (unlabelled)."""
        n = x.shape[0]
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=x.device)
            if labels.shape != (n,) or (labels >= 0).all():
                return self._check_labels(labels, n)
        with torch.no_grad():
            guess = self.classifier(x).argmax(1)
        return guess if labels is None else self._check_labels(torch.where(labels < 0, guess, labels), n)

    # -- q(z|x,y) and p(x|y,z) ----------------------------------------------------------------
    def _posterior(self, features: torch.Tensor, labels: torch.Tensor):
        code = torch.cat([features, one_hot(labels, self.num_classes)], dim=1)
        mu, logvar = self.posterior(code).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _decoder_params(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, one_hot(labels, self.num_classes)], dim=1))

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """(mu, logvar) of q(z|x,y), each B x latent_dim; y = labels, or the classifier's guess
        where labels is None or -1, so `embed(x)` works on unlabelled data."""
        return self._posterior(self.encoder(x), self._labels_or_guess(x, labels))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.likelihood.mean(self._decoder_params(z, self._check_labels(labels, z.shape[0])))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean under the given labels, or the classifier's guess without them."""
        labels = self._labels_or_guess(x, labels)
        return self.decode(self.encode(x, labels)[0], labels)

    # -- training -----------------------------------------------------------------------------
    def loss(self, batch):
        """-ELBO over the batch plus `classifier_weight` x cross-entropy on its labelled part.

        kl holds both KL terms so that elbo = -(recon + kl) per sample: KL(q(z|x,y) || p(z)) plus
        KL(q(y|x) || p(y)), which is log K for a known label and log K - H(q(y|x)) otherwise.
        classifier_loss and accuracy are 0 on a batch without labels; `labelled` counts them so
        a logger can weight the two.
        """
        x = batch["image"]
        labels = batch.get("label")
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long)
        labels = labels.to(x.device)
        known = labels >= 0
        num_classes, batch_size = self.num_classes, x.shape[0]
        features = self.encoder(x)
        logits = self.classifier(x)

        # One decoder pass for everything: each labelled image once with its label, each
        # unlabelled image once per class (the paper enumerates y rather than sampling it).
        num_unlabelled = int((~known).sum())
        classes = torch.arange(num_classes, device=x.device)
        all_x = torch.cat([x[known], x[~known].repeat_interleave(num_classes, 0)])
        all_features = torch.cat([features[known], features[~known].repeat_interleave(num_classes, 0)])
        all_labels = torch.cat([labels[known], classes.repeat(num_unlabelled)])
        mu, logvar = self._posterior(all_features, all_labels)
        z = reparameterize(mu, logvar)
        recon = -self.likelihood.log_prob(all_x, self._decoder_params(z, all_labels))
        kl = gaussian_kl(mu, logvar) + math.log(num_classes)  # -log p(y) with a uniform p(y)

        # -U(x) = Σ_y q(y|x) (-L(x, y)) - H(q(y|x)); the classifier learns from this term too
        num_labelled = int(known.sum())
        log_q = F.log_softmax(logits[~known], dim=1)
        q = log_q.exp()
        recon_u = (q * recon[num_labelled:].view(num_unlabelled, num_classes)).sum(1)
        kl_u = (q * kl[num_labelled:].view(num_unlabelled, num_classes)).sum(1) + (q * log_q).sum(1)
        recon = torch.cat([recon[:num_labelled], recon_u])
        kl = torch.cat([kl[:num_labelled], kl_u])
        elbo = -(recon + kl)

        cross_entropy = F.cross_entropy(logits[known], labels[known], reduction="sum")
        zero = torch.zeros((), device=x.device)
        if num_labelled:
            accuracy = (logits[known].argmax(1) == labels[known]).float().mean()
        return {
            # normalised by the whole batch so the weight is per labelled sample (see the config)
            "loss": -elbo.mean() + self.config.classifier_weight * cross_entropy / batch_size,
            "recon": recon.mean(),
            "kl": kl.mean(),
            "elbo": elbo.mean(),
            "classifier_loss": cross_entropy.detach() / num_labelled if num_labelled else zero,
            "accuracy": accuracy if num_labelled else zero,
            "labelled": torch.tensor(float(num_labelled), device=x.device),
        }

    # -- likelihood ---------------------------------------------------------------------------
    def _conditional_log_weights(self, x, features, labels, num_samples):
        """log p(x|y,z) + log p(z) - log q(z|x,y) for z ~ q(z|x,y): shape (num_samples, N)."""
        mu, logvar = self._posterior(features, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        params = self._decoder_params(z.flatten(0, 1), labels.repeat(num_samples))
        log_px = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), params).view(num_samples, -1)
        return log_px + log_standard_normal(z) - log_normal(z, mu, logvar)

    def log_importance_weights(self, x, num_samples, labels=None):
        """With labels: weights for log p(x|y). Without: y is marginalised exactly, not through
        q(y|x): sample s weighs Σ_y p(y) p(x, z_sy|y) / q(z_sy|x,y) with z_sy ~ q(z|x,y), an
        unbiased estimate of p(x). Their IWAE average is logsumexp_y [log p(y) + IWAE log p(x|y)],
        and the mean of their logs is a bound at least as tight as U(x) (Jensen), which makes
        `elbo(x)` and `anomaly_score(x)` label-free."""
        features = self.encoder(x)
        if labels is not None:
            return self._conditional_log_weights(x, features, self._check_labels(labels, x.shape[0]), num_samples)
        num_classes = self.num_classes
        classes = torch.arange(num_classes, device=x.device).repeat(x.shape[0])
        log_w = self._conditional_log_weights(
            x.repeat_interleave(num_classes, 0), features.repeat_interleave(num_classes, 0), classes, num_samples
        ).view(num_samples, x.shape[0], num_classes)
        return torch.logsumexp(log_w, dim=2) - math.log(num_classes)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        """n images of the given classes (labels: n class ids, required)."""
        labels = self._check_labels(labels, n)
        return self.decode(self._prior_noise(n, self.config.latent_dim, generator, temperature), labels)
