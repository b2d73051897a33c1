"""Table datasets (issue 15): every column kind survives build -> encode -> decode, the manifest says
what the dataset is, shards are reproducible and verified, the per-rank reader contract holds for
Parquet shards, and bad tables fail with one line and exit 2."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.cli import main
from pipelines.data import BuildConfig, SourceError, build_dataset, make_loader, open_stream, read_manifest, verify_shards
from pipelines.data.reader import ReaderConfig, batches_per_epoch
from pipelines.data.table_reader import TableStream, read_table_shard
from pipelines.data.table_transform import decode, encode


def mixed_table(n=240, seed=0):
    """Every column kind: floats with missing values, ints, strings with missing values, booleans,
    nullable booleans, and a rare label (1 in 6)."""
    rng = np.random.default_rng(seed)
    bimodal = np.where(rng.random(n) < 0.5, rng.normal(-5, 1, n), rng.normal(20, 2, n)).round(3)
    frame = pd.DataFrame({
        "amount": np.where(rng.random(n) < 0.2, np.nan, bimodal),
        "count": rng.integers(0, 50, n).astype(np.int64),
        "city": pd.Series(rng.choice(["oslo", "rome", "lima"], n), dtype=object).where(rng.random(n) > 0.1, None),
        "flag": rng.random(n) < 0.3,
        "maybe": pd.array([None if r < 0.15 else bool(r > 0.6) for r in rng.random(n)], dtype="boolean"),
        "fraud": np.where(np.arange(n) % 6 == 0, "yes", "no"),
    })
    return frame


@pytest.fixture
def table_file(tmp_path):
    path = tmp_path / "records.parquet"
    mixed_table().to_parquet(path)
    return path


def build(path, out, **kwargs):
    return build_dataset(BuildConfig(f"parquet:{path}", str(out), label="fraud", **kwargs))


def test_build_writes_a_table_manifest_and_verified_parquet_shards(table_file, tmp_path):
    manifest = build(table_file, tmp_path / "ds", shard_size=50, val_fraction=0.25)
    assert manifest["modality"] == "table" and "image_shape" not in manifest
    kinds = {c["name"]: (c["kind"], c["nullable"]) for c in manifest["table"]["columns"]}
    assert kinds == {"amount": ("continuous", True), "count": ("continuous", False), "city": ("categorical", True),
                     "flag": ("boolean", False), "maybe": ("boolean", True)}
    assert manifest["class_names"] == ["no", "yes"]
    assert manifest["splits"]["train"]["num_samples"] == 180 and manifest["splits"]["val"]["num_samples"] == 60
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [50, 50, 50, 30]
    amount = next(c for c in manifest["table"]["columns"] if c["name"] == "amount")
    assert len(amount["modes"]["means"]) >= 2  # the bimodal column got (at least) its two modes
    loaded = read_manifest(tmp_path / "ds")
    assert loaded.modality == "table" and loaded.model_input is loaded.data["table"]
    assert verify_shards(loaded) == []
    # byte-reproducible: the same table, seed and options give the same shards
    again = build(table_file, tmp_path / "ds2", shard_size=50, val_fraction=0.25)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in manifest["splits"]["train"]["shards"]]


def test_every_column_kind_round_trips_with_its_dtype_and_missing_values(table_file, tmp_path):
    build(table_file, tmp_path / "ds", shard_size=1000, val_fraction=0.0)
    manifest = read_manifest(tmp_path / "ds")
    spec = manifest.data["table"]
    stored = read_table_shard(manifest.shards("train")[0].url)
    original = mixed_table().iloc[stored[spec["index_column"]]].reset_index(drop=True)
    back = decode(encode(stored, spec["columns"]), spec["columns"])
    assert list(back.columns) == ["amount", "count", "city", "flag", "maybe"]
    assert back["count"].dtype == np.int64 and (back["count"] == original["count"]).all()
    assert back["flag"].dtype == bool and (back["flag"] == original["flag"]).all()
    assert str(back["maybe"].dtype) == "boolean"
    assert back["maybe"].isna().equals(original["maybe"].isna())
    assert (back["maybe"].dropna() == original["maybe"].dropna()).all()
    assert back["city"].isna().equals(original["city"].isna())
    assert (back["city"].dropna() == original["city"].dropna()).all()
    assert back["amount"].dtype == np.float64
    assert back["amount"].isna().equals(original["amount"].isna())
    np.testing.assert_allclose(back["amount"].dropna(), original["amount"].dropna(), atol=1e-3)


def test_an_unseen_category_encodes_as_no_category_and_is_never_generated(table_file, tmp_path):
    manifest = build(table_file, tmp_path / "ds", val_fraction=0.0)
    columns = manifest["table"]["columns"]
    frame = mixed_table(4).assign(city=["paris", "oslo", None, "rome"])
    encoded = encode(frame, columns)
    city = next(c for c in columns if c["name"] == "city")
    start = sum(1 + len(c["modes"]["means"]) + c["nullable"] if c["kind"] == "continuous"
                else len(c["categories"]) + c["nullable"] for c in columns[:columns.index(city)])
    group = encoded[:, start:start + len(city["categories"]) + 1]
    assert group[0].sum() == 0  # paris: no slot, so it adds nothing to the loss
    assert group[1:].sum(1).tolist() == [1, 1, 1]
    decoded = decode(encoded, columns)["city"]
    assert decoded[0] in city["categories"]  # decoding only ever gives a category the transformer knows
    assert decoded[1] == "oslo" and decoded[2] is None and decoded[3] == "rome"


@pytest.mark.parametrize("world, workers", [(2, 0), (3, 2)])
def test_every_rank_gets_the_same_number_of_batches_and_disjoint_rows(table_file, tmp_path, world, workers):
    build(table_file, tmp_path / "ds", shard_size=20, val_fraction=0.0)
    manifest = read_manifest(tmp_path / "ds")
    config = ReaderConfig(batch_size=8, num_loader_workers=workers, shuffle_buffer=16, seed=3)
    seen, counts = [], []
    for rank in range(world):
        loader = make_loader(manifest, "train", config, rank=rank, world_size=world, epoch=1)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == batches_per_epoch(loader)
        assert all(b["row"].shape == (8, batches[0]["row"].shape[1]) and b["row"].dtype == torch.float32
                   for b in batches)
        seen.append(torch.cat([b["index"] for b in batches]).tolist())
    assert len(set(counts)) == 1 and counts[0] > 0
    flat = [i for rank in seen for i in rank]
    assert len(flat) == len(set(flat))  # no row read by two ranks in one epoch


def test_the_reader_yields_labels_matching_the_label_column(table_file, tmp_path):
    build(table_file, tmp_path / "ds", shard_size=1000, val_fraction=0.0)
    manifest = read_manifest(tmp_path / "ds")
    stream = open_stream(manifest, "train", shuffle_buffer=0)
    assert isinstance(stream, TableStream)
    table = mixed_table()
    for sample in stream:
        assert manifest.class_names[int(sample["label"])] == table["fraud"][int(sample["index"])]


def test_old_image_manifests_without_modality_still_read(digits_dataset):
    manifest = read_manifest(digits_dataset)
    assert "modality" not in manifest.data
    assert manifest.modality == "image" and manifest.model_input == (1, 8, 8)


def test_a_manifest_of_unknown_modality_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "modality": "audio",
                                                        "class_names": [], "splits": {}}))
    with pytest.raises(ValueError, match="modality 'audio'"):
        read_manifest(tmp_path)


def test_column_types_override_inference_and_drop_columns(table_file, tmp_path):
    manifest = build(table_file, tmp_path / "ds", column_types=("count=categorical", "maybe=drop"))
    kinds = {c["name"]: c["kind"] for c in manifest["table"]["columns"]}
    assert kinds["count"] == "categorical" and "maybe" not in kinds


def test_builtin_student_placements_is_mixed_type(tmp_path):
    manifest = build_dataset(BuildConfig("student_placements", str(tmp_path / "sp"), val_fraction=0.2))
    kinds = {c["kind"] for c in manifest["table"]["columns"]}
    assert kinds == {"continuous", "categorical", "boolean"}
    assert any(c["nullable"] for c in manifest["table"]["columns"])  # salary is missing for unplaced students
    assert manifest["table"]["label"] == "placed" and manifest["class_names"] == ["False", "True"]
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["val"]["num_samples"] == 215


# -- bad input: one line naming the problem, exit 2 ------------------------------------------------

def one_line_error(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.startswith("vaepipe: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_label_column_is_one_line_and_exit_2(table_file, tmp_path, capsys):
    line = one_line_error(capsys, "data", "build", "--source", f"parquet:{table_file}", "--label", "fraudd",
                          "--out", str(tmp_path / "ds"))
    assert "--label 'fraudd' is not a column" in line and "fraud" in line
    assert not (tmp_path / "ds").exists()


def test_a_column_of_mixed_types_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "mixed.csv"
    pd.DataFrame({"x": ["1", "2", "abc", "4"] * 5, "y": [0, 1] * 10}).to_csv(path, index=False)
    line = one_line_error(capsys, "data", "build", "--source", f"csv:{path}", "--label", "y",
                          "--out", str(tmp_path / "ds"))
    assert "column 'x' mixes types" in line and "--column-types x=categorical" in line
    # the suggested override works
    assert main(["data", "build", "--source", f"csv:{path}", "--label", "y", "--out", str(tmp_path / "ds"),
                 "--column-types", "x=categorical"]) == 0


def test_a_table_without_label_and_an_image_source_with_label_are_refused(table_file, tmp_path, capsys):
    assert "--label COLUMN" in one_line_error(capsys, "data", "build", "--source", f"parquet:{table_file}",
                                              "--out", str(tmp_path / "a"))
    assert "--label and --column-types are for tables" in one_line_error(
        capsys, "data", "build", "--source", "digits", "--label", "x", "--out", str(tmp_path / "b"))


def test_a_missing_label_value_and_a_bad_column_type_are_refused(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": ["a", None, "b"]}).to_csv(path, index=False)
    with pytest.raises(SourceError, match="missing values"):
        build_dataset(BuildConfig(f"csv:{path}", str(tmp_path / "ds"), label="y"))
    with pytest.raises(SourceError, match="NAME=KIND"):
        build_dataset(BuildConfig(f"csv:{path}", str(tmp_path / "ds"), label="x", column_types=("y=text",)))


def test_a_damaged_table_shard_is_counted_and_fails_past_max_bad_fraction(table_file, tmp_path):
    from pipelines.data import DataReadError

    build(table_file, tmp_path / "ds", shard_size=60, val_fraction=0.0)
    manifest = read_manifest(tmp_path / "ds")
    shard = manifest.shards("train")[1]
    with open(shard.url, "r+b") as f:
        f.truncate(100)
    assert verify_shards(manifest) == [shard.name]
    with pytest.raises(DataReadError, match="shard-000001"):
        list(open_stream(manifest, "train", shuffle_buffer=0, max_bad_fraction=0.05))


def test_verify_counts_rows_and_checks_the_order_of_table_shards(table_file, tmp_path, capsys):
    build(table_file, tmp_path / "ds", shard_size=40, val_fraction=0.25)
    assert main(["data", "verify", str(tmp_path / "ds"), "--count", "--check-order"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ok"] and result["counted"] == {"train": 180, "val": 60}
    assert result["class_sorted"] is False  # rows are written in a seeded shuffled order
