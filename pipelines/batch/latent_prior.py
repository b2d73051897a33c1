"""`vaepipe generate --latent-prior mixture`: fit the ex-post mixture prior (vaemodels/mixture_prior.py)
once, on the driver, before anything is written: the model's posterior means of a seeded sample of
the real dataset's train split, one Gaussian mixture per class. The fitted parameters go to every
actor with the job and their sha256 into the request (and so the manifest), so the same request
gives the same bytes and a different fit is a different request.
"""
from __future__ import annotations

from typing import Any

import torch

from pipelines.config import ConfigError
from vaemodels.mixture_prior import MixturePrior, fit_mixture_prior


def fit_latent_prior(model: Any, data: str, components: int, images: int, seed: int) -> tuple[MixturePrior, dict]:
    """(prior, its request entry) for `model` from dataset `data`; ConfigError names a dataset that does
    not fit the model (modality, image shape, classes)."""
    from pipelines.data.manifest import ManifestError, read_manifest
    from pipelines.evaluation.data import embed, load_split
    from pipelines.evaluation.evaluate import check_model_fits

    try:
        manifest = read_manifest(data)
    except ManifestError as exc:
        raise ConfigError(f"prior_data: {exc}") from exc
    if manifest.modality != "image":
        raise ConfigError(f"prior_data {data} holds {manifest.modality} data; the mixture prior is fitted to images")
    try:
        check_model_fits(model, manifest)
    except ConfigError as exc:
        raise ConfigError(f"prior_data: {exc}") from exc
    split = load_split(manifest, "train", images, seed)
    labels = split.labels.numpy() if model.is_conditional else None
    if labels is not None and (labels < 0).any():
        raise ConfigError(f"prior_data {data}: {int((labels < 0).sum())} train images are unlabelled; a "
                          f"conditional model's mixture is fitted per class")
    with torch.no_grad():
        codes = embed(model.eval(), split).cpu().numpy()
    try:
        prior = fit_mixture_prior(codes, labels, components, seed)
    except ValueError as exc:
        raise ConfigError(f"prior_data {data}: {exc}") from exc
    if model.is_conditional:
        absent = sorted(set(range(model.num_classes)) - set(prior.keys))
        if absent:
            raise ConfigError(f"prior_data {data}: the {len(split.labels)} train images read have no image of "
                              f"classes {absent}, so the mixture cannot sample them")
    entry = {"kind": "mixture", "data_sha256": manifest.sha256(), "components": components,
             "images": int(len(codes)), "sha256": prior.sha256()}
    return prior, entry

