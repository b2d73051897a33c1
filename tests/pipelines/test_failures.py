"""Failure paths users meet (issue 13): each test feeds one bad input or fault to real code (real
files, a real MLflow SQLite store, a dead port for an unreachable server) and asserts what the user
gets: the exit status, one line naming the problem, and data that is left untouched. The table in
docs/failure-modes.md names these tests; keep the two in step."""
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaemodels
from pipelines.cli import main
from pipelines.data import BuildConfig, SourceError, build_dataset, read_manifest, verify_shards
from pipelines.data.build import remove_stale_staging
from tests.conftest import free_port


def tree(folder):
    """Every file under `folder` with its bytes: equal before and after means untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_cli(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *needles):
    lines = [line for line in err.strip().splitlines() if line.startswith("vaepipe: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def photos(tmp_path):
    """A user's image folder: classes china/ and flower/, four 8x8 RGB JPEG-free PNGs each."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("china", "flower"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# -- 1: --overwrite never destroys data vaepipe did not write -------------------------------------

@pytest.mark.parametrize("where", ["source", "parent", "inside"])
def test_build_refuses_out_that_is_holds_or_sits_in_the_source(photos, capsys, where):
    before = tree(photos.parent)
    out = {"source": photos, "parent": photos.parent, "inside": photos / "shards"}[where]
    code, _, err = run_cli(capsys, "data", "build", "--source", f"imagefolder:{photos}", "--out", str(out),
                           "--overwrite")
    assert code == 2
    assert_one_line_error(err, str(out))
    assert "--overwrite" not in err.split("error:")[1]
    assert tree(photos.parent) == before


def test_build_refuses_to_overwrite_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    (mine / "manifest.json").write_text('{"name": "not ours"}')  # a manifest, but not a vaepipe one
    code, _, err = run_cli(capsys, "data", "build", "--source", "digits", "--out", str(mine), "--limit", "50",
                           "--overwrite")
    assert code == 2
    assert_one_line_error(err, "holds no vaepipe dataset", "choose a new or empty folder")
    assert "pass --overwrite" not in err
    assert tree(mine) == {"chapter1.tex": b"years of work", "manifest.json": b'{"name": "not ours"}'}
    # without --overwrite the message does not suggest it either
    code, _, err = run_cli(capsys, "data", "build", "--source", "digits", "--out", str(mine), "--limit", "50")
    assert code == 2 and "pass --overwrite" not in err


def test_overwrite_replaces_only_a_pure_vaepipe_dataset(tmp_path):
    out = tmp_path / "ds"
    build_dataset(BuildConfig("digits", str(out), limit=100))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SourceError, match="also notes.txt"):
        build_dataset(BuildConfig("digits", str(out), limit=50, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and read_manifest(str(out)).num_samples("train") == 90
    (out / "notes.txt").unlink()
    build_dataset(BuildConfig("digits", str(out), limit=50, overwrite=True))
    assert read_manifest(str(out)).num_samples("train") == 45
    empty = tmp_path / "empty"
    empty.mkdir()
    build_dataset(BuildConfig("digits", str(empty), limit=50))  # an empty folder needs no --overwrite
    assert read_manifest(str(empty)).num_samples("train") == 45


# -- 9: a built dataset is readable by others ----------------------------------------------------

def test_built_dataset_has_umask_permissions_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        build_dataset(BuildConfig("digits", str(tmp_path / "ds"), limit=50))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ds" / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ds" / "train").stat().st_mode) == 0o755


# -- 8: --image-size bound; staging folders of killed builds --------------------------------------

def test_huge_image_size_is_refused_with_a_memory_estimate(tmp_path, capsys):
    started = time.time()
    code, _, err = run_cli(capsys, "data", "build", "--source", "digits", "--out", str(tmp_path / "o"),
                           "--image-size", "100000")
    assert code == 2 and time.time() - started < 5
    assert_one_line_error(err, "--image-size 100000 is too large", "GiB", "at most 4096")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_stale_staging_is_removed_only_when_ours_and_its_build_is_dead(tmp_path):
    out = tmp_path / "ds"
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        folders = {
            "dead": tmp_path / f".ds.building-{host}-{dead.pid}-abc123_x",
            "dead_old": tmp_path / f".ds.old-{host}-{dead.pid}",
            "alive": tmp_path / f".ds.building-{host}-{alive.pid}-def456",
            "other_host": tmp_path / f".ds.building-elsewhere-{dead.pid}-ghi789",
            "other_name": tmp_path / f".dsx.building-{host}-{dead.pid}-jkl012",
            "user": tmp_path / ".ds.building-notes",
        }
        for folder in folders.values():
            folder.mkdir()
            (folder / "f").write_text("x")
        removed = remove_stale_staging(out)
        assert sorted(removed) == sorted([folders["dead"], folders["dead_old"]])
        assert {k for k, f in folders.items() if f.exists()} == {"alive", "other_host", "other_name", "user"}
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
def test_killed_build_leaves_staging_that_the_next_build_removes(tmp_path):
    out = tmp_path / "shapes"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "data", "build", "--source", "shapes",
                             "--out", str(out), "--limit", "20000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".shapes.building-*/train")):
        assert proc.poll() is None and time.time() < deadline, "the build never started writing"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert len(list(tmp_path.glob(".shapes.building-*"))) == 1 and not out.exists()
    build_dataset(BuildConfig("shapes", str(out), limit=100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


# -- 6, 10: sources ------------------------------------------------------------------------------

def test_empty_class_folder_is_named(photos, tmp_path, capsys):
    (photos / "dragon").mkdir()
    code, _, err = run_cli(capsys, "data", "build", "--source", f"imagefolder:{photos}", "--out",
                           str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(err, "'dragon'", "hold no PNG/JPEG images")
    assert not (tmp_path / "o").exists()


def test_corrupt_npz_is_named(tmp_path, capsys):
    np.savez(tmp_path / "good.npz", x=np.zeros((4, 4, 4), np.uint8))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "data", "build", "--source", f"npz:{tmp_path / 'bad.npz'}", "--out",
                           str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(err, "bad.npz", "cannot be read")


def test_partly_labelled_npz_keeps_minus_one_as_unlabelled(tmp_path):
    y = np.array([0, 1, -1, 2, -1, 0, 1, 2, -1, -1])
    np.savez(tmp_path / "p.npz", x=np.arange(10 * 16, dtype=np.uint8).reshape(10, 4, 4), y=y)
    manifest = build_dataset(BuildConfig(f"npz:{tmp_path / 'p.npz'}", str(tmp_path / "o"), val_fraction=0.0))
    assert manifest["class_names"] == ["0", "1", "2"]
    from pipelines.data import ShardStream

    labels = {int(s["index"]): int(s["label"]) for s in ShardStream(str(tmp_path / "o"), "train", shuffle_buffer=0)}
    assert [labels[i] for i in range(10)] == y.tolist()
    np.savez(tmp_path / "q.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, -2, 1]))
    with pytest.raises(SourceError, match="or -1 for an unlabelled sample"):
        build_dataset(BuildConfig(f"npz:{tmp_path / 'q.npz'}", str(tmp_path / "q")))


# -- 11: checksum verifiers report damage --------------------------------------------------------

def test_verify_shards_reports_a_flipped_byte_and_a_missing_shard(tmp_path, capsys):
    out = tmp_path / "ds"
    build_dataset(BuildConfig("digits", str(out), limit=300, shard_size=100))
    assert verify_shards(read_manifest(str(out))) == []
    shard = out / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (out / "val" / "shard-000000.tar").unlink()
    assert verify_shards(read_manifest(str(out))) == ["train/shard-000001.tar", "val/shard-000000.tar"]
    code, out_line, _ = run_cli(capsys, "data", "verify", str(out))
    assert code == 1 and json.loads(out_line.strip().splitlines()[-1])["bad_shards"] == [
        "train/shard-000001.tar", "val/shard-000000.tar"]


# -- 7, 10: tracking URIs, names and flags: one line, exit 2, nothing created ---------------------

def test_unsupported_tracking_uri_scheme(capsys):
    code, _, err = run_cli(capsys, "register", "--run", "abc", "--name", "m", "--tracking-uri", "foo://bar")
    assert code == 2
    assert_one_line_error(err, "unsupported tracking URI 'foo://bar'", "sqlite:///PATH")


def test_mistyped_sqlite_store_is_refused_not_created(tmp_path, capsys):
    missing = tmp_path / "runs" / "mlflw.db"
    for argv in (["register", "--run", "abc", "--name", "m"], ["pull", "models:/m@champion", "--out",
                                                               str(tmp_path / "p")]):
        code, _, err = run_cli(capsys, *argv, "--tracking-uri", f"sqlite:///{missing}")
        assert code == 2
        assert_one_line_error(err, f"no MLflow store at {missing}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p").exists()


def test_invalid_registered_model_name(tmp_path, capsys):
    code, _, err = run_cli(capsys, "register", "--run", "abc", "--name", "bad/name", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 2
    assert_one_line_error(err, "invalid registered model name 'bad/name'")


def test_generate_reads_the_tracking_uri_from_the_environment(tmp_path, capsys, monkeypatch):
    from pipelines.tracking import connect

    store = tmp_path / "mlflow.db"
    connect(f"sqlite:///{store}").search_experiments()  # an empty, existing store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    code, _, err = run_cli(capsys, "generate", "--model", "models:/nothing@champion", "--out",
                           str(tmp_path / "o"), "--num-samples", "10")
    assert code == 2
    assert_one_line_error(err, "no registered model named 'nothing'")  # it asked the store; no "needs --tracking-uri"


def test_missing_model_folder_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                           "--num-samples", "10")
    assert code == 2
    assert_one_line_error(err, "nope: no such folder")
    assert "config.json" not in err and not (tmp_path / "o").exists()


def test_data_flag_pointing_at_a_shard(digits_dataset, capsys):
    shard = next((Path(digits_dataset) / "train").glob("*.tar"))
    code, _, err = run_cli(capsys, "train", "--data", str(shard), "--model", "vae")
    assert code == 2
    assert_one_line_error(err, "is a file, not a dataset")


def test_infinite_beta_is_refused_by_the_parser(digits_dataset, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(digits_dataset), "--model", "beta_vae", "--beta", "inf"])
    assert exit_.value.code == 2 and "expected a finite number, got 'inf'" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "tune", "--data", str(digits_dataset), "--model", "beta_vae", "--beta", "1,nan")
    assert code == 2
    assert_one_line_error(err, "--beta expects a comma list of finite floats")


def test_tune_grid_over_a_param_the_family_lacks_is_refused_before_ray(digits_dataset, tmp_path, capsys):
    started = time.time()
    code, _, err = run_cli(capsys, "tune", "--data", str(digits_dataset), "--model", "vae", "--beta", "1,4",
                           "--storage", str(tmp_path / "runs"))
    assert code == 2 and time.time() - started < 10
    assert_one_line_error(err, "--beta: the 'vae' model has no parameter 'beta'", "beta_vae")
    assert not (tmp_path / "runs").exists()  # no MLflow store, no Tune folder: nothing started


# -- 4: an unreachable tracking server fails train fast ------------------------------------------

def test_train_with_an_unreachable_tracking_server_fails_fast(digits_dataset, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    code, out, err = run_cli(capsys, "train", "--data", str(digits_dataset), "--model", "vae", "--epochs", "1",
                             "--tracking-uri", dead, "--storage", str(tmp_path / "runs"))
    assert code == 2 and time.time() - started < 10
    assert_one_line_error(err, f"cannot reach the MLflow tracking server at {dead}")
    assert out == ""


def test_train_refuses_a_dataset_without_val_samples(tmp_path, capsys):
    build_dataset(BuildConfig("digits", str(tmp_path / "ds"), limit=200, val_fraction=0.0))
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "ds"), "--model", "vae",
                           "--storage", str(tmp_path / "runs"))
    assert code == 2
    assert_one_line_error(err, "has 0 val samples", "--val-fraction > 0")


# -- 5: evaluate refuses a partial generation and leaves no half-written --out --------------------

@pytest.fixture
def vae_folder(tmp_path):
    torch.manual_seed(0)
    model = vaemodels.build("vae", (1, 8, 8), backbone="mlp", latent_dim=4, hidden_dim=16)
    return vaemodels.save_model(model, tmp_path / "vae")


def test_evaluate_refuses_a_generation_without_success_marker(digits_dataset, vae_folder, tmp_path, capsys):
    partial = tmp_path / "synthetic"
    (partial / "parquet" / "label=0").mkdir(parents=True)
    (partial / "_request.json").write_text("{}")
    code, _, err = run_cli(capsys, "evaluate", "--model", str(vae_folder), "--data", str(digits_dataset),
                           "--out", str(tmp_path / "eval"), "--synthetic", str(partial))
    assert code == 2
    assert_one_line_error(err, "not a finished `vaepipe generate` output (no _SUCCESS)")
    assert not (tmp_path / "eval").exists()


def test_evaluate_failing_late_leaves_no_out(digits_dataset, vae_folder, tmp_path, capsys):
    broken = tmp_path / "synthetic"
    broken.mkdir()
    (broken / "_SUCCESS").write_text("")  # finished, yet without its parquet/: fails after the likelihood step
    code, _, err = run_cli(capsys, "evaluate", "--model", str(vae_folder), "--data", str(digits_dataset),
                           "--out", str(tmp_path / "eval"), "--synthetic", str(broken), "--iwae-k", "2",
                           "--iwae-subset", "8", "--max-real", "100", "--seeds", "1")
    assert code == 2
    assert_one_line_error(err, "no parquet/ folder")
    assert not (tmp_path / "eval").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep")
    code, _, _ = run_cli(capsys, "evaluate", "--model", str(vae_folder), "--data", str(digits_dataset),
                         "--out", str(kept), "--synthetic", str(broken), "--iwae-k", "2", "--iwae-subset", "8",
                         "--max-real", "100", "--seeds", "1")
    assert code == 2 and tree(kept) == {"mine.txt": b"keep"}
