"""Save and load models as a folder without pickle: `model.safetensors` (weights) and
`config.json` (registry name, input shape, classes, config fields). Loading builds the class
from our registry and fills tensors, so a model pulled from anywhere never runs stored code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vaemodels.common import AutoEncoderModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def model_spec(model: AutoEncoderModel) -> dict:
    """Everything needed to rebuild the model's architecture, as plain JSON values."""
    return {
        "name": model.name,
        "input_shape": model.input_spec(),  # image models: [C, H, W]; table models: the table spec
        "num_classes": model.num_classes,
        "config": model.config.to_dict(),
    }


def save_model(model: AutoEncoderModel, directory: str | Path) -> Path:
    """Write weights + config into `directory` (created if needed); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or strided storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"name": model.name})
    (directory / CONFIG_FILE).write_text(json.dumps(model_spec(model), indent=2) + "\n")
    return directory


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> AutoEncoderModel:
    """Rebuild a model saved by `save_model`; raises FileNotFoundError/ValueError naming the problem."""
    from vaemodels import build_from_spec

    directory = Path(directory)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"{directory} is not a saved model: {required} is missing")
    try:
        spec = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {exc}") from exc
    model = build_from_spec(spec)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    model.load_state_dict(state)
    return model.to(map_location).eval()
