import pytest

from pipelines.config import ConfigError, apply_overrides
from pipelines.training.config import TrainConfig


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
    ({"data": "x", "optim": {"schedule": "step"}}, "optim.schedule must be one of cosine, constant"),
    ({"data": "x", "optim": {"warmup_fraction": 1.0}}, r"optim.warmup_fraction must be in \[0, 1\)"),
    ({"data": "x", "optim": {"min_lr_ratio": -0.1}}, r"optim.min_lr_ratio must be in \[0, 1\]"),
])
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_cosine_schedule_warms_up_peaks_and_decays_to_the_floor():
    optim = TrainConfig.from_dict({"data": "x", "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_fraction": 0.1,
                                                          "min_lr_ratio": 0.05}}).optim
    lrs = [optim.lr_at(step, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4)  # 10 warm-up steps: 1/10 of the peak first
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warm-up
    assert lrs[55] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5), rel=0.02)  # half way down the cosine
    assert optim.lr_at(100, 100) == pytest.approx(5e-5)  # the floor, and it stays there
    assert optim.lr_at(500, 100) == pytest.approx(5e-5)
    constant = TrainConfig.from_dict({"data": "x", "optim": {"schedule": "constant", "lr": 3e-4}}).optim
    assert {constant.lr_at(step, 10) for step in range(20)} == {3e-4}


def test_int_is_accepted_for_float_and_overrides_parse_yaml_scalars():
    data = apply_overrides({"data": "x"}, ["optim.lr=1", "train.max_steps_per_epoch=null", "model.params.beta=2.5",
                                           "scaling.use_gpu=false"])
    cfg = TrainConfig.from_dict(data)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps_per_epoch is None
    assert cfg.model.params == {"beta": 2.5}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


@pytest.mark.parametrize("raw, value", [("1e-4", 1e-4), ("3E5", 3e5), ("+2.5e-3", 2.5e-3), (".5e1", 5.0)])
def test_scientific_notation_without_a_dot_is_a_number(raw, value):
    # YAML 1.1 (PyYAML) reads `1e-4` as the string "1e-4"; `--set optim.lr=1e-4` must still work
    cfg = TrainConfig.from_dict(apply_overrides({"data": "x"}, [f"optim.lr={raw}"]))
    assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="optim.lr must be a number, got str '1e'"):
        TrainConfig.from_dict(apply_overrides({"data": "x"}, ["optim.lr=1e"]))


def test_default_tracking_uri_lives_under_storage(tmp_path):
    cfg = TrainConfig.from_dict({"data": "x", "storage": str(tmp_path / "runs")})
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="tracking_uri is required"):
        TrainConfig.from_dict({"data": "x", "storage": "s3://bucket/runs"}).tracking_uri()
