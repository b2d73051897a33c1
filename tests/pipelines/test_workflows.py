"""The workflows written once (pipelines/workflows.py): a search that registers tags its parent run
with the name, a folder model is used as it is, a models:/ URI without a tracking URI is refused."""
import pytest

from pipelines import workflows


def test_search_and_register_tags_the_search_and_registers_the_best(monkeypatch):
    calls = []
    result = {"best": {"run_id": "best-run"}, "parent_run_id": "parent", "tracking_uri": "sqlite:///x.db"}
    monkeypatch.setattr(workflows, "run_search", lambda config: dict(result))
    monkeypatch.setattr(workflows, "set_run_tag", lambda *args: calls.append(("tag", *args)))
    monkeypatch.setattr(workflows, "register_run", lambda request: calls.append(("register", request)) or {"version": 1})

    class Config:
        class search:
            metric = "val_elbo"

    out = workflows.search_and_register(Config, "shapes-vae")
    assert calls[0] == ("tag", "sqlite:///x.db", "parent", workflows.REGISTER_AS_TAG, "shapes-vae")
    request = calls[1][1]
    assert (request.run_id, request.name, request.metric) == ("best-run", "shapes-vae", "val_elbo")
    assert out["registered"] == {"version": 1} and out["register_as"] == "shapes-vae"

    calls.clear()
    out = workflows.search_and_register(Config, None)
    assert calls == [] and out["registered"] is None


def test_pull_and_run_uses_a_folder_as_it_is(tmp_path):
    seen = {}

    class Config:
        @classmethod
        def from_dict(cls, data):
            seen.update(data)
            return data

    assert workflows.pull_and_run({"out": "o"}, Config, lambda config: {"ran": True}, model=str(tmp_path)) == {"ran": True}
    assert seen == {"out": "o", "model_dir": str(tmp_path)}
    with pytest.raises(ValueError, match="no such folder"):
        workflows.pull_and_run({}, Config, lambda config: {}, model=str(tmp_path / "missing"))


def test_a_registered_model_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="needs a tracking URI"):
        workflows.pull_and_generate({"model_uri": "models:/x@champion", "out": "o", "num_samples": 1})
