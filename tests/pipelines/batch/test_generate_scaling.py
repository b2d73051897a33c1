"""Generation at scale: images as WebDataset shards (read back with plain webdataset), or none;
a manifest whose size grows with blocks, not samples; and verification that still pins every
file when the manifest no longer lists them."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vaemodels
from pipelines.batch import job as batch_job
from pipelines.batch.generate import GenerateBlock, GenerateConfig, plan_blocks, run_generation
from pipelines.batch.job import BlockWriter, OutputExistsError, verify_files
from pipelines.config import ConfigError

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def cvae_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), backbone="mlp", latent_dim=4, hidden_dim=32, num_classes=NUM_CLASSES)
    return str(vaemodels.save_model(model, tmp_path_factory.mktemp("models") / "cvae"))


def request(model_dir, out, **overrides):
    return GenerateConfig.from_dict({"model_dir": model_dir, "out": str(out), "per_class": 50, "block_size": 60,
                                     "batch_size": 32, "workers": 2, **overrides})


def read_shards(urls):
    """Plain webdataset, no vaepipe code: (key, PIL image, label, json) per sample."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls", "json")
    return list(dataset)


def test_bad_image_format_is_refused(cvae_dir, tmp_path):
    with pytest.raises(ConfigError, match="image_format must be one of png, shards, none, got 'tiff'"):
        request(cvae_dir, tmp_path / "out", image_format="tiff")
    assert not (tmp_path / "out").exists()


def test_shards_block_holds_the_parquet_rows_images(cvae_dir, tmp_path):
    """One tar per block, samples in sample order, the same PNG bytes as the Parquet rows; no PNG files."""
    config = request(cvae_dir, tmp_path, block_size=200, image_format="shards")
    block = plan_blocks(config, NUM_CLASSES)[0]
    compute = GenerateBlock(cvae_dir, False, 32, 1.0, 0, {"uri": "u", "name": "n", "version": "v"},
                            ["a", "b", "c", "d"], image_format="shards")
    writer = BlockWriter(tmp_path)
    assert compute(block, writer) == {"0": 50, "1": 50, "2": 50, "3": 50}
    assert not list(tmp_path.rglob("*.png"))
    tar = tmp_path / "images" / "shard-000000.tar"
    assert [f for f in writer.files if f["path"] == "images/shard-000000.tar"][0]["rows"] == 200

    samples = read_shards(str(tar))
    assert len(samples) == 200
    keys = [key for key, *_ in samples]
    assert keys == [f"0-{i:08d}" for i in range(200)]
    frame = pd.read_parquet(tmp_path / "parquet").set_index("id")
    assert Counter(label for _, _, label, _ in samples) == {0: 50, 1: 50, 2: 50, 3: 50}
    for key, image, label, meta in samples[::37]:
        assert image.size == (8, 8) and int(frame.loc[key, "label"]) == label
        assert meta == {"id": key, "class_name": "abcd"[label], "sample_index": int(key.split("-")[1])}
    import webdataset as wds

    raw = {s["__key__"]: s["png"] for s in wds.WebDataset(str(tar), shardshuffle=False)}
    assert all(raw[key] == frame.loc[key, "image"] for key in keys)

    again = tmp_path / "again"
    GenerateBlock(cvae_dir, False, 32, 1.0, 0, {"uri": "u", "name": "n", "version": "v"}, ["a", "b", "c", "d"],
                  image_format="shards")(block, BlockWriter(again))
    assert (again / "images" / "shard-000000.tar").read_bytes() == tar.read_bytes()  # same block, same bytes


def test_none_writes_parquet_only(cvae_dir, tmp_path):
    config = request(cvae_dir, tmp_path, image_format="none")
    block = plan_blocks(config, NUM_CLASSES)[0]
    writer = BlockWriter(tmp_path)
    GenerateBlock(cvae_dir, False, 32, 1.0, 0, {"uri": "u", "name": "n", "version": "v"}, None,
                  image_format="none")(block, writer)
    assert all(f["path"].startswith("parquet/") for f in writer.files) and not (tmp_path / "images").exists()
    assert len(pd.read_parquet(tmp_path / "parquet")) == 60


@pytest.mark.ray
def test_shards_output_end_to_end(ray_session, cvae_dir, tmp_path):
    out = tmp_path / "gen"
    result = run_generation(request(cvae_dir, out, image_format="shards"))
    assert result["image_format"] == "shards" and result["total"] == 200
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_format"] == "shards" and manifest["request"]["image_format"] == "shards"
    tars = sorted(str(p) for p in (out / "images").glob("*.tar"))
    assert len(tars) == manifest["blocks"] == 4 and not list(out.rglob("*.png"))
    samples = read_shards(tars)
    assert len(samples) == 200 and len({key for key, *_ in samples}) == 200
    assert Counter(label for _, _, label, _ in samples) == {k: 50 for k in range(NUM_CLASSES)}
    assert verify_files(out) == []
    assert sum(d["rows"] for d in manifest["block_digests"]) == 2 * 200  # Parquet rows + shard samples

    # the PNG-file request is another request: refused in the same folder without --overwrite
    with pytest.raises(OutputExistsError, match="differs in: image_format"):
        run_generation(request(cvae_dir, out))
    png_request = json.loads(json.dumps(run_generation(request(cvae_dir, tmp_path / "png"))))
    assert "image_format" not in json.loads((tmp_path / "png" / "manifest.json").read_text())["request"]
    assert png_request["image_format"] == "png"


@pytest.mark.ray
def test_manifest_past_the_file_limit_keeps_block_digests_and_still_verifies(ray_session, cvae_dir, tmp_path,
                                                                             monkeypatch):
    """With more files than MANIFEST_FILES_LIMIT the manifest lists none (its size is O(blocks)); verify_files
    walks the markers, each pinned by its block's digest, and catches a damaged file and a forged marker."""
    monkeypatch.setattr(batch_job, "MANIFEST_FILES_LIMIT", 50)
    out = tmp_path / "gen"
    run_generation(request(cvae_dir, out))  # 200 PNG files + 7 Parquet files (blocks of 60 span 2, 2, 2, 1 classes)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "files" not in manifest and manifest["files_listed_in"] == "_blocks/block-NNNNNN.json"
    assert manifest["num_files"] == 200 + 7 and len(manifest["block_digests"]) == 4
    assert [d["index"] for d in manifest["block_digests"]] == [0, 1, 2, 3]
    assert verify_files(out) == []

    png = sorted((out / "images" / "1").glob("*.png"))[3]
    original = png.read_bytes()
    png.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert verify_files(out) == [str(png.relative_to(out))]
    png.write_bytes(original)

    marker = out / "_blocks" / "block-000002.json"
    forged = json.loads(marker.read_text())
    forged["files"][0]["sha256"] = "0" * 64
    marker.write_text(json.dumps(forged))
    assert verify_files(out) == ["_blocks/block-000002.json"]


@pytest.mark.ray
@pytest.mark.slow
def test_200k_samples_as_shards_have_exact_counts_and_a_bounded_manifest(ray_session, tmp_path):
    """200,000 samples in 200 blocks: every sample once, per-class counts exact, and a manifest of a few
    hundred bytes per block (not per sample)."""
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), backbone="mlp", latent_dim=2, hidden_dim=16, num_classes=10)
    model_dir = str(vaemodels.save_model(model, tmp_path / "model"))
    out = tmp_path / "gen"
    result = run_generation(request(model_dir, out, per_class=20_000, block_size=1000, batch_size=1000,
                                    image_format="shards"))
    assert result["total"] == 200_000 and result["per_class"] == {str(k): 20_000 for k in range(10)}
    size = (out / "manifest.json").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["blocks"] == 200 and len(manifest["block_digests"]) == 200
    assert size < 200 * 1200, size  # per block: a digest, a shard and a Parquet file entry or two
    ids = pd.read_parquet(out / "parquet", columns=["id", "sample_index"])
    assert len(ids) == 200_000 and ids["id"].is_unique
    assert np.array_equal(np.sort(ids["sample_index"].to_numpy()), np.arange(200_000))
    tars = sorted(str(p) for p in (out / "images").glob("*.tar"))
    assert len(tars) == 200
    import webdataset as wds

    labels = Counter(int(s["cls"]) for s in wds.WebDataset(tars, shardshuffle=False))
    assert labels == {k: 20_000 for k in range(10)}
