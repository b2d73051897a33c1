"""Anomaly detection quality: how well a model's `anomaly_score` separates samples of a class it
never saw from the classes it was trained on, as AUROC and average precision (sklearn), plus the
held-out-class protocol itself: train a copy of a family briefly on every class but one, then score.
Not here: choosing the family or the data (see pipelines/evaluation/evaluate.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from pipelines.training.config import OptimSection
from pipelines.training.step import make_optimizers, total_loss, update
from vaemodels import AutoEncoderModel

SCORE_BATCH = 256  # images scored at once (memory bound only)


def detection_metrics(normal_scores, anomalous_scores) -> dict[str, float]:
    """AUROC and average precision of anomaly scores (larger = more anomalous), anomalies the
    positive class. AUROC is 0.5 for scores that ignore the data; average precision's chance
    level is the share of anomalies, so read it against that."""
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    anomalous = np.asarray(anomalous_scores, dtype=np.float64).ravel()
    if not len(normal) or not len(anomalous):
        raise ValueError(f"need normal and anomalous scores, got {len(normal)} and {len(anomalous)}")
    if not (np.isfinite(normal).all() and np.isfinite(anomalous).all()):
        raise ValueError("anomaly scores hold NaN or infinite values")
    truth = np.concatenate([np.zeros(len(normal)), np.ones(len(anomalous))])
    scores = np.concatenate([normal, anomalous])
    return {"auroc": float(roc_auc_score(truth, scores)),
            "average_precision": float(average_precision_score(truth, scores)),
            "anomaly_fraction": float(truth.mean())}


def anomaly_scores(model: AutoEncoderModel, images: torch.Tensor, seed: int = 0,
                   batch_size: int = SCORE_BATCH) -> np.ndarray:
    """`model.anomaly_score` over `images` in batches. Variational scores draw z from torch's global
    generator: seeded here (and put back after), so the scores depend only on the seed, the images
    and the batch size (`vaepipe score` relies on it for byte-identical reruns)."""
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        scores = [model.anomaly_score(images[i:i + batch_size].to(model.device)).cpu()
                  for i in range(0, len(images), batch_size)]
    return torch.cat(scores).double().numpy()


def train_briefly(model: AutoEncoderModel, images: torch.Tensor, labels: torch.Tensor, steps: int,
                  batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                  grad_clip: float | None = OptimSection.grad_clip) -> AutoEncoderModel:
    """A bounded in-memory training run: the model's own loss and the training loop's own update
    (pipelines/training/step.py, training's default grad clip), without shards, checkpoints or Ray."""
    torch.manual_seed(seed)
    optimizers = make_optimizers(model, lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(images), generator=generator), 0
    model.train()
    for step in range(steps):
        if position + batch_size > len(order) and position > 0:
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        model.set_training_step(step)
        out = model.loss({"image": images[index].to(model.device), "label": labels[index].to(model.device)})
        total = total_loss(model, out)
        if not torch.isfinite(total):
            raise RuntimeError(f"non-finite loss at step {step} while training {model.name!r} for the anomaly check")
        update(model, optimizers, total, grad_clip)
    return model.eval()


def held_out_class_detection(make_model: Callable[[], AutoEncoderModel], train_images: torch.Tensor,
                             train_labels: torch.Tensor, normal_images: torch.Tensor,
                             anomalous_images: torch.Tensor, anomaly_class: int, steps: int,
                             seed: int = 0) -> dict[str, float]:
    """Train `make_model()` for `steps` on the training images whose label is not `anomaly_class`,
    then score `normal_images` (unseen samples of the other classes) against `anomalous_images`
    (samples of `anomaly_class`) with its anomaly_score."""
    keep = train_labels != anomaly_class
    if not keep.any():
        raise ValueError(f"no training samples outside class {anomaly_class}")
    model = train_briefly(make_model(), train_images[keep], train_labels[keep], steps, seed=seed)
    return detection_metrics(anomaly_scores(model, normal_images, seed), anomaly_scores(model, anomalous_images, seed))
