"""Does a generative model copy its training data? Distance in pixel space from each synthetic
sample to its nearest real *train* image, read against the same distance for real *val* images
(which the model never saw): a model that memorises puts its samples much closer to the train
set than unseen real data lies, and near-exact copies show up as a share of samples inside a
small radius. Pixel space on purpose: it needs no learned feature network, so it stays valid
when the reference classifier is not. Not a fidelity measure (blurry samples sit close to many
images; read `copy_fraction`, not the ratio alone).
"""
from __future__ import annotations

import numpy as np
import torch

COPY_FACTOR = 0.1  # a sample within this share of the real val images' median distance counts as a copy
CHUNK_ROWS = 512  # query rows per distance block: memory stays at CHUNK_ROWS x references floats


def nearest_distances(queries: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Euclidean distance (pixels in [0, 1], flattened) from each query image to its nearest reference image."""
    if len(queries) == 0 or len(references) == 0:
        raise ValueError(f"need query and reference images, got {len(queries)} and {len(references)}")
    refs = references.flatten(1).float()
    if queries[0].numel() != refs.shape[1]:
        raise ValueError(f"image sizes differ: queries {tuple(queries.shape[1:])}, references "
                         f"{tuple(references.shape[1:])}")
    out = [torch.cdist(queries[i:i + CHUNK_ROWS].flatten(1).float(), refs).min(1).values
           for i in range(0, len(queries), CHUNK_ROWS)]
    # the matrix-product form of cdist can leave ~1e-3 where the true distance is 0
    return torch.cat(out).clamp_min(0).double().numpy()


def memorisation(synthetic: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
                 copy_factor: float = COPY_FACTOR) -> dict[str, float]:
    """`memorisation_ratio`: median nearest-train distance of synthetic samples / that of real val
    images (~1 for a model that generalises like fresh real data; -> 0 for one that copies).
    `copy_fraction`: share of synthetic samples closer to a train image than `copy_factor` x the
    val median; `val_copy_fraction` is the same share for real val images (the base rate: duplicates
    the dataset itself holds)."""
    synthetic_d, val_d = nearest_distances(synthetic, train), nearest_distances(val, train)
    val_median = float(np.median(val_d))
    if val_median <= 0:
        raise ValueError("half the val images have an exact copy in train: the memorisation check needs a "
                         "dataset whose splits do not share images")
    threshold = copy_factor * val_median
    return {
        "memorisation_ratio": float(np.median(synthetic_d)) / val_median,
        "copy_fraction": float((synthetic_d < threshold).mean()),
        "val_copy_fraction": float((val_d < threshold).mean()),
        "nearest_train_distance": float(np.median(synthetic_d)),
        "val_nearest_train_distance": val_median,
    }
