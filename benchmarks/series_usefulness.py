"""Usefulness of synthetic series (GunPoint by default): per run, `vaepipe data build --source aeon:NAME`
with the run's seed, `vaepipe train --model ctimevae --workers 0`, then `vaepipe evaluate` drawing
synthetic windows from the model: TSTR vs TRTR with MiniRocket, TimeGAN's discriminative score with its
real-vs-real baseline, the predictive score with its baseline. Median and min-max over the runs; writes
a section of BENCHMARKS.md and prints one JSON line. Targets: TSTR >= 0.8 x TRTR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("trtr_accuracy", "tstr_accuracy", "cas_ratio", "discriminative_score", "discriminative_score_real_baseline",
        "predictive_score", "predictive_score_real_baseline", "iwae_log_likelihood")


def one_run(source: str, seed: int, epochs: int, per_class_factor: int, steps: int, workdir: Path) -> dict:
    from pipelines.data.build import BuildConfig
    from pipelines.data.series_build import SeriesBuildConfig, build_series_dataset
    from pipelines.evaluation.config import EvaluateConfig
    from pipelines.evaluation.evaluate import run_evaluation
    from pipelines.registry.tracking import connect
    from pipelines.training.config import TrainConfig
    from pipelines.training.train import run_training

    data = workdir / f"data-{seed}"
    manifest = build_series_dataset(SeriesBuildConfig(BuildConfig(source, str(data), val_fraction=0.25, seed=seed)))
    started = time.perf_counter()
    trained = run_training(TrainConfig.from_dict({
        "data": str(data), "storage": str(workdir / "runs"), "name": f"run-{seed}",
        "model": {"name": "ctimevae", "params": {}},
        "train": {"epochs": epochs, "batch_size": 32, "seed": seed}, "scaling": {"workers": 0}}))
    train_s = time.perf_counter() - started
    model_dir = workdir / f"model-{seed}"
    connect(trained["tracking_uri"]).download_artifacts(trained["run_id"], "model", str(workdir))
    (workdir / "model").rename(model_dir)
    num_train = manifest["splits"]["train"]["num_samples"]
    started = time.perf_counter()
    result = run_evaluation(EvaluateConfig(model=str(model_dir), data=str(data), out=str(workdir / f"report-{seed}"),
                                           num_synthetic=max(20, per_class_factor * num_train), iwae_k=100,
                                           classifier_steps=steps, seeds=1, seed=seed))
    return {"seed": seed, "train_s": train_s, "evaluate_s": time.perf_counter() - started,
            "val_elbo": trained["metrics"].get("val_elbo"), "num_train": num_train,
            "num_val": manifest["splits"]["val"]["num_samples"],
            **{k: result["metrics"].get(k) for k in KEYS}}


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in (*KEYS, "train_s", "evaluate_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def section(source: str, epochs: int, steps: int, runs: list[dict], stats: dict) -> str:
    fmt = lambda key, d=3: (f"{stats[key]['median']:.{d}f} ({stats[key]['min']:.{d}f}–{stats[key]['max']:.{d}f})")  # noqa: E731
    ratio_ok = stats["cas_ratio"]["median"] >= 0.8
    lines = [
        f"## Usefulness of synthetic series, {source} (benchmarks/series_usefulness.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}: {len(runs)} runs (seeds {', '.join(str(r['seed']) for r in runs)}), each: "
        f"`vaepipe data build --source {source} --val-fraction 0.25 --seed S` ({runs[0]['num_train']} train / "
        f"{runs[0]['num_val']} val windows, split by the seed), `vaepipe train --model ctimevae --workers 0 "
        f"--epochs {epochs} --batch-size 32` (defaults otherwise), `vaepipe evaluate` with "
        f"{runs[0]['num_train']} windows drawn from the model (as many as real train, split evenly over classes), "
        f"`--classifier-steps {steps} --seeds 1 --iwae-k 100`. Median (min–max) over the runs; 2-core CPU, 1-min "
        f"load average {os.getloadavg()[0]:.1f} at the end (other work ran beside it: times are upper bounds).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| TRTR (MiniRocket, real train → real val) | {fmt('trtr_accuracy')} |",
        f"| TSTR (MiniRocket, synthetic → real val) | {fmt('tstr_accuracy')} |",
        f"| TSTR / TRTR | {fmt('cas_ratio')} |",
        f"| discriminative score (synthetic vs real train; 0 = indistinguishable) | {fmt('discriminative_score')} |",
        f"| discriminative score, real-vs-real baseline (real val vs real train) | "
        f"{fmt('discriminative_score_real_baseline')} |",
        f"| predictive score (MAE on real val, trained on synthetic) | {fmt('predictive_score')} |",
        f"| predictive score, real baseline (trained on real train) | {fmt('predictive_score_real_baseline')} |",
        f"| IWAE log-likelihood (nats per window, k = 100) | {fmt('iwae_log_likelihood', 1)} |",
        f"| train / evaluate wall time (s) | {fmt('train_s', 0)} / {fmt('evaluate_s', 0)} |",
        "",
        f"Target TSTR ≥ 0.8 × TRTR: **{'met' if ratio_ok else 'missed'}** (median ratio "
        f"{stats['cas_ratio']['median']:.3f}). The discriminative score is reported beside its real-vs-real "
        "baseline: the baseline is what a perfect generator would score with this much data; the gap between "
        "the two is what a discriminator can still see (1-D CNN, TimeGAN's recipe with a CNN in place of the "
        "GRU, see pipelines/evaluation/series_metrics.py). Read it plainly: a discriminative score of "
        f"{stats['discriminative_score']['median']:.3f} means the discriminator tells synthetic from real on about "
        f"{50 + 100 * stats['discriminative_score']['median']:.0f}% of held-out windows, so the synthetic windows are "
        "useful for classification but not indistinguishable. The baseline pairs real train with the smaller real "
        "val split (equal numbers of each, so 20% of the val count held out per side: a coarser score, steps of "
        "1 / (2 x held-out windows)), the score pairs real train with as many synthetic windows.",
        "",
        "Per run: " + "; ".join(f"seed {r['seed']}: TRTR {r['trtr_accuracy']:.3f}, TSTR {r['tstr_accuracy']:.3f}, "
                                f"disc {r['discriminative_score']:.3f} (base {r['discriminative_score_real_baseline']:.3f})"
                                for r in runs) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="aeon:GunPoint")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--classifier-steps", type=int, default=500)
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # two shared cores: more threads measured slower
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.runs):
            runs.append(one_run(args.source, seed, args.epochs, 1, args.classifier_steps, Path(tmp)))
            print(f"[bench] run {seed}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    stats = summary(runs)
    from benchmarks.report import update_section

    update_section(args.report, section(args.source, args.epochs, args.classifier_steps, runs, stats))
    print(json.dumps({"source": args.source, "runs": runs, "summary": stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
