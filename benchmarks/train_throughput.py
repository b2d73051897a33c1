"""Training throughput of the full path (WebDataset shards -> Ray Train workers) against a plain
PyTorch loop over the same data held in memory in one process: same model, same batch size,
same cores, measured side by side in one run. Writes a section of BENCHMARKS.md.

    python -m benchmarks.train_throughput [--samples 6000] [--epochs 2]

samples/s is taken from what each path reports for its epochs after the first (start-up, Ray
scheduling and the first epoch's warm-up excluded), so the ratio compares steady-state training.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import vaemodels
from benchmarks.report import update_section
from pipelines.data import BuildConfig, ShardStream, build_dataset
from pipelines.training.train import run_training
from pipelines.training.config import TrainConfig

MODEL = {"name": "vae", "params": {"backbone": "conv", "latent_dim": 10}}
BATCH = 64


def plain_loop(data_dir: Path, epochs: int) -> float:
    """Images decoded once into one tensor; Adam steps over shuffled batches; samples/s of the last epochs."""
    torch.manual_seed(0)
    samples = list(ShardStream(str(data_dir), "train", shuffle_buffer=0))
    images = torch.stack([s["image"] for s in samples])
    model = vaemodels.build(MODEL["name"], tuple(images.shape[1:]), **MODEL["params"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(images))
        started, seen = time.perf_counter(), 0
        for i in range(0, len(images) - BATCH + 1, BATCH):
            out = model.loss({"image": images[order[i:i + BATCH]]})
            opt.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            seen += BATCH
        rates.append(seen / (time.perf_counter() - started))
    return sum(rates[1:]) / len(rates[1:])


def full_path(data_dir: Path, storage: Path, workers: int, epochs: int) -> float:
    import mlflow

    result = run_training(TrainConfig.from_dict({
        "data": str(data_dir), "model": MODEL, "name": f"bench-{workers}w", "storage": str(storage),
        "train": {"batch_size": BATCH, "epochs": epochs, "checkpoint_every": 10_000},
        "scaling": {"workers": workers, "cpus_per_worker": 1.0},
    }))
    history = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per training process on every path
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        build_dataset(BuildConfig("shapes", str(data), limit=args.samples, shard_size=500))
        plain = plain_loop(data, args.epochs)
        one = full_path(data, Path(tmp) / "runs", 1, args.epochs)
        two = full_path(data, Path(tmp) / "runs", 2, args.epochs)
    result = {"plain_loop_samples_per_s": plain, "ray_1_worker_samples_per_s": one,
              "ray_2_workers_samples_per_s": two, "ratio_1_worker": one / plain, "ratio_2_workers": two / plain}
    section = (
        "## Training throughput (benchmarks/train_throughput.py)\n\n"
        f"{time.strftime('%Y-%m-%d')}, {args.samples} shapes samples (64x64), conv VAE, batch {BATCH} per worker, "
        f"{args.epochs} epochs, first epoch excluded, 1 torch thread per process, 2-core CPU machine.\n\n"
        "| path | samples/s | ratio to plain loop |\n|---|---|---|\n"
        f"| plain PyTorch loop, data in memory, 1 process | {plain:.0f} | 1.00 |\n"
        f"| shards -> Ray Train, 1 worker | {one:.0f} | {one / plain:.2f} |\n"
        f"| shards -> Ray Train, 2 workers (DDP) | {two:.0f} | {two / plain:.2f} |\n\n"
        "Target: the full path at >= 0.85x the plain loop.\n"
    )
    update_section(args.out, section)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
