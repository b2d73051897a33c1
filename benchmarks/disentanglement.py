"""β-VAE disentanglement on shapes with a searched β (issue 12): MIG ≥ 0.2 is the target.

For each β in a grid, `beta_vae` is trained by the real training loop (`run_loop`, one process,
the family's defaults otherwise) on shapes shards, and the Mutual Information Gap of its posterior
means against the known factors is computed on train images, exactly as `vaepipe evaluate`
computes `mig` (the same `embed` and `mutual_information_gap`). The search picks the β with the
highest MIG, which needs the ground-truth factors: the selection protocol of disentanglement_lib
(Locatello et al. 2019 report MIG per β), not an unsupervised model choice; the lowest-val-ELBO β
is reported beside it. An untrained model gives MIG's floor. Writes a section of BENCHMARKS.md.

    python -m benchmarks.disentanglement [--betas 1,4,8,16] [--epochs 8] [--limit 10000]
        [--param capacity_max=25 --param capacity_steps=4000]   # more beta_vae params: its own section
        [--param beta_target=total_correlation]                  # β-TCVAE (Chen et al. 2018)
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
from pipelines.data import BuildConfig, build_dataset
from pipelines.data.manifest import read_manifest
from pipelines.evaluation.data import embed, load_split
from pipelines.evaluation.metrics.disentanglement import factor_gaps
from pipelines.training.loop import run_loop
from pipelines.training.sessions import LocalSession

TARGET = 0.2
MIG_IMAGES = 5000  # train images the MIG is computed on (evaluate's default train limit is larger)


def mig_of(model, split) -> tuple[float, list[float]]:
    gaps = factor_gaps(embed(model.eval(), split).numpy(), split.factors.numpy())
    return float(gaps.mean()), [round(float(g), 3) for g in gaps]


def parse_params(pairs: list[str]) -> dict[str, float | int | str]:
    """`--param NAME=VALUE` pairs -> beta_vae params: ints stay ints (capacity_steps), other numbers
    become floats, anything else stays a string (beta_target=total_correlation); the model's config
    checks names and values."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--param takes NAME=VALUE, got {pair!r}")
        if value.lstrip("-").isdigit():
            params[name] = int(value)
            continue
        try:
            params[name] = float(value)
        except ValueError:
            params[name] = value
    return params


def one_beta(beta: float, data: Path, epochs: int, batch_size: int, split, params: dict | None = None) -> dict:
    session = LocalSession()
    started = time.perf_counter()
    metrics = run_loop({"data": str(data), "model": {"name": "beta_vae", "params": {"beta": beta, **(params or {})}},
                        "train": {"epochs": epochs, "batch_size": batch_size, "shuffle_buffer": 10_000}}, session)
    seconds = time.perf_counter() - started
    model = vaemodels.load_model(Path(session.latest_checkpoint) / "model")
    mig, gaps = mig_of(model, split)
    return {"beta": beta, "mig": mig, "gaps": gaps, "val_elbo": metrics.get("val_elbo"),
            "val_kl": metrics.get("val_kl"), "active_units": metrics.get("val_active_units"), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", default="1,4,8,16", help="β grid (comma-separated)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=10_000, help="shapes samples (10%% go to val)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="another beta_vae param for every arm (e.g. capacity_max=25); written to its own section")
    args = parser.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    params = parse_params(args.param)
    vaemodels.build("beta_vae", (1, 64, 64), None, **params)  # a bad name or value fails now, not after the data
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        build_dataset(BuildConfig(source="shapes", out=str(data), limit=args.limit, val_fraction=0.1, seed=0))
        manifest = read_manifest(str(data))
        split = load_split(manifest, "train", MIG_IMAGES, seed=0)
        factor_names = manifest.factor_names
        torch.manual_seed(0)
        untrained_mig, untrained_gaps = mig_of(vaemodels.build("beta_vae", tuple(split.images.shape[1:]), None), split)
        print(json.dumps({"beta": None, "untrained_mig": untrained_mig}), file=sys.stderr, flush=True)
        for beta in betas:
            row = one_beta(beta, data, args.epochs, args.batch_size, split, params)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    best = max(rows, key=lambda r: r["mig"])
    best_elbo = max(rows, key=lambda r: r["val_elbo"] if r["val_elbo"] is not None else float("-inf"))
    met = best["mig"] >= TARGET
    extra = ", ".join(f"{k}={v}" for k, v in params.items())
    flags = "".join(f" --param {k}={v}" for k, v in params.items())
    lines = [
        f"## β-VAE disentanglement on shapes, searched β{', ' + extra if extra else ''} (benchmarks/disentanglement.py)",
        "",
        f"`python -m benchmarks.disentanglement --betas {args.betas} --epochs {args.epochs} --limit {args.limit}"
        f"{' --batch-size ' + str(args.batch_size) if args.batch_size != 64 else ''}{flags}`: "
        f"{args.limit:,} shapes ({args.limit - args.limit // 10:,} train), `beta_vae` trained {args.epochs} epochs "
        f"(batch {args.batch_size}) per β by the real loop with its other defaults; MIG (20 bins, as `vaepipe "
        f"evaluate`) of the posterior means of {MIG_IMAGES:,} train images against the factors "
        f"({', '.join(factor_names) or 'shape, scale, orientation, pos_x, pos_y'}); one seed per β; 2-core CPU.",
        "",
        "| β | MIG | per-factor gap | val ELBO | val KL | active units | train s |",
        "|---|---|---|---|---|---|---|",
        f"| untrained | {untrained_mig:.3f} | {untrained_gaps} | | | | |",
    ]
    for r in rows:
        au = "" if r["active_units"] is None else f"{r['active_units']:.0f}"
        elbo = "" if r["val_elbo"] is None else f"{r['val_elbo']:.1f}"
        kl = "" if r["val_kl"] is None else f"{r['val_kl']:.1f}"
        lines.append(f"| {r['beta']:g} | {r['mig']:.3f} | {r['gaps']} | {elbo} | {kl} | {au} | {r['seconds']:.0f} |")
    lines += ["",
              f"Searched β (highest MIG): β = {best['beta']:g}, MIG {best['mig']:.3f}; target MIG ≥ {TARGET}: "
              f"{'**met**' if met else '**missed**'}. The best-val-ELBO β would be {best_elbo['beta']:g} "
              f"(MIG {best_elbo['mig']:.3f})."]
    update_section(args.out, "\n".join(lines))
    print(json.dumps({"rows": rows, "best_beta": best["beta"], "best_mig": best["mig"], "target_met": met}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
