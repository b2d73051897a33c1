"""`vaepipe interpolate`: pictures of a model's latent space on real data. For seeded pairs of samples
of a dataset split, decode the straight line between their codes (`grids/interp-NNN.png`, one row per
pair); with `traverse`, also move one sample's code along each latent dimension from -3 to 3 prior
standard deviations (`grids/traverse.png`, one row per dimension); `grids/pairs.json` says which
samples each grid shows. Runs on the batch skeleton (pipelines/batch/job.py) as a single block, for
its manifest, sha256 sums and no-op reruns. Not here: figures of evaluation reports (evaluate.py).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.batch.job import BatchJob, BlockWriter, run_batch_job
from pipelines.config import ConfigError
from pipelines.data.manifest import Manifest
from pipelines.batch.dataset import (DatasetJobConfig, check_unlabelled, open_dataset, open_model, read_shard,
                                     shard_blocks, shard_urls, summary)
from pipelines.batch.model import absolute, load_worker_model, model_request
from pipelines.figures import display_scale, image_grid

TRAVERSE_RANGE = 3.0  # traversals span -3..3 prior standard deviations: almost all of N(0, 1)


@dataclass(frozen=True)
class InterpolateConfig(DatasetJobConfig):
    """The common fields (batch_size and workers go unused: one block of a few dozen decodes) plus:"""

    pairs: int = 8  # pairs of real samples, one grid each
    steps: int = 10  # images along each line (both ends included) and along each traversal
    traverse: bool = False  # also traverse every latent dimension of one sample (generative models)
    seed: int = 0  # picks the pairs: same request -> byte-identical files

    def __post_init__(self) -> None:
        super().__post_init__()
        for ok, message in [
            (self.pairs >= 1, f"pairs must be >= 1, got {self.pairs}"),
            (self.steps >= 2, f"steps must be >= 2 (the two ends), got {self.steps}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]:
            if not ok:
                raise ConfigError(message)


def plan_block(manifest: Manifest, config: InterpolateConfig) -> dict[str, Any]:
    """The one block: seeded pairs of distinct samples as (shard, position in shard), and the shards
    to read; the traversal uses the first pair's first sample."""
    shards = shard_blocks(manifest, config.split)
    total = sum(s["num_samples"] for s in shards)
    if total < 2:
        raise ConfigError(f"split {config.split!r} of {manifest.location} has {total} sample(s); a pair needs 2")
    starts = np.cumsum([0] + [s["num_samples"] for s in shards])
    rng = np.random.default_rng(config.seed)

    def locate(position: int) -> list:
        shard = int(np.searchsorted(starts, position, side="right")) - 1
        return [shards[shard]["shard"], int(position - starts[shard])]

    pairs = [[locate(int(p)) for p in rng.choice(total, size=2, replace=False)] for _ in range(config.pairs)]
    needed = {name for pair in pairs for name, _ in pair}
    return {"index": 0, "shards": [s for s in shards if s["shard"] in needed], "pairs": pairs,
            "traverse": pairs[0][0] if config.traverse else None, "steps": config.steps}


def grid_png(images: torch.Tensor, nrow: int) -> bytes:
    image = Image.fromarray(image_grid(images, nrow))
    scale = display_scale(images.shape[-1])
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class InterpolateBlock:
    """The block's compute (see batch_job.BlockFn): read the shards that hold the pairs, decode the
    lines (conditional models: in the first sample's class) and the traversal, write the grids."""

    def __init__(self, model_dir: str, use_gpu: bool, shard_urls: dict[str, str]):
        self.model = load_worker_model(model_dir, use_gpu)
        self.shard_urls = shard_urls

    def __call__(self, block: dict[str, Any], writer: BlockWriter) -> dict[str, int]:
        model, steps = self.model, block["steps"]
        shards = {s["shard"]: read_shard(self.shard_urls[s["shard"]], s) for s in block["shards"]}

        def sample(where: list) -> tuple[torch.Tensor, np.ndarray, dict[str, int]]:
            found = shards[where[0]]
            i = where[1]
            return (found.images[i:i + 1].to(model.device), found.labels[i:i + 1],
                    {"index": int(found.indices[i]), "label": int(found.labels[i])})

        listing = {"interpolations": [], "traverse": None}
        with torch.inference_mode():
            for p, pair in enumerate(block["pairs"]):
                (xa, ya, a), (xb, yb, b) = sample(pair[0]), sample(pair[1])
                images = model.interpolate(torch.cat([xa, xb]), steps, np.concatenate([ya, yb]))
                path = f"grids/interp-{p:03d}.png"
                writer.write_bytes(path, grid_png(images, nrow=steps))
                listing["interpolations"].append({"file": path, "from": a, "to": b, "decoded_label": a["label"]})
            if block["traverse"] is not None:
                x, y, which = sample(block["traverse"])
                images = model.traverse(x, torch.linspace(-TRAVERSE_RANGE, TRAVERSE_RANGE, steps), labels=y)
                writer.write_bytes("grids/traverse.png", grid_png(images, nrow=steps))
                listing["traverse"] = {"file": "grids/traverse.png", "sample": which,
                                       "rows": "latent dimensions 0..latent_dim-1",
                                       "values": [-TRAVERSE_RANGE, TRAVERSE_RANGE]}
        writer.write_bytes("grids/pairs.json", (json.dumps(listing, indent=1) + "\n").encode())
        counts = {"interpolations": len(block["pairs"])}
        if block["traverse"] is not None:
            counts["traversals"] = 1
        return counts


def _decode_own_code(model, images: torch.Tensor, labels) -> torch.Tensor:
    return model.reconstruct(images, model.condition_on(labels))


def run_interpolation(config: InterpolateConfig) -> dict[str, Any]:
    """Write the grids of `config` into `config.out` (a finished same request is a no-op)."""
    manifest = open_dataset(absolute(config.data), config.split)
    model, info = open_model(config, manifest)
    if config.traverse and not info.is_generative:
        raise ConfigError(f"traverse needs a generative model (its -3..3 range is in prior standard deviations); "
                          f"the {info.name!r} model has no prior: leave traverse off")
    check_unlabelled(model, manifest, "decode codes in a class", _decode_own_code)
    out = Path(config.out).resolve()
    request = {
        "model": model_request(config, info),
        "data": {"sha256": manifest.sha256(), "split": config.split},
        "pairs": config.pairs,
        "steps": config.steps,
        "traverse": config.traverse,
        "seed": config.seed,
        "use_gpu": config.use_gpu,
    }
    job = BatchJob(
        name="interpolate",
        out=out,
        request=request,
        blocks=[plan_block(manifest, config)],
        block_fn=InterpolateBlock,
        block_fn_kwargs={"model_dir": str(Path(config.model_dir).resolve()), "use_gpu": config.use_gpu,
                         "shard_urls": shard_urls(manifest, config.split)},
        owned_dirs=("grids",),
        workers=1,
        use_gpu=config.use_gpu,
        metadata={"model_family": info.name, "image_shape": list(info.input_shape), "latent_dim": info.latent_dim,
                  "data": manifest.location, "split": config.split},
        overwrite=config.overwrite,
    )
    result = run_batch_job(job)
    files = [f["path"] for f in result.manifest["files"]]
    return {**summary(out, result), "grids": [str(out / f) for f in files if f.endswith(".png")]}
