"""Folders shipped to generation actors (the model, the filter classifier) are written to a local
temporary folder for the block function's constructor and removed once it has loaded them: a
scheduled job running daily must not leave a model copy per actor in every node's temp dir."""
from pathlib import Path

import pytest

from pipelines.batch.job import build_with_shipped_files


class Loads:
    """A block function that reads its folder in the constructor, as every vaepipe one does."""

    def __init__(self, model_dir: str, size: int):
        self.folder = Path(model_dir)
        self.read = {p.name: p.read_bytes() for p in self.folder.iterdir()}
        self.size = size


class Refuses:
    def __init__(self, model_dir: str):
        Refuses.folder = Path(model_dir)
        assert Refuses.folder.is_dir()
        raise ValueError("this model cannot be loaded")


def test_the_shipped_copy_is_readable_in_the_constructor_and_gone_after_it():
    built = build_with_shipped_files(Loads, {"model_dir": "/driver/only/path", "size": 3},
                                     {"model_dir": {"model.safetensors": b"\x00weights", "config.json": b"{}"}})
    assert built.read == {"model.safetensors": b"\x00weights", "config.json": b"{}"}
    assert built.size == 3 and built.folder != Path("/driver/only/path")
    assert built.folder.name.startswith("vaepipe-actor-model-dir-")
    assert not built.folder.exists()


def test_the_copy_is_removed_when_the_constructor_fails_and_the_error_is_kept():
    with pytest.raises(ValueError, match="cannot be loaded"):
        build_with_shipped_files(Refuses, {"model_dir": "/x"}, {"model_dir": {"config.json": b"{}"}})
    assert not Refuses.folder.exists()


def test_without_shipped_folders_the_kwargs_pass_through():
    with pytest.raises(FileNotFoundError):  # the driver's path is used as given
        build_with_shipped_files(Loads, {"model_dir": "/no/such/folder", "size": 1}, {})
