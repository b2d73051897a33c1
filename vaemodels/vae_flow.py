"""VAE with a normalizing-flow posterior: the Gaussian sample z0 ~ q0(z|x) is pushed through K
invertible steps, either planar flows (Rezende & Mohamed, "Variational Inference with Normalizing
Flows", ICML 2015) or inverse autoregressive flow (Kingma et al., "Improved Variational Inference
with Inverse Autoregressive Flow", NeurIPS 2016). The prior and decoder are those of `vae.VAE`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaemodels.common import (
    DecoderLikelihood,
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

FLOWS = ("planar", "iaf")

# Kingma et al. 2016 (Sec. 4): start the gate logits "sufficiently positive, close to +1 or +2" so
# each IAF step begins near the identity and only slowly learns to move z.
IAF_GATE_BIAS = 2.0


class PlanarFlow(nn.Module):
    """f(z) = z + û tanh(wᵀz + b), with (u, w, b) amortized: a linear head maps the encoder's
    features (the context) to per-sample parameters, which fits each image's posterior better
    than one global set. Without a context the head's bias alone acts as global parameters."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.dim = dim
        self.head = nn.Linear(context_dim, 2 * dim + 1)

    def flow_parameters(self, context: torch.Tensor | None = None):
        """(û, w, b) with wᵀû ≥ -1, the condition under which f is invertible (R&M 2015, App. A.1)."""
        raw = self.head(context) if context is not None else self.head.bias
        u, w, b = raw.split([self.dim, self.dim, 1], dim=-1)
        wu = (w * u).sum(-1, keepdim=True)
        # m(a) = -1 + softplus(a) maps wᵀu into (-1, inf); move u along w until wᵀû = m(wᵀu).
        u_hat = u + (F.softplus(wu) - 1.0 - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-8)
        return u_hat, w, b

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """z (..., D) -> (f(z), log|det ∂f/∂z|); parameters broadcast over leading sample dims."""
        u, w, b = self.flow_parameters(context)
        h = torch.tanh((z * w).sum(-1, keepdim=True) + b)
        z_new = z + u * h
        # det = 1 + ûᵀψ(z) with ψ = tanh'(·) w (matrix determinant lemma); it is > 0 because
        # wᵀû > -1 and tanh' ≤ 1; the clamp only guards float round-off near that boundary.
        det = 1.0 + (1.0 - h * h) * (w * u).sum(-1, keepdim=True)
        return z_new, det.clamp_min(1e-8).log().squeeze(-1)


class MaskedLinear(nn.Linear):
    """A dense layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al. 2015)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        # rebuilt from the config on construction, so it stays out of saved weights
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class IAFStep(nn.Module):
    """One IAF step: a MADE network gives (m, s) where output i sees only the z_j earlier in the
    ordering, then z' = σ z + (1 - σ) m with σ = sigmoid(s) (the numerically stable, LSTM-like
    update of Kingma et al. 2016, Alg. 1). The Jacobian is triangular with diagonal σ, so
    log|det| = Σ log σ. `reverse` flips the ordering; the model alternates it between steps."""

    def __init__(self, dim: int, hidden_dim: int, context_dim: int = 0, reverse: bool = False):
        super().__init__()
        self.dim = dim
        degrees = torch.arange(1, dim + 1)
        if reverse:
            degrees = degrees.flip(0)
        # hidden degrees cycle over 1..D-1 so every hidden unit can feed some output; with D = 1
        # the output masks are all zero and (m, s) depend on the context only, as they must.
        hidden_degrees = torch.arange(hidden_dim) % max(dim - 1, 1) + 1
        self.input = MaskedLinear(dim, hidden_dim, hidden_degrees[:, None] >= degrees[None, :])
        self.hidden = MaskedLinear(hidden_dim, hidden_dim, hidden_degrees[:, None] >= hidden_degrees[None, :])
        self.output = MaskedLinear(hidden_dim, 2 * dim, degrees.repeat(2)[:, None] > hidden_degrees[None, :])
        self.context = nn.Linear(context_dim, hidden_dim, bias=False) if context_dim > 0 else None
        with torch.no_grad():
            self.output.bias[dim:].fill_(IAF_GATE_BIAS)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """z (..., D), optional context h (B, context_dim) -> (z', log|det ∂z'/∂z|)."""
        hidden = self.input(z)
        if context is not None:
            if self.context is None:
                raise ValueError("this IAFStep was built with context_dim=0 and takes no context")
            # the context is the same for every z dimension, so it may enter unmasked
            hidden = hidden + self.context(context)
        hidden = F.elu(self.hidden(F.elu(hidden)))
        m, s = self.output(hidden).chunk(2, dim=-1)
        gate = torch.sigmoid(s)
        return gate * z + (1.0 - gate) * m, F.logsigmoid(s).sum(-1)


@dataclass(frozen=True)
class VAEFlowConfig(VAEConfig):
    flow: str = "planar"  # posterior flow: "planar" (Rezende & Mohamed 2015) or "iaf" (Kingma et al. 2016)
    flow_steps: int = 4  # number of flow steps K; 0 gives exactly the plain VAE
    iaf_hidden_dim: int = 64  # width of the two masked hidden layers in each IAF step's MADE network

    def _check(self) -> None:
        super()._check()
        _require(self.flow in FLOWS, self, "flow", f"must be one of {FLOWS}")
        _require(self.flow_steps >= 0, self, "flow_steps", "must be >= 0")
        _require(self.iaf_hidden_dim >= 1, self, "iaf_hidden_dim", "must be >= 1")


class VAEFlow(VariationalModel):
    name = "vae_flow"
    description = "VAE whose Gaussian posterior is refined by planar or inverse autoregressive flow steps"
    config_class = VAEFlowConfig

    def __init__(self, config: VAEFlowConfig, input_shape, num_classes=None):
        super().__init__(config, input_shape, num_classes)
        # same module names as VAE, so a VAE's weights load into a flow_steps=0 model unchanged
        self.encoder = build_encoder(config, self.input_shape)
        self.posterior = nn.Linear(self.encoder.feature_dim, 2 * config.latent_dim)
        self.decoder = build_decoder(config, self.input_shape, config.latent_dim)
        self.likelihood = DecoderLikelihood(config.likelihood, self.input_shape[0], config.gaussian_std)
        # both flows condition on the encoder features h: planar reads its parameters from them,
        # IAF adds them to its hidden layer (the "context" of Kingma et al. 2016)
        context_dim = self.encoder.feature_dim
        if config.flow == "planar":
            steps = [PlanarFlow(config.latent_dim, context_dim) for _ in range(config.flow_steps)]
        else:
            steps = [IAFStep(config.latent_dim, config.iaf_hidden_dim, context_dim, reverse=i % 2 == 1)
                     for i in range(config.flow_steps)]
        self.flows = nn.ModuleList(steps)

    def kl_weight(self) -> float:
        """Weight on the KL term in the training loss (the ELBO itself always uses 1)."""
        return linear_warmup(self.training_step, self.config.kl_warmup_steps)

    def encode(self, x: torch.Tensor):
        """(mu, logvar) of the base posterior q0(z0|x), each B x latent_dim, then the flows' context h."""
        features = self.encoder(x)
        mu, logvar = self.posterior(features).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0), features

    def flow(self, z0: torch.Tensor, context: torch.Tensor):
        """Push z0 (..., B, D) through every step: (z_K, Σ_k log|det ∂f_k/∂z|) with the sum per sample."""
        z, log_det = z0, torch.zeros(z0.shape[:-1], device=z0.device, dtype=z0.dtype)
        for step in self.flows:
            z, step_log_det = step(z, context)
            log_det = log_det + step_log_det
        return z, log_det

    def embed(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """The posterior mean of q0 pushed through the flows: a code in the space the decoder reads."""
        mu, _, features = self.encode(x)
        return self.flow(mu, features)[0]

    def decode(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z))

    def loss(self, batch):
        x = batch["image"]
        mu, logvar, features = self.encode(x)
        z0 = reparameterize(mu, logvar)
        z, log_det = self.flow(z0, features)
        log_px = self.likelihood.log_prob(x, self.decoder(z))
        if self.flows:
            # change of variables: log q_K(z_K|x) = log q0(z0|x) - Σ log|det|; no closed form for
            # the KL any more, so it is the one-sample Monte Carlo estimate log q_K - log p(z_K)
            kl = log_normal(z0, mu, logvar) - log_det - log_standard_normal(z)
        else:
            # q_K = q0: the analytic KL is exact and lower-variance, and the model is exactly VAE
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
        """log p(x|z_K) + log p(z_K) - log q_K(z_K|x) with q_K the flow posterior, shape (num_samples, B)."""
        mu, logvar, features = self.encode(x)
        z0 = mu + torch.exp(0.5 * logvar) * torch.randn((num_samples, *mu.shape), device=mu.device)
        z, log_det = self.flow(z0, features)
        params = self.decoder(z.flatten(0, 1))
        log_px = self.likelihood.log_prob(x.repeat(num_samples, 1, 1, 1), params).view(num_samples, -1)
        return log_px + log_standard_normal(z) - (log_normal(z0, mu, logvar) - log_det)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, temperature=1.0):
        return self.decode(self._prior_noise(n, self.config.latent_dim, generator, temperature))
