"""Is `vae_gan` at least as good as `vae` on FID (issue 12)? Both families are trained by the real
training loop (`run_loop`, one process) with their defaults for the same number of epochs on the
same shards, for several seeds; each model's samples (drawn as `vaepipe evaluate` draws them, 8-bit,
pixel temperature 0.25) are compared with real images the feature network never trained on:

- FID and precision/recall in the features of vaepipe's reference classifier (trained once, on a
  split of real train, early-stopped on another; the same routine `vaepipe evaluate` uses);
- FID in a feature space vaepipe did not write: scikit-learn PCA (50 components) of the pixels,
  fitted on real train images.

Writes a section of BENCHMARKS.md.

    python -m benchmarks.vae_gan_fid [--dataset mnist5k] [--epochs 5] [--seeds 3] [--samples 2000]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vaemodels
from benchmarks.report import update_section
from pipelines.data import BuildConfig, build_dataset
from pipelines.data.manifest import read_manifest
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.data import early_stopping_split, load_split
from pipelines.evaluation.evaluate import fidelity_metrics, synthetic_set
from pipelines.evaluation.metrics import accuracy, fit_classifier, frechet_distance
from pipelines.training.loop import run_loop
from pipelines.training.sessions import LocalSession

FAMILIES = ("vae", "vae_gan")
DATASETS = {"mnist5k": {"limit": None, "val_fraction": 0.2}, "shapes": {"limit": 10_000, "val_fraction": 0.1}}


def train(family: str, data: Path, epochs: int, seed: int) -> tuple[object, float, dict]:
    session = LocalSession()
    started = time.perf_counter()
    metrics = run_loop({"data": str(data), "model": {"name": family, "params": {}},
                        "train": {"epochs": epochs, "batch_size": 64, "seed": seed, "shuffle_buffer": 10_000}},
                       session)
    return vaemodels.load_model(Path(session.latest_checkpoint) / "model"), time.perf_counter() - started, metrics


def pca_fid(pca, real: torch.Tensor, fake: torch.Tensor) -> float:
    flat = lambda x: x.reshape(len(x), -1).numpy().astype(np.float64)  # noqa: E731
    return frechet_distance(pca.transform(flat(real)), pca.transform(flat(fake)))


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    from sklearn.decomposition import PCA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist5k")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / args.dataset
        spec = DATASETS[args.dataset]
        build_dataset(BuildConfig(source=args.dataset, out=str(data), limit=spec["limit"],
                                  val_fraction=spec["val_fraction"], seed=0))
        manifest = read_manifest(str(data))
        train_split = load_split(manifest, "train", 10_000, seed=0)
        val = load_split(manifest, "val", 10_000, seed=0)
        fit, stop = early_stopping_split(train_split, 0.1, seed=0)
        reference, report = fit_classifier(fit.images, fit.labels, manifest.num_classes, 2000, seed=0,
                                           holdout=(stop.images, stop.labels))
        reference_accuracy = accuracy(reference, val.images, val.labels)
        unseen = torch.cat([val.images, stop.images])
        pca = PCA(50, random_state=0).fit(train_split.images.reshape(len(train_split.images), -1).numpy())
        floor = fidelity_metrics(reference, val.images, stop.images, 0)  # real vs real: the noise floor
        print(json.dumps({"reference_accuracy": reference_accuracy, "steps": report.steps,
                          "real_vs_real_fid": floor["fid"]}), file=sys.stderr, flush=True)
        evaluate = EvaluateConfig(model="-", data="-", out="-", num_synthetic=args.samples)
        for seed in range(args.seeds):
            for family in FAMILIES:  # interleaved: both families see the same machine load
                model, seconds, metrics = train(family, data, args.epochs, seed)
                synthetic, _ = synthetic_set(model, dataclasses.replace(evaluate, seed=seed), manifest.num_classes)
                fidelity = fidelity_metrics(reference, unseen, synthetic.images, seed)
                row = {"family": family, "seed": seed, "fid": fidelity["fid"], "precision": fidelity["precision"],
                       "recall": fidelity["recall"], "pca_fid": pca_fid(pca, unseen, synthetic.images),
                       "val_elbo": metrics.get("val_elbo"), "seconds": seconds}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    by = {f: [r for r in rows if r["family"] == f] for f in FAMILIES}
    median = {f: {k: statistics.median(r[k] for r in by[f]) for k in ("fid", "pca_fid")} for f in FAMILIES}
    met = median["vae_gan"]["fid"] <= median["vae"]["fid"]
    met_outside = median["vae_gan"]["pca_fid"] <= median["vae"]["pca_fid"]
    lines = [
        "## `vae_gan` vs `vae` on FID (benchmarks/vae_gan_fid.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, `python -m benchmarks.vae_gan_fid --dataset {args.dataset} --epochs "
        f"{args.epochs} --seeds {args.seeds} --samples {args.samples}`: each family trained {args.epochs} epochs "
        f"(batch 64) by the real loop with its defaults, {args.seeds} seeds, interleaved; {args.samples} samples per "
        f"model at pixel temperature 0.25, 8-bit, against {len(unseen)} real images the reference classifier did "
        f"not train on (val + its early-stopping split). Reference classifier: val accuracy "
        f"{reference_accuracy:.3f} after {report.steps} steps; FID of real val vs that early-stopping split "
        f"(the floor): {floor['fid']:.2f}. PCA FID: scikit-learn PCA, 50 components fitted on real train pixels "
        "(a feature space vaepipe did not write). Median (min–max) over seeds; 2-core CPU.",
        "",
        "| family | FID, reference features | precision | recall | FID, PCA-50 pixels | val ELBO | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        r = by[family]
        lines.append(f"| `{family}` | {summary([x['fid'] for x in r])} | {summary([x['precision'] for x in r])} | "
                     f"{summary([x['recall'] for x in r])} | {summary([x['pca_fid'] for x in r])} | "
                     f"{summary([x['val_elbo'] for x in r])} | {summary([x['seconds'] for x in r])} |")
    lines += ["", f"Target: `vae_gan` not worse than `vae` on FID (medians): reference features "
                  f"{'**met**' if met else '**missed**'} ({median['vae_gan']['fid']:.2f} vs {median['vae']['fid']:.2f}); "
                  f"PCA-50 pixels {'**met**' if met_outside else '**missed**'} "
                  f"({median['vae_gan']['pca_fid']:.2f} vs {median['vae']['pca_fid']:.2f})."]
    update_section(args.out, "\n".join(lines))
    print(json.dumps({"rows": rows, "met": met, "met_outside": met_outside}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
