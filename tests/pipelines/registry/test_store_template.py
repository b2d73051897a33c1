"""New SQLite stores start as a copy of an empty store MLflow's migrations built once per version."""
import sqlite3

from pipelines.registry import tracking


def _revision(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchall()


def test_new_store_is_copied_from_one_template_and_is_a_working_mlflow_store(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAEPIPE_CACHE_DIR", str(cache))
    run_a = tracking.start_run(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "exp", "r", {"x": 1}, {"t": "v"})
    templates = sorted(cache.glob("mlflow-*-empty.db"))
    assert len(templates) == 1 and list(cache.glob(".*")) == []  # nothing staged is left behind
    built = templates[0].stat().st_mtime_ns

    store_b = tmp_path / "b" / "mlflow.db"
    run_b = tracking.start_run(f"sqlite:///{store_b}", "exp", "r", {"x": 2}, {})
    assert templates[0].stat().st_mtime_ns == built  # reused, not rebuilt
    assert _revision(store_b) == _revision(templates[0]) and len(_revision(store_b)) == 1
    client = tracking.connect(f"sqlite:///{store_b}", must_exist=True)
    assert client.get_run(run_b).data.params == {"x": "2"}
    # the template stays empty: the runs went to the stores, not to the shared copy
    with sqlite3.connect(templates[0]) as db:
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    assert run_a != run_b
    assert not list((tmp_path / "b").glob(".*.seed"))


def test_a_broken_template_is_rebuilt_not_copied(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VAEPIPE_CACHE_DIR", str(cache))
    tracking.connect(f"sqlite:///{tmp_path / 'first.db'}")
    (template,) = cache.glob("mlflow-*-empty.db")
    template.write_bytes(b"not a database")
    assert not tracking._is_migrated_store(template)

    run_id = tracking.start_run(f"sqlite:///{tmp_path / 'second.db'}", "exp", "r", {}, {})
    assert tracking._is_migrated_store(template)
    assert tracking.connect(f"sqlite:///{tmp_path / 'second.db'}", must_exist=True).get_run(run_id)


def test_an_existing_store_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    run_id = tracking.start_run(f"sqlite:///{store}", "exp", "r", {"keep": "me"}, {})
    assert tracking.seed_sqlite_store(store) is False  # os.link refuses an existing path
    assert tracking.connect(f"sqlite:///{store}").get_run(run_id).data.params == {"keep": "me"}


def test_an_unwritable_cache_falls_back_to_mlflow_building_the_store(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("VAEPIPE_CACHE_DIR", str(blocker / "cache"))
    store = tmp_path / "mlflow.db"
    assert tracking.seed_sqlite_store(store) is False and not store.exists()
    run_id = tracking.start_run(f"sqlite:///{store}", "exp", "r", {}, {})
    assert tracking.connect(f"sqlite:///{store}").get_run(run_id).info.run_id == run_id
