"""What every model family shares: the base config (validated once, with the one ConfigError) and
the base classes that give every model the same interface (loss/encode/decode/sample/anomaly_score/
IWAE, and what pipelines ask: condition_on, interpolate, traverse). The backbones (backbones.py) and
the likelihood and Gaussian helpers (distributions.py) are re-exported here for the families.

Not here: anything about training loops, Ray, MLflow or files on disk.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# the pieces families build from live in backbones.py and distributions.py; families import them from
# here, the one place that names the shared API (so a model file needs one import line)
from vaemodels.backbones import build_decoder, build_encoder  # noqa: F401
from vaemodels.distributions import (LIKELIHOODS, DecoderLikelihood, active_units, active_units_from_moments,  # noqa: F401
                                     gaussian_kl, gaussian_kl_between, gaussian_kl_per_dim, linear_warmup,
                                     log_normal, log_standard_normal, one_hot, randn_like, reparameterize)

BACKBONES = ("mlp", "conv", "resconv")


class ConfigError(ValueError):
    """A config field (a model's, or any pipelines config's) is unknown, missing or has a bad value:
    the one error class for bad configuration, so callers catch a single type."""


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model family accepts; each family's config extends this one."""

    latent_dim: int = 10  # size of the (top) latent code
    # "resconv" (residual conv stages with GroupNorm, resize-conv decoder that sees the code at every
    # stage), "conv" (the plain stride-2 convs of vaepipe <= 0.1; saved models name it, so they still
    # load) or "mlp" (flatten + dense)
    backbone: str = "resconv"
    # width of the dense layers; 0 = the backbone's own width (`dense_width`): 512 for "mlp", where one
    # wide layer learns faster than two narrow ones at small budgets (issue 12/17 benchmark: held-out
    # NLL 1x512 ~126 vs 2x256 ~147 nats after 10 mnist5k epochs), 256 for the conv backbones' dense layer
    hidden_dim: int = 0
    mlp_layers: int = 1  # dense layers in the MLP backbone (encoder side; decoder mirrors it)
    conv_channels: tuple[int, ...] = (32, 64, 64)  # channels per stride-2 stage (conv, resconv); stages stop at 4x4
    likelihood: str = "bernoulli"  # p(x|z): "bernoulli" (binary/gray), "gaussian" (fixed std), "gaussian_learned"
    gaussian_std: float = 0.1  # std of the fixed Gaussian likelihood, and the start of the learned one

    # What a saved config.json that predates a field meant by it: loading fills missing fields from
    # here before the defaults, so models saved by older versions rebuild the network they were
    # trained with (every field that existed then is written out in full, backbone included).
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        # JSON gives lists; keep the config hashable and frozen-friendly.
        for field in dataclasses.fields(self):
            if isinstance(getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        self._check()

    def _check(self) -> None:
        """Type- and range-check every field; families extend this with their own fields."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = field.type if isinstance(field.type, type) else None
            if field.type in ("int", int):
                expected = int
            elif field.type in ("float", float):
                expected = float
            elif field.type in ("str", str):
                expected = str
            elif field.type in ("bool", bool):
                expected = bool
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, field.name, float(value))
                continue
            if expected is int and isinstance(value, bool):
                raise ConfigError(f"{type(self).__name__}.{field.name} must be int, got bool {value!r}")
            if expected is not None and not isinstance(value, expected):
                raise ConfigError(
                    f"{type(self).__name__}.{field.name} must be {expected.__name__}, "
                    f"got {type(value).__name__} {value!r}"
                )
        _require(self.latent_dim >= 1, self, "latent_dim", "must be >= 1")
        _require(self.backbone in BACKBONES, self, "backbone", f"must be one of {BACKBONES}")
        _require(self.hidden_dim >= 0, self, "hidden_dim", "must be >= 1, or 0 for the backbone's own width")
        _require(self.mlp_layers >= 1, self, "mlp_layers", "must be >= 1")
        _require(
            len(self.conv_channels) >= 1 and all(isinstance(c, int) and c >= 1 for c in self.conv_channels),
            self, "conv_channels", "must be a non-empty list of positive ints",
        )
        _require(self.likelihood in LIKELIHOODS, self, "likelihood", f"must be one of {LIKELIHOODS}")
        _require(self.gaussian_std > 0, self, "gaussian_std", "must be > 0")

    @property
    def dense_width(self) -> int:
        """Width of the backbone's dense layers: `hidden_dim`, or the backbone's own when it is 0."""
        if self.hidden_dim:
            return self.hidden_dim
        return 512 if self.backbone == "mlp" else 256

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> "ModelConfig":
        """A config read back from a saved model, possibly written before some fields existed."""
        return cls.from_dict({**cls.legacy_defaults, **values})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _require(ok: bool, config: ModelConfig, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{type(config).__name__}.{field} {message} (got {getattr(config, field)!r})")




# ----------------------------------------------------------------------------------------------
# Base classes: the one interface every family implements.
# ----------------------------------------------------------------------------------------------


class AutoEncoderModel(nn.Module):
    """Interface of every model in the zoo.

    A batch is {"image": float B x C x H x W in [0, 1], "label": long B, -1 = unlabelled}.
    Subclasses set the class attributes and implement loss/encode/decode; training loops call
    `set_training_step(step)` before each step so schedules (KL warm-up, capacity) can follow it.
    """

    name: ClassVar[str]  # registry name, e.g. "vae"
    description: ClassVar[str]  # one line for `vaepipe models`
    config_class: ClassVar[type[ModelConfig]]
    is_variational: ClassVar[bool] = False  # has a posterior q(z|x): kl, elbo, log_likelihood
    is_generative: ClassVar[bool] = False  # sample() draws new data
    is_conditional: ClassVar[bool] = False  # decode/sample take class labels
    # the dataset modalities (a manifest's "modality") the family is built for; training refuses others
    data_modalities: ClassVar[tuple[str, ...]] = ("image",)
    # optimizer group -> the loss key it minimizes; the loop backpropagates their sum once, so a
    # family with several groups must keep each key's gradient inside its own group (see vae_gan)
    optimizer_losses: ClassVar[dict[str, str]] = {"model": "loss"}

    def __init__(self, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int | None = None):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if len(input_shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in input_shape):
            raise ConfigError(f"input_shape must be (C, H, W) positive ints, got {input_shape!r}")
        if self.is_conditional and (num_classes is None or num_classes < 2):
            raise ConfigError(f"model {self.name!r} is conditional and needs num_classes >= 2")
        self.config = config
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.training_step = 0

    # -- schedule hook ------------------------------------------------------------------------
    def set_training_step(self, step: int) -> None:
        self.training_step = int(step)

    # -- optimizers ---------------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimizer; one group unless the family needs more (e.g. a discriminator)."""
        return {"model": list(self.parameters())}

    # -- the interface ------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Same as loss(): going through forward lets DistributedDataParallel sync gradients."""
        return self.loss(batch)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        raise NotImplementedError

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latent code -> mean image in [0, 1]."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """A deterministic code per sample (the posterior mean for variational models)."""
        code = self.encode(x, labels) if self.is_conditional else self.encode(x)
        return code[0] if isinstance(code, tuple) else code

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the deterministic code of x: a mean image in [0, 1]."""
        return self.decode(self.embed(x, labels), labels) if self.is_conditional else self.decode(self.embed(x))

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction error (summed squared error); larger = more anomalous."""
        return (self.reconstruct(x) - x).pow(2).flatten(1).sum(1)

    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        raise NotImplementedError(f"model {self.name!r} is not generative")

    def temper_pixels(self, images: torch.Tensor, pixel_temperature: float) -> torch.Tensor:
        """Mean images of p(x|z)^(1/T) given those of p(x|z) (see DecoderLikelihood.tempered_mean):
        what generation writes with `pixel_temperature` < 1. Unchanged for models without a p(x|z)."""
        return images

    @torch.no_grad()
    def sample_with_latent(self, n: int, labels: torch.Tensor | None = None,
                           generator: torch.Generator | None = None,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, z): n samples from the model's prior and the codes they were decoded from (the top
        layer for hierarchies). What batch generation records; `sample()` returns the same images.
        Families whose prior is not N(0, T^2 I) override it, so pipelines never draw z themselves."""
        if not self.is_generative:
            raise NotImplementedError(f"model {self.name!r} is not generative")
        z = self._prior_noise(n, self.config.latent_dim, generator, temperature)
        if self.is_conditional:
            return self.decode(z, self._check_labels(labels, n).to(self.device)), z
        return self.decode(z), z

    def condition_on(self, labels, all_known: bool = False) -> torch.Tensor | None:
        """What this model's `labels` argument takes for these class ids: None for an unconditional
        model; a long tensor on the model's device otherwise, -1 kept where a label is unknown (a family
        that can infer it, like ssvae, does; the others refuse). With `all_known`, None unless every
        label is known. Pipelines call this instead of branching on is_conditional."""
        if not self.is_conditional or labels is None:
            return None
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        return None if all_known and bool((labels < 0).any()) else labels

    @torch.no_grad()
    def interpolate(self, x: torch.Tensor, steps: int, labels=None) -> torch.Tensor:
        """`steps` images decoded on the straight line from x[0]'s code to x[1]'s (conditional models:
        in x[0]'s class). What every interpolation figure and grid draws."""
        labels = self.condition_on(labels)
        a, b = self.embed(x, labels)[:2]
        t = torch.linspace(0.0, 1.0, steps, device=a.device)[:, None]
        return self.decode((1 - t) * a + t * b, None if labels is None else labels[:1].repeat(steps))

    @torch.no_grad()
    def traverse(self, x: torch.Tensor, values: torch.Tensor, dims: list[int] | None = None,
                 labels=None) -> torch.Tensor:
        """Latent traversal: x[0]'s code with each of `dims` (default every one) swept over `values`,
        the rest fixed; one row of len(values) images per dimension, rows in the order of `dims`."""
        labels = self.condition_on(labels)
        base = self.embed(x[:1], None if labels is None else labels[:1])[0]
        dims = list(range(base.numel())) if dims is None else list(dims)
        values = torch.as_tensor(values, dtype=base.dtype, device=base.device)
        z = base.repeat(len(dims), len(values), 1)
        for row, d in enumerate(dims):
            z[row, :, d] = values
        z = z.flatten(0, 1)
        return self.decode(z, None if labels is None else labels[:1].repeat(len(z)))

    # -- helpers for subclasses ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _prior_noise(self, n: int, dim: int, generator: torch.Generator | None, temperature: float) -> torch.Tensor:
        """Seeded N(0, T^2 I) noise drawn on the CPU (same numbers on any device), moved to the model."""
        z = torch.randn(n, dim, generator=generator) if generator is None or generator.device.type == "cpu" \
            else torch.randn(n, dim, generator=generator, device=generator.device)
        return (z * temperature).to(self.device)

    def _check_labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"model {self.name!r} is conditional: pass labels (long tensor of {n} class ids)")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        return labels.to(self.device)


class VariationalModel(AutoEncoderModel):
    """Base of the variational families: adds the importance-weighted log-likelihood (Burda et al.
    2016), per-dimension KL and -ELBO anomaly scores on top of `log_importance_weights`."""

    is_variational = True
    is_generative = True

    def temper_pixels(self, images: torch.Tensor, pixel_temperature: float) -> torch.Tensor:
        return self.likelihood.tempered_mean(images, pixel_temperature)

    def log_importance_weights(self, x: torch.Tensor, num_samples: int,
                               labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x) for k = 1..num_samples: shape (num_samples, B)."""
        raise NotImplementedError

    def kl_per_dimension(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean analytic KL per latent dimension over the batch (posterior collapse shows as ~0)."""
        mu, logvar = (self.encode(x, labels) if self.is_conditional else self.encode(x))[:2]
        return gaussian_kl_per_dim(mu, logvar).mean(0)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int = 1000, chunk_size: int = 100,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
        """IWAE estimate of log p(x) per sample with k importance samples, in nats.

        Samples are drawn in chunks so memory stays bounded for large k.
        """
        chunks = []
        remaining = k
        while remaining > 0:
            m = min(chunk_size, remaining)
            chunks.append(self.log_importance_weights(x, m, labels))
            remaining -= m
        log_w = torch.cat(chunks, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(k)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, labels: torch.Tensor | None = None, num_samples: int = 1) -> torch.Tensor:
        """Per-sample ELBO (mean of the log importance weights), in nats."""
        return self.log_importance_weights(x, num_samples, labels).mean(0)

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample negative ELBO (10-sample average); larger = more anomalous."""
        return -self.elbo(x, num_samples=10)
