import pytest

from pipelines.config import ConfigError, apply_overrides
from pipelines.train_config import TrainConfig


def test_defaults_and_nested_sections():
    cfg = TrainConfig.from_dict({"data": "x", "model": {"name": "beta_vae", "params": {"beta": 4}},
                                 "train": {"epochs": 2}})
    assert cfg.model.name == "beta_vae" and cfg.model.params == {"beta": 4}
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 64 and cfg.scaling.workers == 1


@pytest.mark.parametrize("data, message", [
    ({"data": "x", "train": {"bach_size": 3}}, "unknown config key.*train.bach_size"),
    ({"data": "x", "trian": {}}, "unknown config key.*trian"),
    ({"data": "x", "train": {"epochs": "ten"}}, "train.epochs must be an integer, got str 'ten'"),
    ({"data": "x", "optim": {"lr": True}}, "optim.lr must be a number"),
    ({"data": "x", "scaling": {"use_gpu": "yes"}}, "scaling.use_gpu must be true or false"),
    ({"data": "x", "train": {"epochs": 0}}, "train.epochs must be >= 1"),
    ({"model": {"name": "vae"}}, "missing required config key: data"),
    ({"data": "x", "model": "vae"}, "model must be a mapping"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_int_is_accepted_for_float_and_overrides_parse_yaml_scalars():
    data = apply_overrides({"data": "x"}, ["optim.lr=1", "train.max_steps_per_epoch=null", "model.params.beta=2.5",
                                           "scaling.use_gpu=false"])
    cfg = TrainConfig.from_dict(data)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps_per_epoch is None
    assert cfg.model.params == {"beta": 2.5}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_default_tracking_uri_lives_under_storage(tmp_path):
    cfg = TrainConfig.from_dict({"data": "x", "storage": str(tmp_path / "runs")})
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="tracking_uri is required"):
        TrainConfig.from_dict({"data": "x", "storage": "s3://bucket/runs"}).tracking_uri()
