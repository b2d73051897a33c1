"""The data layer: image sources -> WebDataset shards + manifest (build), and the streaming,
rank-balanced reader that training workers use (reader)."""
from pipelines.data.build import BuildConfig, build_dataset
from pipelines.data.manifest import Manifest, ManifestError, read_manifest, verify_shards
from pipelines.data.reader import DataReadError, ReaderConfig, ShardStream, make_loader, open_stream
from pipelines.data.sources import SourceError, open_source

__all__ = ["BuildConfig", "build_dataset", "Manifest", "ManifestError", "read_manifest", "verify_shards",
           "DataReadError", "ReaderConfig", "ShardStream", "make_loader", "open_stream", "SourceError", "open_source"]
