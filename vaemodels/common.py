"""Pieces every model family shares: the base config, MLP/conv backbones sized from (C, H, W),
decoder likelihoods, Gaussian helpers (reparameterization, KL, log-density) and the base classes
that give every model the same interface (loss/encode/decode/sample/anomaly_score/IWAE).

Not here: anything about training loops, Ray, MLflow or files on disk.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)
BACKBONES = ("mlp", "conv", "resconv")
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


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
# Backbones: an encoder trunk maps an image to a feature vector; a decoder trunk maps a code
# vector back to per-pixel parameters (logits / pre-sigmoid means) of shape (C, H, W).
# ----------------------------------------------------------------------------------------------


class MLPEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], hidden_dim: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.net = nn.Sequential(*layers)
        self.feature_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], code_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = code_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers += [nn.Linear(width, math.prod(input_shape)), nn.Unflatten(1, tuple(input_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)


def conv_stage_shapes(input_shape: tuple[int, int, int], channels: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Shapes after each stride-2 stage; stages stop once a side would drop below 4 pixels."""
    _, h, w = input_shape
    shapes = []
    for c in channels:
        if min(h, w) // 2 < 2 or (shapes and min(h, w) <= 4):
            break
        h, w = h // 2, w // 2
        shapes.append((c, h, w))
    if not shapes:  # tiny images: keep one stage so the conv backbone still has a conv
        shapes.append((channels[0], max(h // 2, 1), max(w // 2, 1)))
    return shapes


class ConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        layers: list[nn.Module] = []
        in_c = input_shape[0]
        for c, _, _ in stages:
            layers += [nn.Conv2d(in_c, c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            in_c = c
        c, h, w = stages[-1]
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], code_dim: int, channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        c, h, w = stages[-1]
        layers: list[nn.Module] = [
            nn.Linear(code_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, c * h * w), nn.ReLU(),
            nn.Unflatten(1, (c, h, w)),
        ]
        # Walk the encoder's stages backwards; output_padding makes odd sizes (7 -> 14 -> 28) exact.
        targets = [s[1:] for s in stages[:-1]][::-1] + [tuple(input_shape[1:])]
        out_channels = [s[0] for s in stages[:-1]][::-1] + [input_shape[0]]
        in_c, cur = c, (h, w)
        for i, ((th, tw), out_c) in enumerate(zip(targets, out_channels)):
            pad = (th - 2 * cur[0], tw - 2 * cur[1])
            if not all(p in (0, 1) for p in pad):
                raise ValueError(f"conv decoder cannot reach {(th, tw)} from {cur}")
            layers.append(nn.ConvTranspose2d(in_c, out_c, kernel_size=4, stride=2, padding=1, output_padding=pad))
            if i < len(targets) - 1:
                layers.append(nn.ReLU())
            in_c, cur = out_c, (th, tw)
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)


# The residual backbone. Why each piece: GroupNorm keeps activations scaled without making a
# sample's output depend on its batch (BatchNorm would change log p(x) between train and eval);
# residual blocks add depth where the maps are small (<= RES_BLOCK_MAX_SIDE a side), which costs
# little on a CPU, while the large maps keep one strided conv each; the decoder upsamples with
# transposed convs whose kernel (4) is a multiple of the stride (2), so no checkerboard, sized
# exactly with output_padding (7 -> 14 -> 28, 8 -> 16 -> 32 -> 64) — a nearest resize + 3x3 conv
# measured 3-5x slower per step here; and each decoder stage adds a projection of the code
# (latent + one-hot class for conditional families) as a per-channel bias, so the label and z
# reach every scale instead of only the first dense layer, where the label is easy to ignore.

RES_BLOCK_MAX_SIDE = 8


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), pre-activation style (He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)  # each block starts as the identity: a shallow net at step 0
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _res_block_or_identity(channels: int, h: int, w: int) -> nn.Module:
    return ResBlock(channels) if max(h, w) <= RES_BLOCK_MAX_SIDE else nn.Identity()


class ResConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        layers: list[nn.Module] = []
        in_c = input_shape[0]
        for c, h, w in stages:
            layers += [nn.Conv2d(in_c, c, kernel_size=4, stride=2, padding=1), _norm(c), nn.SiLU(),
                       _res_block_or_identity(c, h, w)]
            in_c = c
        c, h, w = stages[-1]
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden_dim), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResConvDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], code_dim: int, channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        c, h, w = stages[-1]
        self.stem = nn.Sequential(
            nn.Linear(code_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, c * h * w), nn.Unflatten(1, (c, h, w)),
        )
        # walk the encoder's stages backwards, each time to the exact size the encoder came from
        targets = [s[1:] for s in stages[:-1]][::-1] + [tuple(input_shape[1:])]
        out_channels = [s[0] for s in stages[:-1]][::-1] + [input_shape[0]]
        self.code_bias, self.blocks, self.ups = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        in_c, cur = c, (h, w)
        for i, ((th, tw), out_c) in enumerate(zip(targets, out_channels)):
            pad = (th - 2 * cur[0], tw - 2 * cur[1])
            if not all(p in (0, 1) for p in pad):
                raise ValueError(f"conv decoder cannot reach {(th, tw)} from {cur}")
            self.code_bias.append(nn.Linear(code_dim, in_c))
            self.blocks.append(_res_block_or_identity(in_c, *cur))
            up: list[nn.Module] = [nn.ConvTranspose2d(in_c, out_c, 4, stride=2, padding=1, output_padding=pad)]
            if i < len(targets) - 1:  # the last one gives the likelihood's parameters: no norm, no activation
                up += [_norm(out_c), nn.SiLU()]
            self.ups.append(nn.Sequential(*up))
            in_c, cur = out_c, (th, tw)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.stem(code)
        for bias, block, up in zip(self.code_bias, self.blocks, self.ups):
            h = up(block(h + bias(code)[:, :, None, None]))
        return h


def build_encoder(config: ModelConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """Encoder trunk: image -> features of size `.feature_dim` (heads are the family's business)."""
    if config.backbone == "mlp":
        return MLPEncoder(input_shape, config.dense_width, config.mlp_layers)
    if config.backbone == "conv":
        return ConvEncoder(input_shape, config.conv_channels, config.dense_width)
    return ResConvEncoder(input_shape, config.conv_channels, config.dense_width)


def build_decoder(config: ModelConfig, input_shape: tuple[int, int, int], code_dim: int) -> nn.Module:
    """Decoder trunk: code of size `code_dim` -> per-pixel parameters shaped like the image."""
    if config.backbone == "mlp":
        return MLPDecoder(input_shape, code_dim, config.dense_width, config.mlp_layers)
    if config.backbone == "conv":
        return ConvDecoder(input_shape, code_dim, config.conv_channels, config.dense_width)
    return ResConvDecoder(input_shape, code_dim, config.conv_channels, config.dense_width)


# ----------------------------------------------------------------------------------------------
# Decoder likelihood p(x|z): turns decoder output into log-probabilities and mean images.
# ----------------------------------------------------------------------------------------------


class DecoderLikelihood(nn.Module):
    """Bernoulli (logits) or Gaussian (sigmoid mean, fixed or learned per-channel std)."""

    def __init__(self, kind: str, num_channels: int, std: float):
        super().__init__()
        self.kind = kind
        if kind == "gaussian_learned":
            self.log_std = nn.Parameter(torch.full((num_channels,), math.log(std)))
        else:
            self.register_buffer("log_std", torch.full((num_channels,), math.log(std)), persistent=False)

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: one number per sample, in nats."""
        if self.kind == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)
        log_std = self.log_std.clamp(min=-7.0).view(1, -1, 1, 1)
        mean = torch.sigmoid(params)
        logp = -0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * LOG_2PI
        return logp.flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The image the decoder predicts, in [0, 1]."""
        return torch.sigmoid(params)


# ----------------------------------------------------------------------------------------------
# Gaussian helpers. logvar everywhere is log sigma^2; everything returns per-sample sums unless
# its name says per-dimension.
# ----------------------------------------------------------------------------------------------


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps (Kingma & Welling 2014), so gradients flow through mu and sigma."""
    eps = randn_like(mu, generator)
    return mu + torch.exp(0.5 * logvar) * eps


def randn_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like t; drawn on the generator's device, then moved."""
    if generator is None:
        return torch.randn_like(t)
    return torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL(N(mu, sigma^2) || N(0, 1)) per latent dimension (shape of mu)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL to the standard normal, summed over dimensions: one number per sample."""
    return gaussian_kl_per_dim(mu, logvar).flatten(1).sum(1)


def gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """Analytic KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over dimensions, per sample."""
    kl = 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0)
    return kl.flatten(1).sum(1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, sigma^2) summed over the last dimension."""
    return (-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 / logvar.exp())).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return (-0.5 * (LOG_2PI + z**2)).sum(-1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).float()


def linear_warmup(step: int, warmup_steps: int) -> float:
    """KL weight for warm-up (Bowman et al. 2016; Sønderby et al. 2016): 0 -> 1 over warmup_steps."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def active_units(posterior_means: torch.Tensor, threshold: float = 0.01) -> int:
    """Active units (Burda et al. 2016): dims whose posterior mean varies over the data, Cov_x(E_q[z]) > threshold."""
    means = posterior_means.double()
    return active_units_from_moments(len(means), means.sum(0), (means**2).sum(0), threshold)


def active_units_from_moments(count, total: torch.Tensor, total_sq: torch.Tensor, threshold: float = 0.01) -> int:
    """The same count from the sums of the posterior means and of their squares over `count` samples:
    the population variance E[m^2] - E[m]^2, so sums gathered across workers give the one answer."""
    variance = total_sq / count - (total / count) ** 2
    return int((variance > threshold).sum().item())


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
