"""Where the training loop runs: a Ray Train worker, a Ray Tune trial, or one plain process.
A Session tells the loop its rank, device and latest checkpoint, wraps the model for data
parallelism, and takes its reports. Distribution stays here, never in model code.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class _DirCheckpoint:
    """A checkpoint folder on local disk, with Ray's `as_directory()` shape."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    @contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


class Session:
    rank: int = 0
    world_size: int = 1

    def device(self) -> torch.device:
        return torch.device("cpu")

    def get_checkpoint(self):
        return None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def tracker(self, config, run_id: str | None):
        from pipelines.registry.tracking import RunTracker

        return RunTracker(config.tracking_uri(), run_id) if run_id else None


class LocalSession(Session):
    """One process, no Ray: keeps every report and the latest checkpoints.

    Checkpoints are folders `checkpoint_NNNNNN` (0, 1, ... in report order). With `checkpoint_root`
    (`vaepipe train --workers 0`) they live there, the newest `keep` of them kept, and a new session
    in the same folder resumes from the newest, as Ray Train does from its storage; without it they
    all go to a temporary folder (tests, benchmarks). `run_tracker` replaces the RunTracker the loop
    would open (`vaepipe train --workers 0` logs through a tracking process).
    """

    def __init__(self, resume_from: str | Path | None = None, use_gpu: bool = False,
                 checkpoint_root: str | Path | None = None, keep: int | None = None, run_tracker=None):
        self._run_tracker = run_tracker  # given: rank 0 logs through it (the fast path's tracking process)
        self.reports: list[dict[str, Any]] = []
        self._dir = Path(checkpoint_root) if checkpoint_root else Path(tempfile.mkdtemp(prefix="vaepipe-local-ckpt-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._keep = keep
        existing = self._checkpoints()
        if resume_from is None and checkpoint_root and existing:
            resume_from = existing[-1]
        self._latest = _DirCheckpoint(resume_from) if resume_from else None
        self._count = int(existing[-1].name.rsplit("_", 1)[1]) + 1 if existing else 0
        self._use_gpu = use_gpu

    def device(self) -> torch.device:
        return torch.device("cuda" if self._use_gpu and torch.cuda.is_available() else "cpu")

    def get_checkpoint(self):
        return self._latest

    def tracker(self, config, run_id: str | None):
        return self._run_tracker if self._run_tracker is not None else super().tracker(config, run_id)

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self._dir / f"checkpoint_{self._count:06d}"
            partial = self._dir / f".{target.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            partial.rename(target)  # a checkpoint folder is complete or absent
            self._count += 1
            self._latest = _DirCheckpoint(target)
            if self._keep:
                for old in self._checkpoints()[:-self._keep]:
                    shutil.rmtree(old, ignore_errors=True)

    def _checkpoints(self) -> list[Path]:
        return sorted(p for p in self._dir.glob("checkpoint_*") if p.is_dir())

    @property
    def latest_checkpoint(self) -> str | None:
        return self._latest.path if self._latest else None


class RayTrainSession(Session):
    """Inside a Ray Train worker (TorchTrainer): DDP across ranks, checkpoints to the run's storage."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world_size > 1 else model

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class RayTuneSession(Session):
    """Inside a Ray Tune function trainable: one worker, a result per epoch for the scheduler.

    Tune checks that every result holds the search metric and aborts the whole search otherwise;
    the loop's mid-epoch checkpoints carry train metrics only, so only results holding `metric`
    (the epoch ends) reach Tune. A trial is not resumed mid-epoch, so those checkpoints are not lost.
    """

    def __init__(self, use_gpu: bool = False, metric: str | None = None):
        self._use_gpu = use_gpu
        self.metric = metric
        self.reported = 0  # results handed to Tune
        self.seen_keys: set[str] = set()  # every key the loop reported (names a mistyped metric)

    def device(self) -> torch.device:
        return torch.device("cuda" if self._use_gpu and torch.cuda.is_available() else "cpu")

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics, checkpoint_dir):
        import ray.tune

        self.seen_keys.update(metrics)
        if self.metric is not None and self.metric not in metrics:
            return
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)
        self.reported += 1
