"""The streaming reader: exact, equal per-rank counts across ranks and loader workers, shuffling,
remote URLs, and corrupt data skipped with a count until a threshold."""
import functools
import http.server
import io
import json
import threading

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipelines.data import BuildConfig, DataReadError, ReaderConfig, ShardStream, build_dataset, make_loader
from pipelines.data.reader import batches_per_epoch


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    """1,600 train digits in 4 equal shards of 400, 197 val."""
    out = tmp_path_factory.mktemp("reader") / "digits"
    build_dataset(BuildConfig("digits", str(out), shard_size=400, val_fraction=197 / 1797))
    return out


def epoch_indices(dataset_dir, rank, world, workers, batch_size=20, epoch=0, **kw):
    loader = make_loader(str(dataset_dir), "train", ReaderConfig(batch_size=batch_size, num_loader_workers=workers, **kw),
                         rank=rank, world_size=world, epoch=epoch)
    batches = [b["index"].tolist() for b in loader]
    assert len(batches) == batches_per_epoch(loader)
    return batches


def test_two_ranks_by_two_loader_workers_split_evenly_and_exactly(digits_shards):
    per_rank = [epoch_indices(digits_shards, rank, 2, 2) for rank in range(2)]
    # 1,600 samples / (2 ranks x 2 workers) = 400 per worker, 800 per rank, 40 batches of 20
    assert [len(b) for b in per_rank] == [40, 40]
    flat = [sorted(i for batch in b for i in batch) for b in per_rank]
    assert [len(f) for f in flat] == [800, 800]
    assert not set(flat[0]) & set(flat[1])  # 4 shards over 4 slots: nobody reads another's shard
    assert len(set(flat[0]) | set(flat[1])) == 1600


def test_uneven_shards_still_give_equal_batches(digits_shards):
    # 1,600 samples over 3 ranks x 1 worker: 4 shards round-robin -> 800/400/400 naturally; quota 533 each
    counts = [sum(len(b) for b in epoch_indices(digits_shards, rank, 3, 0, batch_size=13)) for rank in range(3)]
    assert counts == [533 // 13 * 13] * 3


def test_more_slots_than_shards_strides_samples(tmp_path):
    build_dataset(BuildConfig("digits", str(tmp_path / "d"), shard_size=2000, val_fraction=0.0, limit=400))
    seen = [sorted(i for b in epoch_indices(tmp_path / "d", r, 2, 2, batch_size=10) for i in b) for r in range(2)]
    assert [len(s) for s in seen] == [200, 200] and not set(seen[0]) & set(seen[1])


def test_epochs_reshuffle_but_cover_the_same_samples(digits_shards):
    e0 = epoch_indices(digits_shards, 0, 1, 0, epoch=0)
    e0_again = epoch_indices(digits_shards, 0, 1, 0, epoch=0)
    e1 = epoch_indices(digits_shards, 0, 1, 0, epoch=1)
    assert e0 == e0_again  # seeded
    assert e0 != e1
    assert sorted(sum(e0, [])) == sorted(sum(e1, []))
    assert len(set(sum(e0, []))) == 1600


def test_batch_larger_than_a_worker_share_is_refused(digits_shards):
    with pytest.raises(DataReadError, match="fewer than batch_size"):
        make_loader(str(digits_shards), "train", ReaderConfig(batch_size=500, num_loader_workers=2), rank=0, world_size=2)


def test_reads_over_http(digits_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        stream = ShardStream(url, "val", shuffle_buffer=0)
        assert stream.shards[0].url.startswith("http://127.0.0.1")
        assert len(list(stream)) == 197
    finally:
        server.shutdown()


# -- corrupt data ---------------------------------------------------------------------------------

def copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_skipped_counted_and_named(digits_shards, tmp_path, capsys):
    data = copy_dataset(digits_shards, tmp_path / "d")
    shard = data / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 100 * 1024])  # cut mid-way
    stream = ShardStream(str(data), "train", shuffle_buffer=0, max_bad_fraction=0.5)
    count = sum(1 for _ in stream)
    assert count == 1600  # the quota is still met by cycling the readable shards
    err = capsys.readouterr().err
    assert "shard train/shard-000001.tar" in err and "unreadable" in err
    strict = ShardStream(str(data), "train", shuffle_buffer=0, max_bad_fraction=0.01)
    with pytest.raises(DataReadError, match="shard-000001.tar"):
        sum(1 for _ in strict)


def test_undecodable_image_is_skipped(tmp_path, capsys):
    out = tmp_path / "d"
    build_dataset(BuildConfig("digits", str(out), shard_size=100, val_fraction=0.0, limit=100))
    shard = out / "train" / "shard-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    broken_key = int(samples[5]["__key__"])
    with wds.TarWriter(str(shard)) as sink:
        for i, s in enumerate(samples):
            if i == 5:
                s["png"] = b"not a png"
            sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    manifest = json.loads((out / "manifest.json").read_text())
    stream = ShardStream(str(out), "train", shuffle_buffer=0, max_bad_fraction=0.05)
    got = [int(s["index"]) for s in stream]
    assert len(got) == 100 and broken_key not in got[:99]  # 99 good ones, then one cycled to fill the quota
    assert len(set(got)) == 99
    assert "1 of 100 samples unreadable" in capsys.readouterr().err
    assert manifest["splits"]["train"]["num_samples"] == 100


def test_decoded_shards_are_cached_across_epochs_with_the_same_samples(digits_shards, tmp_path, monkeypatch):
    """The second epoch reads no tar yet yields exactly what decoding would have, in the same order."""
    from pipelines.data import reader

    data = copy_dataset(digits_shards, tmp_path / "d")  # its own URLs: nothing cached for them yet
    opened = []
    real = reader.read_raw_samples
    monkeypatch.setattr(reader, "read_raw_samples", lambda url, errors: (opened.append(url), real(url, errors))[1])

    def epoch(e, **kw):
        loader = make_loader(str(data), "train", ReaderConfig(batch_size=20, **kw), epoch=e)
        return [(b["index"].tolist(), b["image"].sum().item()) for b in loader]

    uncached = [epoch(e, cache_bytes=0) for e in (0, 1)]
    assert len(opened) == 8  # 4 shards, twice
    opened.clear()
    cached = [epoch(e) for e in (0, 1, 1)]
    assert len(opened) == 4  # only the first epoch opened the shards
    assert cached == [uncached[0], uncached[1], uncached[1]]


def test_a_shard_read_with_errors_is_not_cached(tmp_path, capsys):
    from pipelines.data import reader

    out = tmp_path / "d"
    build_dataset(BuildConfig("digits", str(out), shard_size=100, val_fraction=0.0, limit=100))
    shard = out / "train" / "shard-000000.tar"
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as sink:
        for i, s in enumerate(samples):
            if i == 5:
                s["png"] = b"not a png"
            sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    for _ in range(2):  # warned on every pass: the broken shard is read again, never served from memory
        stream = ShardStream(str(out), "train", shuffle_buffer=0, cache_bytes=1 << 30)
        assert len(list(stream)) == 100
        assert "1 of 100 samples unreadable" in capsys.readouterr().err
    assert not [key for key in reader._CACHE.entries if key[0] == str(shard)]


def test_cache_keeps_to_its_byte_budget(digits_shards, tmp_path):
    from pipelines.data import reader

    data = copy_dataset(digits_shards, tmp_path / "d")
    one_shard = 400 * (8 * 8 * 4 + 8 + 8)  # image float32 + label + index int64
    stream = ShardStream(str(data), "train", shuffle_buffer=0, cache_bytes=reader._CACHE.nbytes + 2 * one_shard)
    assert len(list(stream)) == 1600
    assert len([key for key in reader._CACHE.entries if key[0].startswith(str(data))]) == 2
