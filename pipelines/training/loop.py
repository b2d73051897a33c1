"""The training loop one worker runs, top to bottom. It reads its shard of the data through the
data layer's reader (split by world rank), trains every optimizer group the model declares,
reports metrics each epoch and checkpoints every N steps through a `Session`, and on rank 0
logs to MLflow. The same loop runs as a Ray Train worker (`train_loop_per_worker`), as a Ray
Tune trial (`pipelines.training.search`) and in one plain process (`run_loop(config, LocalSession())`).
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

import vaemodels
from pipelines.training.checkpoints import TrainingState, restore_checkpoint, write_checkpoint
from pipelines.data import ReaderConfig, make_loader, read_manifest
from pipelines.data.reader import batches_per_epoch, open_stream
from pipelines.training.sessions import LocalSession, RayTrainSession, Session
from pipelines.training.step import make_optimizers, set_lr, total_loss, update
from pipelines.training.config import TrainConfig
from vaemodels.distributions import active_units_from_moments


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` is `TrainConfig.to_dict()` plus `mlflow_run_id`."""
    run_loop(config, RayTrainSession())


def run_loop(config: dict[str, Any], session: Session) -> dict[str, float]:
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != "mlflow_run_id"})
    run_id = config.get("mlflow_run_id")
    rank, world = session.rank, session.world_size
    device = session.device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    manifest = read_manifest(cfg.data)
    model = vaemodels.build(cfg.model.name, manifest.model_input, manifest.num_classes or None, **cfg.model.params)
    model.to(device)
    optimizers = make_optimizers(model, cfg.optim.lr, cfg.optim.weight_decay)
    state = TrainingState(step=0, epoch=0, batch=0, config=cfg.to_dict())
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = restore_checkpoint(directory, model, optimizers)
        state = replace(restored, resumed_from=(*restored.resumed_from, restored.step))
        print(f"[train] rank {rank}: resumed at step {state.step} (epoch {state.epoch}, batch {state.batch})",
              file=sys.stderr)
    wrapped = session.prepare_model(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    reader = ReaderConfig(batch_size=cfg.train.batch_size, num_loader_workers=cfg.train.loader_workers,
                          shuffle_buffer=cfg.train.shuffle_buffer, seed=cfg.train.seed,
                          open_shards=cfg.train.open_shards)
    tracker = session.tracker(cfg, run_id) if rank == 0 else None

    step, metrics = state.step, {}
    for epoch in range(state.epoch, cfg.train.epochs):
        loader = make_loader(manifest, "train", reader, rank=rank, world_size=world, epoch=epoch)
        num_batches = batches_per_epoch(loader)
        if cfg.train.max_steps_per_epoch:
            num_batches = min(num_batches, cfg.train.max_steps_per_epoch)
        total_steps = cfg.train.epochs * num_batches  # the whole run's plan: the lr schedule spans it
        skip = state.batch if epoch == state.epoch else 0  # resuming mid-epoch: same order, skip what was done
        sums: dict[str, float] = {}
        seen, started = 0, time.perf_counter()
        model.train()
        for batch_index, batch in enumerate(loader):
            if batch_index >= num_batches:
                break
            if batch_index < skip:
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            model.set_training_step(step)
            set_lr(optimizers, cfg.optim.lr_at(step, total_steps))
            with autocast:
                out = wrapped(batch)
            total = total_loss(model, out)
            if not _all_finite(total, world):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (epoch {epoch}, batch {batch_index}): "
                    + ", ".join(f"{k}={v.item():.4g}" for k, v in out.items())
                    + "; the last good checkpoint is kept in the run's storage"
                )
            update(model, optimizers, total, cfg.optim.grad_clip)
            step += 1
            seen += len(batch[model.input_key])
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            done = batch_index + 1
            if step % cfg.train.checkpoint_every == 0 and done < num_batches:
                progress = {"step": step, "epoch": epoch, **_mean(sums, done - skip, "train_")}
                _report(session, model, optimizers, progress,
                        TrainingState(step, epoch, done, cfg.to_dict(), state.resumed_from), rank)
        elapsed = time.perf_counter() - started
        metrics = {
            "step": step,
            "epoch": epoch + 1,
            **_mean(sums, max(num_batches - skip, 1), "train_"),
            **evaluate(model, manifest, reader, rank, world, device),
            "samples_per_s": seen * world / max(elapsed, 1e-9),
        }
        if tracker is not None:
            print(f"[train] epoch {epoch + 1}/{cfg.train.epochs} step {step}: "
                  + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train_loss", "val_"))),
                  file=sys.stderr)
            tracker.log_metrics(metrics, step=epoch + 1)
        _report(session, model, optimizers, metrics, TrainingState(step, epoch + 1, 0, cfg.to_dict(), state.resumed_from), rank)

    if tracker is not None:
        tracker.log_final_artifacts(model, manifest, device)
    return metrics


@torch.no_grad()
def evaluate(model: vaemodels.AutoEncoderModel, manifest, reader: ReaderConfig, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    """Validation loss parts and active units, averaged over all ranks' shares of the val split."""
    if manifest.num_samples("val") < world:
        return {}
    model.eval()
    # every sample of the rank's share, in shard order, read in this process (no DataLoader: a
    # batch-size-1 loader spent more time collating than the model spent on the whole split)
    stream = open_stream(manifest, "val", rank, world, shuffle_buffer=0, seed=reader.seed,
                         max_bad_fraction=reader.max_bad_fraction, num_loader_workers=1,
                         open_shards=reader.open_shards, cache_bytes=reader.cache_bytes)
    sums: dict[str, float] = {}
    count, mu_sum, mu_sq_sum = 0, None, None
    for chunk in _batches(stream, reader.batch_size):
        chunk = {k: v.to(device) for k, v in chunk.items()}
        n = len(chunk[model.input_key])
        for key, value in model.loss(chunk).items():
            sums[key] = sums.get(key, 0.0) + float(value) * n
        if model.is_variational:
            mu = model.embed(chunk[model.input_key], model.condition_on(chunk["label"], all_known=True)).double()
            mu_sum = mu.sum(0) if mu_sum is None else mu_sum + mu.sum(0)
            mu_sq_sum = (mu**2).sum(0) if mu_sq_sum is None else mu_sq_sum + (mu**2).sum(0)
        count += n
    keys = sorted(sums)
    stats = torch.tensor([count] + [sums[k] for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(stats)
    out = {f"val_{k}": (stats[i + 1] / stats[0]).item() for i, k in enumerate(keys)}
    if mu_sum is not None:
        moments = torch.stack([mu_sum, mu_sq_sum])
        if world > 1:
            dist.all_reduce(moments)
        out["val_active_units"] = float(active_units_from_moments(stats[0], moments[0], moments[1]))
    model.train()
    return out


def _batches(samples, batch_size: int):
    """Stack single samples (a stream's dicts of tensors) into batches; the last one may be short."""
    buffer: list[dict[str, torch.Tensor]] = []
    for item in samples:
        buffer.append(item)
        if len(buffer) == batch_size:
            yield {k: torch.stack([b[k] for b in buffer]) for k in buffer[0]}
            buffer = []
    if buffer:
        yield {k: torch.stack([b[k] for b in buffer]) for k in buffer[0]}


def _all_finite(total: torch.Tensor, world: int) -> bool:
    """Every rank must agree, or one rank would stop while the others wait in the all-reduce."""
    flag = torch.tensor([0.0 if torch.isfinite(total.detach()) else 1.0], device=total.device)
    if world > 1:
        dist.all_reduce(flag)
    return flag.item() == 0.0


def _mean(sums: dict[str, float], count: int, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v / max(count, 1) for k, v in sums.items() if math.isfinite(v)}


def _report(session: Session, model, optimizers, metrics: dict[str, float], state: TrainingState, rank: int) -> None:
    """Report metrics with a checkpoint. Every rank calls this (it is a barrier); only rank 0 writes files."""
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            write_checkpoint(directory, model, optimizers, state)
        session.report(metrics, directory if rank == 0 else None)


if __name__ == "__main__":  # a single-process run without Ray: python -m pipelines.training.loop CONFIG.yaml
    from pipelines.config import load_config_file

    print(run_loop(load_config_file(sys.argv[1]), LocalSession()))
