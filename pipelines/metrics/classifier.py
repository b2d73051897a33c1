"""A small reference classifier and the measurements built on it: its penultimate layer is the
feature space for FID/PRDC (our stand-in for Inception features, which need downloaded weights
and suit 299-px photos, not 8x8 digits), and retraining it on different data gives TSTR
(train on synthetic, test on real), TRTR (train and test on real) and the augmentation gain.
Everything here works on in-memory tensors; loading data is the caller's business.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vaemodels.common import ConvEncoder

CHANNELS = (16, 32, 64)  # stride-2 conv stages (they stop at 4x4, so 8x8 digits get one)
FEATURE_DIM = 64  # size of the penultimate layer: the FID/PRDC feature space
MAX_SIDE = 32  # larger images are average-pooled down to at most this many pixels a side first
EVAL_BATCH = 512  # images per forward pass when scoring (memory bound, not a hyperparameter)


class ReferenceClassifier(nn.Module):
    """(Average pooling to <= MAX_SIDE px) -> conv trunk -> dense ReLU features -> linear class head.

    The pooling keeps 64x64 shapes at a quarter of the compute (seconds, not minutes, on a CPU):
    class-level features do not need every pixel.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.pool = max(1, math.ceil(max(h, w) / MAX_SIDE))
        self.trunk = ConvEncoder((c, max(1, h // self.pool), max(1, w // self.pool)), CHANNELS, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(F.avg_pool2d(x, self.pool) if self.pool > 1 else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 500,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> ReferenceClassifier:
    """Train a fresh classifier for `steps` Adam steps on seeded minibatches (reshuffled each pass).

    A fixed step count, not epochs, so that classifiers trained on sets of different sizes (a 10%
    subset, the subset plus synthetic data) get the same compute and the comparison is fair.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    torch.manual_seed(seed)
    classifier = ReferenceClassifier(tuple(images.shape[1:]), num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(images), generator=generator), 0
    classifier.train()
    for _ in range(steps):
        if position + batch_size > len(order) and position > 0:
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        loss = F.cross_entropy(classifier(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return classifier.eval()


@torch.no_grad()
def predict(classifier: ReferenceClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted class per image."""
    return torch.cat([classifier(images[i:i + EVAL_BATCH]).argmax(1) for i in range(0, len(images), EVAL_BATCH)])


@torch.no_grad()
def features(classifier: ReferenceClassifier, images: torch.Tensor) -> np.ndarray:
    """Penultimate-layer features, N x FEATURE_DIM float64: the space FID and PRDC are measured in."""
    return torch.cat([classifier.features(images[i:i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)]) \
        .double().numpy()


def accuracy(classifier: ReferenceClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(classifier, images) == labels.long()).float().mean())


def train_test_accuracy(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                        test_labels: torch.Tensor, num_classes: int, steps: int = 500, seed: int = 0) -> float:
    """Accuracy on the test set of a classifier trained on the train set: TSTR when the train set
    is synthetic and the test set real, TRTR when both are real (the ceiling TSTR is read against)."""
    classifier = train_classifier(train_images, train_labels, num_classes, steps=steps, seed=seed)
    return accuracy(classifier, test_images, test_labels)


def augmentation_gain(real_images: torch.Tensor, real_labels: torch.Tensor, synthetic_images: torch.Tensor,
                      synthetic_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                      num_classes: int, real_fraction: float = 0.1, seeds: int = 3, steps: int = 500,
                      first_seed: int = 0) -> dict[str, float | list[float]]:
    """Accuracy(10% real subset + all synthetic) - accuracy(10% subset alone), per seed and averaged.

    Each seed draws its own class-stratified subset and trains both classifiers from the same
    initialisation for the same number of steps; only the training data differs. The low-data
    regime is where augmentation is supposed to help, so that is where it is measured.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    gains, base, augmented = [], [], []
    for offset in range(seeds):
        seed = first_seed + offset
        subset = stratified_subset(real_labels, real_fraction, seed)
        x, y = real_images[subset], real_labels[subset]
        alone = train_test_accuracy(x, y, test_images, test_labels, num_classes, steps, seed)
        mixed = train_test_accuracy(torch.cat([x, synthetic_images]), torch.cat([y, synthetic_labels.long()]),
                                    test_images, test_labels, num_classes, steps, seed)
        base.append(alone)
        augmented.append(mixed)
        gains.append(mixed - alone)
    return {
        "gain": float(np.mean(gains)),
        # sample std over seeds (0 with a single seed): how far one seed's gain can be trusted
        "std": float(np.std(gains, ddof=1)) if seeds > 1 else 0.0,
        "gains": gains,
        "subset_accuracy": float(np.mean(base)),
        "augmented_accuracy": float(np.mean(augmented)),
    }


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of each class (at least one sample per class), seeded."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        picked.append(rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picked)))
