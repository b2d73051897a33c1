"""Metrics for synthetic series windows (arrays float32 (N, C, T), standardised per channel):
TSTR / TRTR with MiniRocket (Dempster et al. 2021, aeon's transform) + a ridge classifier, and the
discriminative and predictive scores of TimeGAN (Yoon, Jarrett & van der Schaar, NeurIPS 2019), each
with its real-vs-real baseline. Pure functions; no files, no models of ours.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

MINIROCKET_KERNELS = 10_000  # aeon's default number of features (~9,996 after rounding to its 84 kernels)


def minirocket_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                        seed: int = 0) -> tuple[float, np.ndarray]:
    """Fit MiniRocket + RidgeClassifierCV on (train_x, train_y); (accuracy, predictions) on test_x."""
    from aeon.transformations.collection.convolution_based import MiniRocket
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    transform = MiniRocket(n_kernels=MINIROCKET_KERNELS, random_state=seed)
    features = transform.fit_transform(np.ascontiguousarray(train_x, dtype=np.float32))
    classifier = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)))
    classifier.fit(features, train_y)
    predictions = classifier.predict(transform.transform(np.ascontiguousarray(test_x, dtype=np.float32)))
    return float((predictions == test_y).mean()), predictions


class _Discriminator(nn.Module):
    """A small 1-D CNN (the issue allows a GRU or a 1-D CNN; a GRU over 150 steps measured ~0.2 s per
    step on this 2-core machine, 30x the CNN): two conv layers, mean- and max-pooled over time, a logit."""

    def __init__(self, channels: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(channels, width, 5, padding=2), nn.SiLU(),
                                 nn.Conv1d(width, width, 5, stride=2, padding=2), nn.SiLU())
        self.head = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], dim=1))[:, 0]


class _Predictor(nn.Module):
    """A causal 1-D CNN: the output at step t sees steps t-8..t only, and predicts step t + 1."""

    def __init__(self, channels: int, width: int = 16, kernel: int = 5):
        super().__init__()
        self.pad = kernel - 1
        self.conv1, self.conv2 = nn.Conv1d(channels, width, kernel), nn.Conv1d(width, width, kernel)
        self.head = nn.Conv1d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.conv1(nn.functional.pad(x, (self.pad, 0))))
        h = nn.functional.silu(self.conv2(nn.functional.pad(h, (self.pad, 0))))
        return self.head(h)


def discriminative_score(a: np.ndarray, b: np.ndarray, steps: int, seed: int = 0, batch_size: int = 128,
                         test_fraction: float = 0.2) -> float:
    """|accuracy - 0.5| of a small 1-D CNN trained to tell windows of `a` from windows of `b` (equal numbers of each,
    the larger set subsampled), on a held-out `test_fraction` of both: 0 = indistinguishable, 0.5 = always
    told apart. TimeGAN's discriminative score (there a GRU); with a = real train, b = real val it is the
    baseline."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
    n_test = max(1, int(round(n * test_fraction)))
    to_seq = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)  # noqa: E731
    train_x = to_seq(np.concatenate([a[n_test:], b[n_test:]]))
    train_y = torch.cat([torch.ones(n - n_test), torch.zeros(n - n_test)])
    test_x = to_seq(np.concatenate([a[:n_test], b[:n_test]]))
    test_y = torch.cat([torch.ones(n_test), torch.zeros(n_test)])
    torch.manual_seed(seed)
    net = _Discriminator(a.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (min(batch_size, len(train_x)),), generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(net(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float(((net(test_x) > 0).float() == test_y).float().mean())
    return abs(accuracy - 0.5)


def predictive_score(train: np.ndarray, test: np.ndarray, steps: int, seed: int = 0, batch_size: int = 128) -> float:
    """TimeGAN's predictive score (there a GRU; here the causal CNN): a network trained on `train` windows
    to predict every next step (all channels) from the steps before it, then its mean absolute error on `test` windows (real val). Train on synthetic
    for the score; on real train for the baseline. Lower is better."""
    train_x = torch.as_tensor(np.ascontiguousarray(train), dtype=torch.float32)
    test_x = torch.as_tensor(np.ascontiguousarray(test), dtype=torch.float32)
    torch.manual_seed(seed)
    net = _Predictor(train.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (min(batch_size, len(train_x)),), generator=generator)
        x = train_x[index]
        loss = (net(x[..., :-1]) - x[..., 1:]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((net(test_x[..., :-1]) - test_x[..., 1:]).abs().mean())
