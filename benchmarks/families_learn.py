"""Does every family in `vaepipe models` learn with its defaults? Each one is trained for a short,
fixed budget by the real training loop (`run_loop`, one process, the default backbone, schedule and
clipping) on shapes and on mnist5k, and its held-out log-likelihood is compared with its own
untrained value: IWAE log p(x) (k importance samples) for the variational families, minus the
reconstruction loss for `ae` / `dae`. Writes a section of BENCHMARKS.md; exits 1 if a family fails.

    python -m benchmarks.families_learn [--steps 150] [--k 50] [--families vae,cvae] [--datasets mnist5k]

A family passes when it gains at least `--margin` (default 25%) of its untrained distance from zero:
untrained models sit at ~-540 nats (mnist5k) / ~-2,800 (shapes), trained ones far closer.
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
from pipelines.data.manifest import read_manifest
from pipelines.training.sessions import LocalSession
from pipelines.training.loop import run_loop

DATASETS = {
    "mnist5k": {"source": "mnist5k", "limit": None, "val_fraction": 0.2},
    "shapes": {"source": "shapes", "limit": 6000, "val_fraction": 0.1},
}
EVAL_IMAGES = 200


def held_out_score(model, images: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean IWAE log p(x) (conditional families: log p(x|y)), or -recon for the deterministic ones."""
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        if model.is_variational:
            given = labels if model.is_conditional and model.name != "ssvae" else None
            return float(model.log_likelihood(images, k=k, chunk_size=25, labels=given).mean())
        return -float(model.loss({"image": images, "label": labels})["recon"])


def one_family(name: str, data: Path, steps: int, k: int, images: torch.Tensor, labels: torch.Tensor,
               shape: tuple[int, int, int], num_classes: int) -> dict:
    cls = vaemodels.MODELS[name]
    torch.manual_seed(0)  # the loop seeds with train.seed = 0 too: same initial weights as below
    untrained = vaemodels.build(name, shape, num_classes if cls.is_conditional else None)
    before = held_out_score(untrained, images, labels, k)
    session = LocalSession()
    started = time.perf_counter()
    metrics = run_loop({"data": str(data), "model": {"name": name, "params": {}},
                        "train": {"epochs": 1, "max_steps_per_epoch": steps, "batch_size": 64,
                                  "shuffle_buffer": 10_000}}, session)
    seconds = time.perf_counter() - started
    trained = vaemodels.load_model(Path(session.latest_checkpoint) / "model")
    after = held_out_score(trained, images, labels, k)
    return {"family": name, "before": before, "after": after, "seconds": seconds,
            "active_units": metrics.get("val_active_units")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per family and dataset")
    parser.add_argument("--k", type=int, default=50, help="importance samples for IWAE")
    parser.add_argument("--margin", type=float, default=0.25, help="required gain, as a share of |untrained|")
    parser.add_argument("--families", default=",".join(n for n, c in vaemodels.MODELS.items() if c.modality == "image"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            spec = DATASETS[dataset]
            data = Path(tmp) / dataset
            build_dataset(BuildConfig(source=spec["source"], out=str(data), limit=spec["limit"],
                                      val_fraction=spec["val_fraction"], seed=0, shard_size=100_000))
            val = list(ShardStream(str(data), "val", shuffle_buffer=0))[:EVAL_IMAGES]
            images = torch.stack([s["image"] for s in val])
            labels = torch.tensor([int(s["label"]) for s in val])
            num_classes = read_manifest(str(data)).num_classes
            for name in args.families.split(","):
                row = {"dataset": dataset, **one_family(name, data, args.steps, args.k, images, labels,
                                                        tuple(images.shape[1:]), num_classes)}
                row["ok"] = row["after"] - row["before"] >= args.margin * abs(row["before"])
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
                if not row["ok"]:
                    failed.append(f"{name} on {dataset}")
    lines = [
        "## Every family learns with its defaults (benchmarks/families_learn.py)",
        "",
        f"`python -m benchmarks.families_learn --steps {args.steps} --k {args.k}`: each family trained "
        f"{args.steps} steps (batch 64) by the real loop with its defaults; held-out score on {EVAL_IMAGES} "
        "val images: IWAE log p(x) in nats (conditional: log p(x|y)), −reconstruction for ae/dae. "
        f"Pass = gain ≥ {args.margin:.0%} of |untrained|.",
        "",
        "| dataset | family | untrained | trained | active units | train s | pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        au = "" if r["active_units"] is None else f"{r['active_units']:.0f}"
        lines.append(f"| {r['dataset']} | `{r['family']}` | {r['before']:.1f} | {r['after']:.1f} | {au} | "
                     f"{r['seconds']:.0f} | {'yes' if r['ok'] else '**no**'} |")
    update_section(args.out, "\n".join(lines))
    print(json.dumps({"rows": rows, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
