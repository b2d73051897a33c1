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
    from pipelines.data.build import remove_stale_staging

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
    from pipelines.registry.tracking import connect

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


def test_train_command_with_an_unreachable_server_fails_before_importing_torch(digits_dataset, tmp_path):
    """The whole process, as a user starts it: the check runs before torch and Ray are imported."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--data", str(digits_dataset),
                           "--model", "vae", "--tracking-uri", dead, "--storage", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and time.time() - started < 10, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"vaepipe: error: cannot reach the MLflow tracking server at {dead} (no answer within 5 s: "
        "<urlopen error [Errno 111] Connection refused>); start it or fix --tracking-uri"]


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


# -- 3, 11, 12: the registry on a real SQLite store (runs trained for a few steps) ----------------

def trained_run(uri, data, name, family="cvae", steps=2):
    """A short real training run in the store: per-epoch metrics, model/ (with dataset.json), figures/."""
    from pipelines.training.sessions import LocalSession
    from pipelines.registry.tracking import start_run
    from pipelines.training.config import TrainConfig
    from pipelines.training.loop import run_loop

    config = {"data": str(data), "name": name, "tracking": {"tracking_uri": uri, "experiment": "failures"},
              "model": {"name": family, "params": {"backbone": "mlp", "latent_dim": 4, "hidden_dim": 16}},
              "train": {"batch_size": 8, "epochs": 1, "max_steps_per_epoch": steps, "checkpoint_every": 1000}}
    run_id = start_run(uri, "failures", name, TrainConfig.from_dict(config).to_dict(),
                       {"dataset_sha256": read_manifest(str(data)).sha256()})
    run_loop({**config, "mlflow_run_id": run_id}, LocalSession())
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    return f"sqlite:///{folder / 'mlflow.db'}", folder


@pytest.mark.slow
def test_champion_gate_compares_full_precision_and_never_duplicates(store, digits_dataset):
    import mlflow

    from pipelines.registry.versions import RegisterRequest, register_run

    uri, _ = store
    a, b, c = (trained_run(uri, digits_dataset, n) for n in ("a", "b", "c"))
    client = mlflow.MlflowClient(uri)
    # values whose 6-digit rounding (-96.5769) lies above a: a marginally worse c beat the rounded tag
    for run_id, value in ((a, -96.57686), (b, -96.57686), (c, -96.5768605)):
        client.log_metric(run_id, "val_elbo", value, step=99)
    first = register_run(RegisterRequest(a, "gate", uri))
    assert first["version"] == 1 and first["decision"] == "promoted"

    again = register_run(RegisterRequest(a, "gate", uri))  # the same run: no duplicate, no promotion
    assert again["version"] == 1 and again["decision"] == "already_registered"
    assert [str(v.version) for v in client.search_model_versions("name = 'gate'")] == ["1"]

    tie = register_run(RegisterRequest(b, "gate", uri))
    assert tie["version"] == 2 and tie["decision"] == "kept_as_challenger" and "ties" in tie["reason"]
    worse = register_run(RegisterRequest(c, "gate", uri))
    assert worse["decision"] == "kept_as_challenger" and worse["champion_value"] == -96.57686
    assert str(client.get_model_version_by_alias("gate", "champion").version) == "1"
    assert float(client.get_model_version("gate", "3").tags["gate_value"]) == -96.5768605


@pytest.mark.slow
def test_rewritten_weights_and_checksums_are_caught_by_the_version_tag(store, digits_dataset, tmp_path):
    from pipelines.registry.versions import CHECKSUMS_FILE, RegisterRequest, RegistryError, file_checksums, pull, register_run

    uri, folder = store
    run_id = trained_run(uri, digits_dataset, "tamper")
    register_run(RegisterRequest(run_id, "tamper", uri))
    model_dir = next(folder.rglob(f"{run_id}/artifacts/model"))
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (model_dir / CHECKSUMS_FILE).write_text(json.dumps(file_checksums(model_dir), indent=2) + "\n")
    with pytest.raises(RegistryError, match="checksums.json does not match the digest recorded at registration"):
        pull("models:/tamper@champion", uri, tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_class_names_travel_from_image_folder_to_generated_folders(ray_session, store, tmp_path, capsys):
    import pyarrow.dataset as pads

    from pipelines.registry.versions import RegisterRequest, pull, register_run

    uri, _ = store
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("china", "flower"):
        (photos / name).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(photos / name / f"{i}.png")
    build_dataset(BuildConfig(f"imagefolder:{photos}", str(tmp_path / "ds"), val_fraction=0.25))
    run_id = trained_run(uri, tmp_path / "ds", "photos")
    registered = register_run(RegisterRequest(run_id, "photos", uri))
    _, info = pull("models:/photos@champion", uri, tmp_path / "pulled")
    assert info["class_names"] == ["china", "flower"]
    assert info["dataset_sha256"] == read_manifest(str(tmp_path / "ds")).sha256()
    import mlflow

    tags = mlflow.MlflowClient(uri).get_model_version("photos", str(registered["version"])).tags
    assert json.loads(tags["class_names"]) == ["china", "flower"]

    code, out, _ = run_cli(capsys, "generate", "--model", "models:/photos@champion", "--tracking-uri", uri,
                           "--out", str(tmp_path / "synthetic"), "--per-class", "25", "--workers", "1")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["total"] == 50
    images = tmp_path / "synthetic" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["china", "flower"]
    assert len(list((images / "china").glob("*.png"))) == 25
    table = pads.dataset(tmp_path / "synthetic" / "parquet", format="parquet", partitioning="hive").to_table()
    names = dict(zip(table.column("label").to_pylist(), table.column("class_name").to_pylist()))
    assert names == {0: "china", 1: "flower"}

    # a model folder without dataset.json (saved by hand, or registered before it existed): numbers
    bare = tmp_path / "bare"
    for name in ("config.json", "model.safetensors"):
        bare.mkdir(exist_ok=True)
        (bare / name).write_bytes((tmp_path / "pulled" / name).read_bytes())
    code, _, _ = run_cli(capsys, "generate", "--model", str(bare), "--out", str(tmp_path / "numbered"),
                         "--per-class", "5", "--workers", "1")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "numbered" / "images").iterdir()) == ["0", "1"]
    table = pads.dataset(tmp_path / "numbered" / "parquet", format="parquet", partitioning="hive").to_table()
    assert set(table.column("class_name").to_pylist()) == {None}


# -- 2: tune with checkpoints that fall mid-epoch -------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_tune_survives_mid_epoch_checkpoints(ray_session, digits_dataset, tmp_path):
    from pipelines.training.checkpoints import read_state
    from pipelines.training.search import run_search
    from pipelines.training.search_config import TuneConfig

    config = TuneConfig.from_dict({
        "base": {"data": str(digits_dataset), "storage": str(tmp_path / "runs"),
                 "model": {"name": "beta_vae", "params": {"backbone": "mlp", "hidden_dim": 16}},
                 # 8 steps per epoch, a checkpoint every 3: steps 3 and 6 report train metrics only
                 "train": {"batch_size": 32, "epochs": 2, "max_steps_per_epoch": 8, "checkpoint_every": 3}},
        "search": {"beta": [1.0], "latent_dim": [4]},
        "name": "mid-epoch",
    })
    result = run_search(config)
    [trial] = result["trials"]
    assert trial["status"] == "finished" and trial["error"] is None and trial["epochs_run"] == 2
    assert trial["val_elbo"] is not None and read_state(result["best"]["checkpoint"]).epoch == 2


# -- 11: a block counts as done by digest, not size -----------------------------------------------

@pytest.fixture(scope="module")
def cvae_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), num_classes=10, backbone="mlp", latent_dim=4, hidden_dim=16)
    return vaemodels.save_model(model, tmp_path_factory.mktemp("models") / "cvae")


@pytest.mark.slow
@pytest.mark.ray
def test_damaged_file_of_the_same_size_is_reported_and_rewritten(ray_session, cvae_folder, tmp_path):
    from pipelines.batch.job import verify_files
    from pipelines.batch.generate import GenerateConfig, run_generation

    config = GenerateConfig(model_dir=str(cvae_folder), out=str(tmp_path / "g"), per_class=5, block_size=10,
                            workers=1)
    run_generation(config)
    before = tree(tmp_path / "g")
    png = sorted((tmp_path / "g" / "images" / "3").glob("*.png"))[0]
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0x01
    png.write_bytes(bytes(data))
    assert verify_files(tmp_path / "g") == [str(png.relative_to(tmp_path / "g"))]
    (tmp_path / "g" / "_SUCCESS").unlink()  # as if the run had been interrupted before its end
    result = run_generation(config)
    assert result["blocks_written"] == 1
    assert verify_files(tmp_path / "g") == [] and tree(tmp_path / "g") == before


# -- 10: Ctrl-C on generate ----------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_on_generate_exits_130_with_one_line(cvae_folder, tmp_path):
    import signal

    out = tmp_path / "g"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(cvae_folder),
                             "--out", str(out), "--per-class", "2000", "--workers", "1", "--set", "block_size=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 180
    while not list((out / "_blocks").glob("block-*.json")) if (out / "_blocks").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, "generate never wrote a block"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "vaepipe: interrupted" and "Traceback" not in stderr
    # no result line (Ray may still print its own log lines on stdout), no completion marker
    assert not [line for line in stdout.splitlines() if line.startswith("{")] and not (out / "_SUCCESS").exists()


# -- beyond the list: concurrent and read-only outputs; the cluster entry points -----------------

def test_second_generate_into_a_folder_in_use_is_refused(cvae_folder, tmp_path, capsys):
    import fcntl

    from pipelines.batch.job import LOCK_NAME

    out = tmp_path / "g"
    out.mkdir()
    with open(out / LOCK_NAME, "a+") as held:  # what a running generate holds (the kernel drops it if it dies)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_cli(capsys, "generate", "--model", str(cvae_folder), "--out", str(out),
                               "--per-class", "5", "--workers", "1")
    assert code == 2
    assert_one_line_error(err, "is in use by another generate run")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line(cvae_folder, tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "generate", "--model", str(cvae_folder), "--out", str(locked / "g"),
                               "--per-class", "5", "--workers", "1")
        assert code == 2
        assert_one_line_error(err, "not writable")
        code, _, err = run_cli(capsys, "data", "build", "--source", "digits", "--out", str(locked / "d"),
                               "--limit", "50")
        assert code == 2
        assert_one_line_error(err, "Permission denied")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_generate_job_reads_the_tracking_uri_from_the_environment(tmp_path, capsys, monkeypatch):
    from jobs.generate import main as generate_job
    from pipelines.registry.tracking import connect

    store = tmp_path / "mlflow.db"
    connect(f"sqlite:///{store}").search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    config = {"model_uri": "models:/nothing@champion", "out": str(tmp_path / "o"), "num_samples": 10}
    assert generate_job(["--config-json", json.dumps(config)]) == 2
    err = capsys.readouterr().err
    assert "no registered model named 'nothing'" in err and "Traceback" not in err


def test_the_failure_table_names_every_test_here_and_only_tests_that_exist():
    """docs/failure-modes.md is kept current by these tests: each row names one that exists, and
    every failure test here has a row."""
    import re

    root = Path(__file__).resolve().parents[2]
    table = (root / "docs" / "failure-modes.md").read_text()
    named = set(re.findall(r"`(?:tests/[\w/]+\.py::)?(test_\w+)", table))
    sources = "".join((root / "tests" / "pipelines" / f).read_text()
                      for f in ("test_failures.py", "registry/test_registry.py", "data/test_build.py",
                                "registry/test_lineage.py", "data/test_tables.py", "data/test_series.py"))
    defined = set(re.findall(r"^def (test_\w+)", sources, re.M))
    assert named - defined == set()
    here = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    assert here - named == {"test_the_failure_table_names_every_test_here_and_only_tests_that_exist"}
