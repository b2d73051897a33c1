"""Training throughput of the full path (WebDataset shards -> `vaepipe train`) against the same
model in a plain PyTorch loop over the data held in memory, all on the same cores with torch's
default threads (issue 14). Each arm runs in a fresh process; arms are interleaved and repeated,
and each figure is the median of the runs with min and max. Writes a section of BENCHMARKS.md.

    python -m benchmarks.train_throughput [--samples 3000] [--epochs 3] [--runs 3]

Steady state: samples/s of the epochs after the first (each path's own timing of its epochs;
start-up, Ray scheduling and the first epoch's warm-up excluded). Start-up is reported apart: the
whole process's wall time minus its epochs' time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"name": "vae", "params": {"backbone": "conv", "latent_dim": 10}}
BATCH = 64
ARMS = {
    "plain": "plain PyTorch loop, data in memory, 1 process",
    "workers_0": "shards -> `vaepipe train --workers 0` (in process)",
    "ray_1": "shards -> Ray Train, 1 worker with every core",
    "ray_2": "shards -> Ray Train, 2 workers x 1 core (DDP)",
}


def plain_loop(data_dir: str, epochs: int) -> dict:
    """Images decoded once into one tensor; the loop's own step (pipelines.training.step) over shuffled batches."""
    import torch

    import vaemodels
    from pipelines.data import ShardStream
    from pipelines.training.step import make_optimizers, total_loss, update

    torch.manual_seed(0)
    images = torch.stack([s["image"] for s in ShardStream(data_dir, "train", shuffle_buffer=0)])
    model = vaemodels.build(MODEL["name"], tuple(images.shape[1:]), **MODEL["params"])
    optimizers = make_optimizers(model, 1e-3, 0.0)
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(images))
        started, seen = time.perf_counter(), 0
        for i in range(0, len(images) - BATCH + 1, BATCH):
            out = model.loss({"image": images[order[i:i + BATCH]]})
            update(model, optimizers, total_loss(model, out), 10.0)
            seen += BATCH
        rates.append(seen / (time.perf_counter() - started))
    return {"rates": rates, "epoch_s": [len(images) // BATCH * BATCH / r for r in rates]}


def vaepipe_train(data_dir: str, storage: str, workers: int, cpus: float, epochs: int) -> dict:
    import mlflow

    from pipelines.training.config import TrainConfig
    from pipelines.training.train import run_training

    result = run_training(TrainConfig.from_dict({
        "data": data_dir, "model": MODEL, "name": f"bench-{workers}w", "storage": storage,
        "train": {"batch_size": BATCH, "epochs": epochs, "checkpoint_every": 10_000},
        "scaling": {"workers": workers, "cpus_per_worker": cpus},
    }))
    history = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    return {"rates": rates}


def run_arm(arm: str, data: Path, work: Path, epochs: int, samples: int) -> dict:
    """The arm in a fresh process; wall time of the whole process, steady-state rate, start-up."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--arm", arm, "--data", str(data),
                          "--storage", str(work), "--epochs", str(epochs)],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    rates = json.loads(out.stdout.strip().splitlines()[-1])["rates"]
    epochs_s = sum(samples / r for r in rates)  # every arm's rate counts all ranks' samples
    return {"steady": statistics.mean(rates[1:]), "wall_s": wall, "startup_s": wall - epochs_s}


def summary(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, inside its own process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.arm:
        if args.arm == "plain":
            result = plain_loop(args.data, args.epochs)
        else:
            workers, cpus = {"workers_0": (0, 1.0), "ray_1": (1, float(cores)), "ray_2": (2, 1.0)}[args.arm]
            result = vaepipe_train(args.data, args.storage, workers, cpus, args.epochs)
        print(json.dumps(result))
        return 0

    from benchmarks.report import update_section
    from pipelines.data import BuildConfig, build_dataset

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        build_dataset(BuildConfig("shapes", str(data), limit=args.samples, val_fraction=0.1, shard_size=500))
        train_samples = json.loads((data / "manifest.json").read_text())["splits"]["train"]["num_samples"]
        for run in range(args.runs):
            for arm in ARMS:  # interleaved: load drifts hit every arm alike
                results[arm].append(run_arm(arm, data, Path(tmp) / f"{arm}-{run}", args.epochs, train_samples))
                loads.append(os.getloadavg()[0])
                print(f"[bench] {arm} run {run}: {results[arm][-1]}", file=sys.stderr)
    steady = {arm: [r["steady"] for r in rs] for arm, rs in results.items()}
    plain = statistics.median(steady["plain"])
    ratios = {arm: statistics.median(v) / plain for arm, v in steady.items()}
    rows = "\n".join(
        f"| {ARMS[arm]} | {summary(steady[arm])} | {ratios[arm]:.2f} | "
        f"{summary([r['startup_s'] for r in results[arm]], 1)} | {summary([r['wall_s'] for r in results[arm]], 1)} |"
        for arm in ARMS)
    verdicts = "; ".join(f"{ARMS[arm]}: {ratios[arm]:.2f}×, **{'met' if ratios[arm] >= 0.9 else 'missed'}**"
                         for arm in ("workers_0", "ray_1", "ray_2"))
    section = (
        "## Training throughput (benchmarks/train_throughput.py)\n\n"
        f"{time.strftime('%Y-%m-%d')}, {train_samples} shapes training samples (64x64), conv VAE (latent 10), batch "
        f"{BATCH} per worker, {args.epochs} epochs, the first excluded from samples/s; torch's default threads on "
        f"{cores} cores (the plain loop and the in-process run use every core; Ray's 1-worker run reserves every "
        f"core for its worker); each arm a fresh process, {args.runs} runs interleaved, median (min–max); 1-min load "
        f"average {min(loads):.1f}–{max(loads):.1f} while it ran. Start-up = the process's wall time minus its "
        "epochs' time (imports, data opening, Ray, MLflow, checkpoints and the per-epoch validation pass).\n\n"
        "| path | steady samples/s | ratio to plain loop | start-up + overhead s | whole process s |\n"
        "|---|---|---|---|---|\n" + rows + "\n\n"
        f"Target: each full path at ≥ 0.9× the all-cores plain loop (steady state). {verdicts}.\n"
    )
    update_section(args.out, section)
    print(json.dumps({"steady_samples_per_s": steady, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
