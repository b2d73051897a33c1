"""The reference classifier every classifier-based metric is read through (FID/PRDC features,
CAS, TRTR, augmentation gain, classifier-filtered sampling), and the small training routine that
fits it: a normalised conv net with global average pooling at the data's native resolution,
trained on shifted copies of the images until a held-out split of the *training* data stops
improving (never the val split, which stays the test set). Saved as safetensors + config.json.
Not here: which data it is trained on or what the metrics make of it (see pipelines/evaluation/evaluate.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STEM_CHANNELS = 16  # first stage; each stride-2 stage doubles it up to MAX_CHANNELS
MAX_CHANNELS = 32  # also the feature size: FID and PRDC are measured in this many dimensions
MIN_SIDE = 7  # stride-2 stages continue while the map is larger than this (28 -> 14 -> 7; 32 -> 16 -> 8 -> 4)
MAX_SIDE = 32  # larger images are average-pooled to at most this side first (64 x 64 shapes: 2 x 2)
LR_DROP = 0.3  # learning-rate factor when the held-out accuracy stalls
EVAL_BATCH = 512  # images per forward pass when scoring (memory bound, not a hyperparameter)
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
KIND = "reference_classifier"  # config.json "kind": tells this folder from a saved VAE


def input_pool(input_shape: tuple[int, int, int]) -> int:
    """Average-pooling factor applied before the trunk: 1 up to MAX_SIDE px, 2 for 64 x 64."""
    return max(1, -(-max(input_shape[1:]) // MAX_SIDE))


def stage_channels(input_shape: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """(channels, stride) per stage: stride-2 stages until the (pooled) larger side is <= MIN_SIDE,
    and at least two stages, small images (8 x 8 digits) getting stride-1 ones first, so every
    trunk ends with MAX_CHANNELS features computed over a few pixels' context."""
    side, strides = max(input_shape[1:]) // input_pool(input_shape), []
    while side > MIN_SIDE:
        strides.append(2)
        side = (side + 1) // 2
    strides = [1] * max(0, 2 - len(strides)) + strides
    return tuple((min(MAX_CHANNELS, STEM_CHANNELS * 2 ** i), stride) for i, stride in enumerate(strides))


class ReferenceClassifier(nn.Module):
    """Per stage: strided conv -> BatchNorm -> ReLU -> 3x3 conv -> BatchNorm -> ReLU; then global
    average pooling (what an object is, not where it is) -> features -> linear class head.

    Native resolution up to 32 px (small-image detail, a 4's open top, is what tells classes apart);
    64 x 64 is pooled 2 x 2 first, which keeps a shapes classifier at 0.99 val accuracy for a
    quarter of the compute (0.974 val on 10,000 shapes, measured). BatchNorm makes a few hundred Adam
    steps enough on a CPU.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.pool = input_pool(self.input_shape)
        layers, previous = [], input_shape[0]
        for channels, stride in stage_channels(self.input_shape):
            layers += [nn.Conv2d(previous, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
            previous = channels
        self.trunk = nn.Sequential(*layers)
        self.feature_dim = previous
        self.head = nn.Linear(previous, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(F.avg_pool2d(x, self.pool) if self.pool > 1 else x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class FitReport:
    """How a classifier's training went: what metrics.json and the report say about it."""

    steps: int  # optimizer steps taken (<= max_steps)
    best_step: int  # the step whose weights were kept (best held-out accuracy)
    holdout_accuracy: float  # on the early-stopping split (nan without one)
    stopped_early: bool  # patience ran out before max_steps
    seconds: float


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own integer offset in [-max_shift, max_shift] per axis, edges
    replicated: light augmentation that teaches position does not decide the class."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    picked = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return picked.gather(3, cols)


def default_max_shift(input_shape: tuple[int, int, int]) -> int:
    return max(1, max(input_shape[1:]) // 14)  # 2 px at 28 x 28, 4 px at 64 x 64, 1 px at 8 x 8


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 2000,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     holdout: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 50,
                     patience: int = 6, max_shift: int | None = None) -> ReferenceClassifier:
    """`fit_classifier` without the report."""
    return fit_classifier(images, labels, num_classes, steps, batch_size, lr, seed, holdout, eval_every, patience,
                          max_shift)[0]


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 2000,
                   batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   holdout: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 50,
                   patience: int = 6, max_shift: int | None = None) -> tuple[ReferenceClassifier, FitReport]:
    """Train a fresh classifier on seeded, shifted minibatches for at most `steps` Adam steps.

    With `holdout` (real images the metrics never test on), accuracy on it is checked every
    `eval_every` steps; training stops after `patience` checks without improvement and the best
    weights are kept. Every classifier a comparison makes (CAS, TRTR, both arms of an augmentation
    gain) uses the same holdout and the same rule, so the only difference is the training data.
    Without `holdout` it trains exactly `steps` steps.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    classifier = ReferenceClassifier(tuple(images.shape[1:]), num_classes)
    shift = default_max_shift(classifier.input_shape) if max_shift is None else max_shift
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(images), generator=generator), 0
    batch_size = min(batch_size, len(images))
    best = (-1.0, 0, None)  # (holdout accuracy, step, weights)
    checks_without_gain, step = 0, 0
    classifier.train()
    while step < steps:
        if position + batch_size > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        loss = F.cross_entropy(classifier(random_shift(images[index], shift, generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if holdout is not None and (step % eval_every == 0 or step == steps):
            held = accuracy(classifier.eval(), *holdout)
            classifier.train()
            if held > best[0]:
                best = (held, step, {k: v.detach().clone() for k, v in classifier.state_dict().items()})
                checks_without_gain = 0
            else:
                checks_without_gain += 1
                if checks_without_gain >= patience:
                    break
                if checks_without_gain == patience // 2:
                    # halfway to giving up: a smaller step usually finds the last half-percent
                    for group in optimizer.param_groups:
                        group["lr"] *= LR_DROP
    if best[2] is not None:
        classifier.load_state_dict(best[2])
    report = FitReport(steps=step, best_step=best[1] if holdout is not None else step,
                       holdout_accuracy=best[0] if holdout is not None else float("nan"),
                       stopped_early=step < steps, seconds=round(time.perf_counter() - started, 2))
    return classifier.eval(), report


@torch.no_grad()
def predict_proba(classifier: ReferenceClassifier, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities per image, N x num_classes."""
    classifier.eval()
    return torch.cat([classifier(images[i:i + EVAL_BATCH]).softmax(1) for i in range(0, len(images), EVAL_BATCH)])


@torch.no_grad()
def predict(classifier: ReferenceClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted class per image."""
    classifier.eval()
    return torch.cat([classifier(images[i:i + EVAL_BATCH]).argmax(1) for i in range(0, len(images), EVAL_BATCH)])


@torch.no_grad()
def features(classifier: ReferenceClassifier, images: torch.Tensor) -> np.ndarray:
    """Globally pooled last-stage features, N x feature_dim float64: the space FID and PRDC are measured in."""
    classifier.eval()
    return torch.cat([classifier.features(images[i:i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)]) \
        .double().numpy()


def accuracy(classifier: ReferenceClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(classifier, images) == labels.long()).float().mean())


def per_class_accuracy(classifier: ReferenceClassifier, images: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> list[float]:
    """Recall of each class on (images, labels); nan for a class with no samples."""
    hits = predict(classifier, images) == labels.long()
    return [float(hits[labels == c].float().mean()) if (labels == c).any() else float("nan")
            for c in range(num_classes)]


def train_test_accuracy(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                        test_labels: torch.Tensor, num_classes: int, steps: int = 2000, seed: int = 0,
                        holdout: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Accuracy on the test set of a classifier trained on the train set: CAS/TSTR when the train
    set is synthetic and the test set real, TRTR when both are real (the ceiling CAS is read against)."""
    classifier = train_classifier(train_images, train_labels, num_classes, steps=steps, seed=seed, holdout=holdout)
    return accuracy(classifier, test_images, test_labels)


def augmentation_gain(real_images: torch.Tensor, real_labels: torch.Tensor, synthetic_images: torch.Tensor,
                      synthetic_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                      num_classes: int, real_fraction: float = 0.1, seeds: int = 3, steps: int = 2000,
                      first_seed: int = 0,
                      holdout: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float | list[float]]:
    """Accuracy(real subset + all synthetic) - accuracy(real subset alone), per seed and averaged.

    Each seed draws its own class-stratified subset of `real_fraction` and trains both classifiers
    from the same initialisation under the same stopping rule; only the training data differs.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    gains, base, augmented = [], [], []
    for offset in range(seeds):
        seed = first_seed + offset
        subset = stratified_subset(real_labels, real_fraction, seed)
        x, y = real_images[subset], real_labels[subset]
        alone = train_test_accuracy(x, y, test_images, test_labels, num_classes, steps, seed, holdout)
        mixed = train_test_accuracy(torch.cat([x, synthetic_images]), torch.cat([y, synthetic_labels.long()]),
                                    test_images, test_labels, num_classes, steps, seed, holdout)
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


def save_classifier(classifier: ReferenceClassifier, directory: str | Path, **info: object) -> Path:
    """Weights (safetensors) + config.json (shape, classes, and `info` such as its val accuracy):
    loadable without pickle, so generation can filter with the very classifier evaluation judged by."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in classifier.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"kind": KIND})
    spec = {"kind": KIND, "input_shape": list(classifier.input_shape), "num_classes": classifier.num_classes, **info}
    (directory / CONFIG_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return directory


def load_classifier(directory: str | Path) -> tuple[ReferenceClassifier, dict]:
    """A classifier saved by `save_classifier`, in eval mode, and its config.json; ValueError names the problem."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise ValueError(f"{directory} is not a saved reference classifier: {required} is missing "
                             "(`vaepipe evaluate` writes one to OUT/reference_classifier/)")
    try:
        spec = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if spec.get("kind") != KIND:
        raise ValueError(f"{directory} holds a {spec.get('kind', 'model')!r}, not a reference classifier")
    classifier = ReferenceClassifier(tuple(spec["input_shape"]), int(spec["num_classes"]))
    try:
        classifier.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except RuntimeError as exc:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not fit its config.json: {exc}") from exc
    return classifier.eval(), spec
