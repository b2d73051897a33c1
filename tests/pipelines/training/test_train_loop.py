"""The training loop in one process (no Ray): it learns, checkpoints, resumes with step
continuity, and stops on a non-finite loss naming step and batch."""
import json
from pathlib import Path

import pytest
import torch

from pipelines.training.checkpoints import OPTIMIZERS_FILE, read_state
from pipelines.training.config import TrainConfig
from pipelines.training.sessions import LocalSession
from pipelines.training.loop import NonFiniteLossError, run_loop


def config(data, **train):
    return {"data": str(data), "model": {"name": "vae", "params": {"backbone": "mlp", "latent_dim": 8}},
            "train": {"batch_size": 32, "epochs": 3, "checkpoint_every": 20, **train}}


def test_loop_learns_and_reports_each_epoch(digits_dataset):
    session = LocalSession()
    # lr 3e-4: at 1e-3 this small model has plateaued (to 0.01 nats) by epoch 2 on well-mixed shards,
    # and "improves every epoch" would test noise
    cfg = {**config(digits_dataset), "optim": {"lr": 3e-4}}
    final = run_loop(cfg, session)
    epochs = [r for r in session.reports if "val_elbo" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert final["step"] == 3 * (1617 // 32)  # every batch of every epoch, one step each
    # validation ELBO improves every epoch
    assert epochs[0]["val_elbo"] < epochs[1]["val_elbo"] < epochs[2]["val_elbo"]
    assert epochs[-1]["val_elbo"] > epochs[0]["val_elbo"] + 0.15
    for key in ("train_loss", "train_recon", "train_kl", "val_recon", "val_kl", "val_active_units", "samples_per_s"):
        assert key in final
    state = read_state(session.latest_checkpoint)
    assert state.step == final["step"] and state.epoch == 3 and state.resumed_from == ()
    # the optimizer's last step used the rate the schedule gives for that step
    saved = torch.load(Path(session.latest_checkpoint) / OPTIMIZERS_FILE, weights_only=True)
    last_lr = saved["model"]["param_groups"][0]["lr"]
    expected = TrainConfig.from_dict(cfg).optim.lr_at(final["step"] - 1, final["step"])
    assert last_lr == pytest.approx(expected)


def test_resume_continues_step_count_and_weights(digits_dataset):
    first = LocalSession()
    run_loop(config(digits_dataset, epochs=1), first)
    checkpoint = first.latest_checkpoint
    assert read_state(checkpoint).step == 1617 // 32
    resumed = LocalSession(resume_from=checkpoint)
    final = run_loop(config(digits_dataset, epochs=2), resumed)
    state = read_state(resumed.latest_checkpoint)
    assert state.resumed_from == (1617 // 32,)
    assert final["step"] == 2 * (1617 // 32)
    assert [r["epoch"] for r in resumed.reports if "val_elbo" in r] == [2]  # epoch 1 was not redone


def test_mid_epoch_checkpoint_resumes_within_the_epoch(digits_dataset):
    first = LocalSession()
    run_loop(config(digits_dataset, epochs=1, checkpoint_every=20), first)
    mid = [r for r in first.reports if "val_elbo" not in r]
    assert [r["step"] for r in mid] == [20, 40]
    ckpt_dir = Path(first.latest_checkpoint).parent / "checkpoint_000001"  # the second: step 40
    assert read_state(ckpt_dir).batch == 40
    resumed = LocalSession(resume_from=ckpt_dir)
    final = run_loop(config(digits_dataset, epochs=1), resumed)
    assert final["step"] == 1617 // 32  # 40 done before + 10 more, not 50 more


def test_non_finite_loss_stops_naming_step_and_batch(digits_dataset):
    session = LocalSession()
    cfg = config(digits_dataset, epochs=2, checkpoint_every=1)
    cfg["optim"] = {"lr": 1e12, "grad_clip": None}
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step (\d+) \(epoch 0, batch \1\)"):
        run_loop(cfg, session)
    good = read_state(session.latest_checkpoint)
    assert good.step >= 1
    from vaemodels import load_model

    model = load_model(Path(session.latest_checkpoint) / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
