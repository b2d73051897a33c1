"""The dataset manifest (`manifest.json` beside the shards): reading it from a local path or any
fsspec URL, resolving shard URLs against it, and verifying shard checksums.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_MODALITY = "image"  # manifests without a "modality" key (every one written before series existed)
# keys a manifest of each modality must have besides the common ones; a modality not listed needs none
MODALITY_KEYS = {"image": ("image_shape",), "series": ("input_shape", "series")}


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or does not match its shards."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute path or URL of the tar file
    name: str  # path relative to the manifest, e.g. "train/shard-000000.tar"
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    location: str  # where manifest.json was read from
    data: dict[str, Any]

    @property
    def modality(self) -> str:
        """What one sample is: "image" (the default, and every manifest written before the key existed) or
        another modality ("series"), whose own module reads its part of the manifest."""
        return str(self.data.get("modality", DEFAULT_MODALITY))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one model input: the image shape, or what a non-image manifest records
        under "input_shape" (a series window is C x 1 x T)."""
        return tuple(self.data["input_shape"] if "input_shape" in self.data else self.data["image_shape"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["image_shape"]) if "image_shape" in self.data else self.input_shape

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.data["class_names"])

    @property
    def factor_names(self) -> list[str]:
        return list(self.data.get("factors", {}).get("names", []))

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["num_samples"])

    def shards(self, split: str) -> list[ShardInfo]:
        base = posixpath.dirname(self.location.rstrip("/"))
        return [
            ShardInfo(posixpath.join(base, s["name"]) if base else s["name"], s["name"], int(s["num_samples"]), s["sha256"])
            for s in self._split(split)["shards"]
        ]

    def sha256(self) -> str:
        """A hash of the manifest's content: identifies the dataset version (e.g. as an MLflow tag)."""
        return hashlib.sha256(json.dumps(self.data, sort_keys=True).encode()).hexdigest()

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.data["splits"]:
            raise ManifestError(f"split {split!r} not in manifest {self.location} (has: {', '.join(self.data['splits'])})")
        return self.data["splits"][split]


def resolve_manifest_location(path_or_dir: str) -> str:
    """Accept either the manifest file or the dataset folder that holds it."""
    return path_or_dir if path_or_dir.endswith(".json") else posixpath.join(path_or_dir.rstrip("/"), MANIFEST_NAME)


def read_manifest(path_or_dir: str) -> Manifest:
    location = resolve_manifest_location(str(path_or_dir))
    try:
        with fsspec.open(location, "rt") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"no dataset manifest at {location} (build one with `vaepipe data build`)") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {location} is not valid JSON: {exc}") from exc
    modality = data.get("modality", DEFAULT_MODALITY) if isinstance(data, dict) else None
    for key in ("format_version", "class_names", "splits", *MODALITY_KEYS.get(modality, ())):
        if not isinstance(data, dict) or key not in data:
            raise ManifestError(f"manifest {location} lacks the key {key!r}")
    if data["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"manifest {location} has format_version {data['format_version']}, expected {FORMAT_VERSION}")
    return Manifest(location, data)


def file_sha256(url: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(manifest: Manifest) -> list[str]:
    """Check every shard's sha256 against the manifest; returns the names that fail (empty = all good)."""
    bad = []
    for split in manifest.data["splits"]:
        for shard in manifest.shards(split):
            try:
                ok = file_sha256(shard.url) == shard.sha256
            except FileNotFoundError:
                ok = False
            if not ok:
                bad.append(shard.name)
    return bad
