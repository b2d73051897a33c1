"""Shards of a class-sorted source are a fair class mix (issue 17): per shard, per reader batch on 1
and 2 ranks, and `vaepipe data verify --check-order` tells an old, class-sorted dataset apart.

Tolerances: with 10 equally likely classes, the total-variation distance between the class
histogram of n i.i.d. draws and the true one averages about 0.106 for n = 128 and 0.075 for
n = 200; class-sorted windows sit near 0.8-0.9. The thresholds below (0.25 per batch, 0.2 per
shard) are ~2.5x the i.i.d. expectation and far below the sorted value, on fixed seeds.
"""
import json

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.data import BuildConfig, ReaderConfig, build_dataset, make_loader, read_manifest
from pipelines.data import build as build_module
from pipelines.data.order import check_order, order_report, shard_labels

NUM_CLASSES, PER_CLASS = 10, 200


def total_variation(labels, reference_share):
    hist = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return 0.5 * float(np.abs(hist - reference_share).sum())


@pytest.fixture(scope="module")
def sorted_npz(tmp_path_factory):
    """2,000 8x8 images whose labels come sorted: 200 zeros, then 200 ones, ..."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    x = (rng.random((len(y), 8, 8)) * 40 + y[:, None, None] * 20).astype(np.uint8)
    path = tmp_path_factory.mktemp("order") / "sorted.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def mixed_dataset(sorted_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("order") / "mixed"
    build_dataset(BuildConfig(f"npz:{sorted_npz}", str(out), shard_size=200, val_fraction=0.1, seed=0))
    return out


@pytest.fixture(scope="module")
def class_sorted_dataset(sorted_npz, tmp_path_factory):
    """The same source built the way vaepipe did before issue 17: each split's indices sorted."""
    out = tmp_path_factory.mktemp("order") / "sorted"
    patch = pytest.MonkeyPatch()
    old_split = build_module.split_indices
    patch.setattr(build_module, "split_indices",
                  lambda n, f, s: {k: np.sort(v) for k, v in old_split(n, f, s).items()})
    try:
        build_dataset(BuildConfig(f"npz:{sorted_npz}", str(out), shard_size=200, val_fraction=0.1, seed=0))
    finally:
        patch.undo()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["sample_order"]  # as written before the key existed
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_every_shard_holds_the_split_class_mix(mixed_dataset):
    manifest = read_manifest(str(mixed_dataset))
    assert manifest.data["sample_order"]["shuffled"] is True
    per_shard = shard_labels(manifest, "train")
    assert len(per_shard) == 9 and sum(map(len, per_shard)) == 1800
    share = np.bincount(np.concatenate(per_shard), minlength=NUM_CLASSES) / 1800
    worst = max(total_variation(labels, share) for labels in per_shard)
    assert worst < 0.2, worst
    report = order_report(per_shard)
    assert not report.class_sorted
    assert 0.8 < report.label_change_ratio < 1.2 and report.shard_homogeneity_p > 1e-3


def test_class_sorted_shards_are_detected(class_sorted_dataset):
    report = check_order(read_manifest(str(class_sorted_dataset)))
    assert report["train"]["class_sorted"] and report["val"]["class_sorted"]
    assert report["train"]["label_change_ratio"] < 0.05
    assert report["train"]["shard_homogeneity_p"] < 1e-100


def test_unlabelled_or_single_class_splits_have_nothing_to_check():
    assert order_report([np.full(50, -1), np.full(50, -1)]) is None
    assert order_report([np.zeros(50, dtype=np.int64)]) is None


@pytest.mark.parametrize("world_size", [1, 2])
def test_reader_batches_hold_the_split_class_mix(mixed_dataset, world_size):
    share = np.full(NUM_CLASSES, 1 / NUM_CLASSES)
    distances = []
    for rank in range(world_size):
        loader = make_loader(str(mixed_dataset), "train", ReaderConfig(batch_size=128, seed=3), rank, world_size)
        distances += [total_variation(batch["label"].numpy(), share) for batch in loader]
    assert len(distances) == (1800 // 128 if world_size == 1 else 2 * (900 // 128))
    assert max(distances) < 0.25, distances


def test_reader_mixes_across_class_sorted_shards(class_sorted_dataset):
    """Old datasets still train on mixed batches: several shards are read at once per slot."""
    def classes_per_batch(open_shards):
        config = ReaderConfig(batch_size=60, shuffle_buffer=0, open_shards=open_shards, seed=1)
        return [len(set(b["label"].tolist())) for b in make_loader(str(class_sorted_dataset), "train", config)]

    one_at_a_time, four_at_once = classes_per_batch(1), classes_per_batch(4)
    assert np.median(one_at_a_time) <= 2
    assert np.median(four_at_once) >= 4


def test_same_seed_same_bytes_for_a_shuffled_build(sorted_npz, tmp_path):
    def sums(name, seed):
        manifest = build_dataset(BuildConfig(f"npz:{sorted_npz}", str(tmp_path / name), shard_size=500, seed=seed))
        return [s["sha256"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]

    assert sums("a", 0) == sums("b", 0) != sums("c", 1)


def test_cli_verify_check_order(mixed_dataset, class_sorted_dataset, capsys):
    assert main(["data", "verify", str(mixed_dataset), "--check-order"]) == 0
    out = capsys.readouterr()
    mixed = json.loads(out.out.strip().splitlines()[-1])
    assert mixed["ok"] and mixed["class_sorted"] is False and "sorted by class" not in out.err
    assert main(["data", "verify", str(class_sorted_dataset), "--check-order"]) == 0
    out = capsys.readouterr()
    old = json.loads(out.out.strip().splitlines()[-1])
    assert old["class_sorted"] is True and old["order"]["train"]["class_sorted"] is True
    assert "sorted by class" in out.err and "rebuild" in out.err
    assert "built before shards were shuffled" in out.err
