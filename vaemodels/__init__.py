"""The model zoo: every autoencoder family behind one interface (see `common.AutoEncoderModel`).

`MODELS` maps registry names to classes; `build()` makes one from defaults plus overrides;
`save_model`/`load_model` move them to and from disk without pickle. No Ray, no MLflow here.
"""
from __future__ import annotations

from typing import Any

from vaemodels.common import AutoEncoderModel, ConfigError, ModelConfig
from vaemodels.serialization import load_model, save_model
from vaemodels.ae import AE, AEConfig
from vaemodels.beta_vae import BetaVAE, BetaVAEConfig
from vaemodels.cvae import CVAE, CVAEConfig
from vaemodels.dae import DAE, DAEConfig
from vaemodels.hvae import HVAE, HVAEConfig
from vaemodels.ssvae import SSVAE, SSVAEConfig
from vaemodels.tvae import TVAE, TVAEConfig
from vaemodels.timevae import ConditionalTimeVAE, TimeVAE, TimeVAEConfig
from vaemodels.vae import VAE, VAEConfig
from vaemodels.vae_flow import VAEFlow, VAEFlowConfig
from vaemodels.vae_gan import VAEGAN, VAEGANConfig

MODELS: dict[str, type[AutoEncoderModel]] = {
    "ae": AE,
    "dae": DAE,
    "vae": VAE,
    "beta_vae": BetaVAE,
    "cvae": CVAE,
    "vae_gan": VAEGAN,
    "hvae": HVAE,
    "vae_flow": VAEFlow,
    "ssvae": SSVAE,
    "tvae": TVAE,
    "timevae": TimeVAE,  # series windows (C x 1 x T)
    "ctimevae": ConditionalTimeVAE,
}


def model_class(name: str) -> type[AutoEncoderModel]:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}") from None


def build(name: str, input_shape: tuple[int, int, int], num_classes: int | None = None,
          **overrides: Any) -> AutoEncoderModel:
    """Build model `name` for images of shape (C, H, W) (table models: the dataset's table spec) from its
    defaults plus `overrides`.

    Unknown override names and bad values raise ConfigError naming the field.
    """
    cls = model_class(name)
    config = cls.config_class.from_dict(overrides)
    return cls(config, cls.prepare_input(input_shape), num_classes)


def build_from_spec(spec: dict[str, Any]) -> AutoEncoderModel:
    """Inverse of `serialization.model_spec`; fields the saved config predates take their legacy values."""
    cls = model_class(spec["name"])
    config = cls.config_class.from_saved(spec["config"])
    return cls(config, cls.prepare_input(spec["input_shape"]), spec.get("num_classes"))


__all__ = ["MODELS", "AutoEncoderModel", "ConfigError", "ModelConfig", "build", "build_from_spec",
           "model_class", "load_model", "save_model", "AE", "AEConfig", "DAE", "DAEConfig", "VAE", "VAEConfig",
           "BetaVAE", "BetaVAEConfig", "CVAE", "CVAEConfig", "VAEGAN", "VAEGANConfig", "HVAE", "HVAEConfig",
           "VAEFlow", "VAEFlowConfig", "SSVAE", "SSVAEConfig", "TVAE", "TVAEConfig",
           "TimeVAE", "ConditionalTimeVAE", "TimeVAEConfig"]
