"""Training checkpoints as plain folders, no pickled objects of ours:
`model/` (safetensors weights + config.json, see vaemodels.serialization), `optimizers.pt`
(optimizer state dicts: tensors and numbers only, loaded with weights_only=True) and
`state.json` (step, epoch, batch within the epoch, the resolved training config).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaemodels import AutoEncoderModel, load_model, save_model

MODEL_DIR = "model"
OPTIMIZERS_FILE = "optimizers.pt"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class TrainingState:
    step: int  # optimizer steps taken so far (all epochs)
    epoch: int  # epoch to continue in
    batch: int  # batches of that epoch already done
    config: dict[str, Any]  # the resolved training config
    resumed_from: tuple[int, ...] = ()  # steps this run was restarted from (after failures or --resume)


def write_checkpoint(directory: str | Path, model: AutoEncoderModel, optimizers: dict[str, torch.optim.Optimizer],
                     state: TrainingState) -> Path:
    directory = Path(directory)
    save_model(model, directory / MODEL_DIR)
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, directory / OPTIMIZERS_FILE)
    (directory / STATE_FILE).write_text(json.dumps({**state.__dict__, "resumed_from": list(state.resumed_from)},
                                                   indent=2) + "\n")
    return directory


def read_state(directory: str | Path) -> TrainingState:
    data = json.loads((Path(directory) / STATE_FILE).read_text())
    return TrainingState(**{**data, "resumed_from": tuple(data.get("resumed_from", ()))})


def restore_checkpoint(directory: str | Path, model: AutoEncoderModel,
                       optimizers: dict[str, torch.optim.Optimizer]) -> TrainingState:
    """Load weights and optimizer state into existing objects; returns where training stopped."""
    directory = Path(directory)
    saved = load_model(directory / MODEL_DIR, map_location="cpu")
    model.load_state_dict(saved.state_dict())
    states = torch.load(directory / OPTIMIZERS_FILE, map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(states[name])
    return read_state(directory)
