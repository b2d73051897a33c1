"""Denoising autoencoder (Vincent et al., "Extracting and Composing Robust Features with Denoising
Autoencoders", ICML 2008; "Stacked Denoising Autoencoders", JMLR 2010).

An autoencoder that sees a corrupted input (Gaussian noise, masking or salt-and-pepper) and is
trained to reconstruct the clean one. Not generative: it denoises, embeds and scores, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vaemodels.ae import AE, AEConfig
from vaemodels.common import _require, randn_like

CORRUPTIONS = ("gaussian", "masking", "salt_and_pepper")


@dataclass(frozen=True)
class DAEConfig(AEConfig):
    corruption: str = "masking"  # "gaussian" (added noise), "masking" (pixels to 0), "salt_and_pepper" (to 0 or 1)
    noise_std: float = 0.3  # std of the additive noise for "gaussian" (Vincent et al. 2010 use 0.1-0.5)
    corruption_fraction: float = 0.25  # fraction of pixels hit by "masking" / "salt_and_pepper" (25% in the paper)

    def _check(self) -> None:
        super()._check()
        _require(self.corruption in CORRUPTIONS, self, "corruption", f"must be one of {CORRUPTIONS}")
        _require(self.noise_std >= 0, self, "noise_std", "must be >= 0")
        # a fraction of 1 destroys every pixel: there would be nothing left to denoise from
        _require(0 <= self.corruption_fraction < 1, self, "corruption_fraction", "must be in [0, 1)")


def _uniform_like(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) noise shaped like t; drawn on the generator's device (as `randn_like`), then moved."""
    if generator is None:
        return torch.rand_like(t)
    return torch.rand(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)


class DAE(AE):
    name = "dae"
    description = "Denoising autoencoder (Vincent et al. 2008): reconstructs clean images from corrupted ones"
    config_class = DAEConfig

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The configured corruption of x (same generator seed -> same corruption), still in [0, 1]."""
        config = self.config
        if config.corruption == "gaussian":
            # clipped so a corrupted image is still a valid image (and a valid BCE input)
            return (x + config.noise_std * randn_like(x, generator)).clamp(0.0, 1.0)
        hit = _uniform_like(x, generator) < config.corruption_fraction
        if config.corruption == "masking":
            return x.masked_fill(hit, 0.0)
        # salt and pepper: each hit pixel goes to 0 or 1 with equal probability
        salt = (_uniform_like(x, generator) < 0.5).to(x.dtype)
        return torch.where(hit, salt, x)

    def loss(self, batch):
        x = batch["image"]
        # the target is the clean x: learning to undo the corruption is what makes the features robust
        recon = self.reconstruction_error(x, self.decoder(self.encode(self.corrupt(x)))).mean()
        return {"loss": recon, "recon": recon}

    @torch.no_grad()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """Best guess of the clean image behind a noisy x, in [0, 1]."""
        return self.reconstruct(x)
