"""Series data: aeon's bundled GunPoint and CSV/Parquet tables (wide and long) become series shards with a
`"modality": "series"` manifest; the per-rank reader contract holds for them (equal, disjoint batches,
standardised windows); bad input is one line and exit 2."""
import json

import numpy as np
import pandas as pd
import pytest

from pipelines.cli import main
from pipelines.data import BuildConfig, ReaderConfig, ShardStream, make_loader, read_manifest, verify_shards
from pipelines.data.reader import batches_per_epoch, read_raw_samples
from pipelines.data.series import SeriesOptions, decode_window
from pipelines.data.series_build import SeriesBuildConfig, build_series_dataset


def build(source, out, options=SeriesOptions(), **kw):
    return build_series_dataset(SeriesBuildConfig(BuildConfig(source, str(out), **kw), options))


@pytest.fixture(scope="module")
def gunpoint(tmp_path_factory):
    """GunPoint (200 univariate series of 150 steps, 2 classes) as 4 train shards of 40 + 40 val windows."""
    out = tmp_path_factory.mktemp("series") / "gunpoint"
    build("aeon:GunPoint", out, shard_size=40, val_fraction=0.2)
    return out


def test_gunpoint_manifest_has_modality_shape_and_normalisation(gunpoint):
    manifest = read_manifest(gunpoint)
    assert manifest.modality == "series" and manifest.model_input == (1, 1, 150)
    assert manifest.class_names == ["1", "2"]
    assert (manifest.num_samples("train"), manifest.num_samples("val")) == (160, 40)
    assert [s.num_samples for s in manifest.shards("train")] == [40, 40, 40, 40]
    assert manifest.data["series"]["num_series"] == 200 and verify_shards(manifest) == []
    stats = manifest.data["series"]["normalisation"]
    assert len(stats["mean"]) == len(stats["std"]) == 1 and stats["std"][0] > 0


def test_series_build_is_byte_reproducible(gunpoint, tmp_path):
    build("aeon:GunPoint", tmp_path / "again", shard_size=40, val_fraction=0.2)
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["splits"] == \
        json.loads((gunpoint / "manifest.json").read_text())["splits"]


def test_two_ranks_by_two_workers_get_equal_disjoint_standardised_batches(gunpoint):
    per_rank = []
    for rank in range(2):
        loader = make_loader(str(gunpoint), "train", ReaderConfig(batch_size=8, num_loader_workers=2),
                             rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == batches_per_epoch(loader) == 10  # 160 / 4 slots = 40 per worker, 5 batches each
        assert all(b["image"].shape == (8, 1, 1, 150) for b in batches)
        per_rank.append(batches)
    indices = [{i for b in batches for i in b["index"].tolist()} for batches in per_rank]
    assert len(indices[0]) == len(indices[1]) == 80 and not indices[0] & indices[1]
    windows = np.concatenate([b["image"].numpy() for batches in per_rank for b in batches])
    assert abs(windows.mean()) < 0.05 and abs(windows.std() - 1) < 0.05  # the train split's statistics


def test_stored_windows_are_the_source_values(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 2.0, size=(12, 30)).astype(np.float32)
    frame = pd.DataFrame(values, columns=[f"t{i}" for i in range(30)])
    frame.insert(0, "label", ["a", "b", "c"] * 4)
    frame.to_csv(tmp_path / "wide.csv", index=False)
    manifest = build(f"csv:{tmp_path / 'wide.csv'}", tmp_path / "out", val_fraction=0.25)
    assert manifest["input_shape"] == [1, 1, 30] and manifest["class_names"] == ["a", "b", "c"]
    stored = {}
    for split in ("train", "val"):
        for shard in read_manifest(tmp_path / "out").shards(split):
            for sample in read_raw_samples(shard.url, []):
                stored[int(sample["__key__"])] = (decode_window(sample["npy"]), int(sample["cls"]))
    assert sorted(stored) == list(range(12))
    for i, (window, label) in stored.items():
        np.testing.assert_array_equal(window[0], values[i])
        assert label == i % 3


def test_long_parquet_multivariate_with_windows(tmp_path):
    rows = []
    for sid in range(6):  # 6 series of 40..65 steps, 2 channels, shuffled time order
        length = 40 + 5 * sid
        for t in np.random.default_rng(sid).permutation(length):
            rows.append({"series_id": sid, "time": int(t), "label": "up" if sid % 2 else "down",
                         "x": float(t), "y": float(sid)})
    pd.DataFrame(rows).to_parquet(tmp_path / "long.parquet")
    options = SeriesOptions(layout="long", time_column="time", window=20, stride=10)
    manifest = build(f"parquet:{tmp_path / 'long.parquet'}", tmp_path / "out", options, val_fraction=0.34)
    assert manifest["input_shape"] == [2, 1, 20] and manifest["series"]["channel_names"] == ["x", "y"]
    # windows per series: floor((L - 20) / 10) + 1 for L = 40, 45, ..., 65
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == sum((40 + 5 * s - 20) // 10 + 1
                                                                             for s in range(6))
    seen = {}
    for split in ("train", "val"):
        for shard in read_manifest(tmp_path / "out").shards(split):
            for sample in read_raw_samples(shard.url, []):
                window = decode_window(sample["npy"])
                info = json.loads(sample["json"])
                # sorted by time: channel x counts up from the window's start; channel y is the series id
                np.testing.assert_array_equal(window[0], np.arange(info["start"], info["start"] + 20))
                assert set(window[1]) == {info["series"]}
                seen.setdefault(info["series"], set()).add(split)
    assert all(len(splits) == 1 for splits in seen.values())  # a series' windows never straddle splits


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, *capsys.readouterr()


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("vaepipe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_builds_gunpoint_and_prints_one_json_line(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "data", "build", "--source", "aeon:GunPoint", "--out", str(tmp_path / "gp"),
                           "--val-fraction", "0.25")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["modality"] == "series" and result["image_shape"] == [1, 1, 150]
    assert result["samples"] == {"train": 150, "val": 50}


def test_unequal_lengths_without_a_window_are_refused(tmp_path, capsys):
    frame = pd.DataFrame({"label": [0, 1, 0], "t0": [1.0, 2.0, 3.0], "t1": [1.0, 2.0, np.nan],
                          "t2": [1.0, np.nan, np.nan]})
    frame.to_csv(tmp_path / "ragged.csv", index=False)
    # csv:/parquet: without a series option are tables (--label): --layout wide says the file holds series
    code, _, err = run_cli(capsys, "data", "build", "--source", f"csv:{tmp_path / 'ragged.csv'}",
                           "--layout", "wide", "--out", str(tmp_path / "o"))
    assert code == 2
    line = one_error_line(err)
    assert "unequal lengths (1..3 steps)" in line and "--window" in line
    assert not (tmp_path / "o").exists()


def test_unknown_label_column_is_named(tmp_path, capsys):
    pd.DataFrame({"cls": [0, 1], "t0": [1.0, 2.0]}).to_csv(tmp_path / "w.csv", index=False)
    code, _, err = run_cli(capsys, "data", "build", "--source", f"csv:{tmp_path / 'w.csv'}", "--out",
                           str(tmp_path / "o"), "--label-column", "target")
    assert code == 2
    line = one_error_line(err)
    assert "--label-column 'target' is not a column" in line and "cls, t0" in line


@pytest.mark.parametrize("argv, needle", [
    (["--source", "aeon:NoSuchSet"], "not a classification set bundled with aeon"),
    (["--source", "shapes", "--window", "10"], "--window applies to series sources"),
    (["--source", "aeon:GunPoint", "--image-size", "8"], "--image-size applies to image sources"),
    (["--source", "aeon:GunPoint", "--window", "500"], "longer than every series"),
    (["--source", "aeon:GunPoint", "--stride", "5"], "--stride needs --window"),
])
def test_bad_series_flags_are_one_line(tmp_path, capsys, argv, needle):
    code, _, err = run_cli(capsys, "data", "build", *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert needle in one_error_line(err)


def test_a_series_with_two_labels_is_refused(tmp_path, capsys):
    pd.DataFrame({"series_id": [0, 0, 1, 1], "label": ["a", "b", "a", "a"], "v": [1.0, 2.0, 3.0, 4.0]}).to_csv(
        tmp_path / "l.csv", index=False)
    code, _, err = run_cli(capsys, "data", "build", "--source", f"csv:{tmp_path / 'l.csv'}", "--layout", "long",
                           "--out", str(tmp_path / "o"))
    assert code == 2
    assert "series 0" in one_error_line(err) and "has 2 labels" in err


def test_image_manifests_without_modality_still_read(tmp_path):
    from pipelines.data import build_dataset

    build_dataset(BuildConfig("digits", str(tmp_path / "d"), limit=50))
    manifest = read_manifest(tmp_path / "d")
    assert "modality" not in manifest.data and manifest.modality == "image"
    assert manifest.model_input == manifest.image_shape == (1, 8, 8)
    assert next(iter(ShardStream(manifest, "train")))["image"].shape == (1, 8, 8)


def test_training_an_image_family_on_series_is_refused_naming_the_fitting_ones(gunpoint, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", str(gunpoint), "--model", "cvae", "--workers", "0",
                           "--storage", str(tmp_path / "runs"))
    assert code == 2
    line = one_error_line(err)
    assert "built for image data" in line and "holds series data" in line and "timevae, ctimevae" in line
