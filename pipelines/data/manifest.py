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
# modality (the manifest's "modality" key; absent = "image", as every manifest before it) -> the keys it
# must hold besides format_version, class_names and splits
MODALITY_KEYS = {"image": ("image_shape",), "table": ("table",),
                 "series": ("input_shape", "series")}
# modality -> what vaemodels.build takes as input_shape for a dataset of it
MODEL_INPUTS = {"image": lambda data: tuple(data["image_shape"]), "table": lambda data: data["table"],
                # a series window is C x 1 x T: the image-shaped input the series families take
                "series": lambda data: tuple(data["input_shape"])}


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
        return self.data.get("modality", "image")

    @property
    def model_input(self) -> Any:
        """What `vaemodels.build` takes as input_shape for this dataset: the image shape (C, H, W), a
        table's spec (schema + fitted column transformer), or a series window's shape C x 1 x T."""
        return MODEL_INPUTS[self.modality](self.data)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["image_shape"])

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
    modality = data.get("modality", "image") if isinstance(data, dict) else None
    if modality not in MODALITY_KEYS:
        raise ManifestError(f"manifest {location} has modality {modality!r}; known: {', '.join(MODALITY_KEYS)}")
    for key in ("format_version", *MODALITY_KEYS[modality], "class_names", "splits"):
        if key not in data:
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
