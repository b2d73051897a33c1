"""The model side every batch job shares (generate and the jobs over a dataset alike): loading a
saved model on the driver with one clear error, its identity (sha256) and provenance in the request,
the per-worker copy, and how outputs are written (uint8 pixels, label folders).
Not here: the Ray Data skeleton (pipelines/batch/job.py) or what a job computes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import ConfigError

UNLABELLED = -1  # label of a sample without a class (unconditional models, unlabelled shards)


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about the model before planning (read once, on the driver)."""

    name: str  # registry name, e.g. "cvae"
    input_shape: tuple[int, int, int]
    num_classes: int | None  # None for unconditional models
    latent_dim: int
    is_generative: bool
    sha256: str  # of config.json + weights: the model's identity in the request


def absolute(location: str) -> str:
    """Ray workers do not share the driver's working directory: give them absolute paths."""
    return location if "://" in location else str(Path(location).resolve())


def model_sha256(folder: Path) -> str:
    """One model, one identity: the sha256 of its config.json and weights, in every job's request."""
    from pipelines.data.manifest import file_sha256

    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update(file_sha256(str(folder / name)).encode())
    return digest.hexdigest()


def load_saved_model(model_dir: str):
    """Load a saved model folder on the driver; returns (model, ModelInfo). ConfigError names the folder."""
    import vaemodels

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ConfigError(f"model_dir {folder}: no such folder, so it is not a saved model (one holds "
                          "config.json and model.safetensors)")
    try:
        model = vaemodels.load_model(folder)
    except (FileNotFoundError, ValueError) as exc:  # vaemodels.ConfigError is a ValueError
        raise ConfigError(f"model_dir {folder}: {exc}") from exc
    info = ModelInfo(model.name, tuple(model.input_shape), model.num_classes if model.is_conditional else None,
                     model.config.latent_dim, model.is_generative, model_sha256(folder))
    return model, info


def model_request(config: Any, info: ModelInfo) -> dict[str, Any]:
    """The model part of a job's request (and the rows' provenance): where it came from and its sha256.
    `config` is any job config with model_dir, model_uri, model_name and model_version."""
    return {"uri": config.model_uri or str(Path(config.model_dir).resolve()), "name": config.model_name,
            "version": config.model_version, "sha256": info.sha256}


def model_class_names(model_dir: str) -> list[str] | None:
    """The class names a model was trained with (its dataset.json), if it has them."""
    from pipelines.registry.tracking import read_dataset_info

    names = (read_dataset_info(model_dir) or {}).get("class_names")
    return [str(n) for n in names] if names else None


def model_modality(model_dir: str) -> str:
    """What the model was trained on: its dataset.json's "modality", "image" when absent (image models,
    and every model saved before other modalities existed)."""
    from pipelines.registry.tracking import read_dataset_info

    return str((read_dataset_info(model_dir) or {}).get("modality", "image"))


def load_worker_model(model_dir: str, use_gpu: bool):
    """A worker's own copy of the model, on its GPU when it has one."""
    import vaemodels

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return vaemodels.load_model(model_dir, map_location=device)  # in eval mode


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """B x C x H x W in [0, 1] -> uint8 B x H x W x C, as pipelines.data.build.encode_png takes it."""
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def label_folder(label: int, class_names: list[str] | None = None) -> str:
    """The images/ sub-folder of a label: its class name when known, else the number; -1 = unlabelled."""
    if label == UNLABELLED:
        return "unlabelled"
    return class_names[label] if class_names else str(label)
