"""Deterministic autoencoder (Hinton & Salakhutdinov, "Reducing the Dimensionality of Data with
Neural Networks", Science 2006): encoder -> code -> decoder, trained on reconstruction error alone.

The baseline every variational family is compared against. It has no prior over codes, so it
cannot sample new images; its anomaly score is the reconstruction error it was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaemodels.common import AutoEncoderModel, ModelConfig, _require, build_decoder, build_encoder

RECONSTRUCTION_LOSSES = ("bce", "mse")


@dataclass(frozen=True)
class AEConfig(ModelConfig):
    """`likelihood` and `gaussian_std` are unused: an autoencoder has no p(x|z), only a loss."""

    reconstruction_loss: str = "bce"  # "bce" (pixels as Bernoulli targets) or "mse" (squared error), summed over pixels

    def _check(self) -> None:
        super()._check()
        _require(self.reconstruction_loss in RECONSTRUCTION_LOSSES, self, "reconstruction_loss",
                 f"must be one of {RECONSTRUCTION_LOSSES}")


class AE(AutoEncoderModel):
    name = "ae"
    description = "Deterministic autoencoder (Hinton & Salakhutdinov 2006) with BCE or MSE reconstruction"
    config_class = AEConfig

    def __init__(self, config: AEConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        self.encoder = build_encoder(config, self.input_shape)
        self.to_code = nn.Linear(self.encoder.feature_dim, config.latent_dim)
        self.decoder = build_decoder(config, self.input_shape, config.latent_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code, B x latent_dim."""
        return self.to_code(self.encoder(x))

    def decode(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def reconstruction_error(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The configured loss between x and the decoder's logits, summed over pixels: one per sample."""
        if self.config.reconstruction_loss == "bce":
            # with logits, not on sigmoid outputs: stays finite when the decoder saturates
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        return (torch.sigmoid(logits) - x).pow(2).flatten(1).sum(1)

    def loss(self, batch):
        x = batch["image"]
        recon = self.reconstruction_error(x, self.decoder(self.encode(x))).mean()
        return {"loss": recon, "recon": recon}

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction error under the training loss; larger = more anomalous."""
        return self.reconstruction_error(x, self.decoder(self.encode(x)))
