"""Held-out likelihood of vaepipe's `vae` against pythae's VAE on the same mnist5k split and budget
(issues 17 and 12), side by side in one run, plus the pre-fix data path (class-sorted shards read
one at a time) to show what the shard order cost. Writes a section of BENCHMARKS.md.

    python -m benchmarks.vae_vs_pythae [--runs 3] [--epochs 10] [--pythae-python PATH]

Every arm: latent 16, batch 128, 10 epochs over the same 4,000 training images (mnist5k,
`--val-fraction 0.2 --seed 0`), Adam lr 1e-3, Bernoulli likelihood (BCE), MLP networks (each
library's default MLP), then the IWAE estimate of log p(x) with k importance samples on the same
1,000 validation images; NLL = -mean. pythae runs in its own virtualenv (it pins other versions of
what vaepipe uses): `make bench-pythae` makes it in .bench-venvs/pythae (torch==2.13.0 + pythae==0.1.2)
and runs this; `--pythae-python` (or PYTHAE_PYTHON) points at another one.
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

import numpy as np
import torch

LATENT, BATCH, LR = 16, 128, 1e-3
PYTHAE_ARM = Path(__file__).with_name("pythae_vae_arm.py")


def build_split(root: Path) -> tuple[Path, Path, Path]:
    """The mnist5k split built twice: as vaepipe builds it now, and class-sorted as before issue 17;
    plus the same images as arrays for pythae."""
    from pipelines.data import BuildConfig, ShardStream, build_dataset
    from pipelines.data import build as build_module

    shuffled, sorted_, arrays = root / "shuffled", root / "sorted", root / "split.npz"
    config = dict(source="mnist5k", shard_size=1000, val_fraction=0.2, seed=0)
    build_dataset(BuildConfig(out=str(shuffled), **config))
    new_split = build_module.split_indices
    build_module.split_indices = lambda n, f, s: {k: np.sort(v) for k, v in new_split(n, f, s).items()}
    try:
        build_dataset(BuildConfig(out=str(sorted_), **config))
    finally:
        build_module.split_indices = new_split
    split = {}
    for name in ("train", "val"):
        samples = sorted(ShardStream(str(shuffled), name, shuffle_buffer=0), key=lambda s: int(s["index"]))
        split[f"x_{name}"] = torch.stack([s["image"] for s in samples]).numpy()
    np.savez(arrays, **split)
    return shuffled, sorted_, arrays


# vaepipe's default MLP (1 x 512 since issue 12, pythae's default shape too) and the old default (2 x 256)
MLP_SHAPES = {"default": {}, "old_default": {"hidden_dim": 256, "mlp_layers": 2}}


def vaepipe_arm(data: Path, storage: Path, seed: int, epochs: int, k: int, open_shards: int,
                mlp: dict | None = None) -> dict:
    """`vaepipe train`'s loop in one process (no Ray start-up: NLL is what is compared here)."""
    import vaemodels
    from pipelines.training.sessions import LocalSession
    from pipelines.training.loop import run_loop

    config = {
        "data": str(data), "storage": str(storage),
        "model": {"name": "vae", "params": {"backbone": "mlp", "latent_dim": LATENT, **(mlp or {})}},
        "optim": {"lr": LR},
        "train": {"batch_size": BATCH, "epochs": epochs, "seed": seed, "checkpoint_every": 100_000,
                  "open_shards": open_shards},
        "tracking": {"tracking_uri": f"sqlite:///{storage / 'mlflow.db'}"},
    }
    started = time.perf_counter()
    session = LocalSession()
    run_loop(config, session)
    train_s = time.perf_counter() - started
    model = vaemodels.load_model(Path(session.latest_checkpoint) / "model").eval()
    x_val = torch.from_numpy(np.load(storage.parent / "split.npz")["x_val"])
    torch.manual_seed(seed)
    with torch.no_grad():
        nll = -torch.cat([model.log_likelihood(x_val[i:i + 100], k=k) for i in range(0, len(x_val), 100)]).mean()
    return {"nll": float(nll), "train_s": train_s}


def pythae_arm(python: str, arrays: Path, seed: int, epochs: int, k: int, workdir: Path) -> dict:
    out = subprocess.run(
        [python, str(PYTHAE_ARM), "--data", str(arrays), "--seed", str(seed), "--epochs", str(epochs),
         "--k", str(k), "--latent", str(LATENT), "--batch", str(BATCH), "--lr", str(LR), "--workdir", str(workdir)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per arm (median, min and max are reported)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--k", type=int, default=1000, help="importance samples of the IWAE estimate")
    parser.add_argument("--pythae-python", default=os.environ.get("PYTHAE_PYTHON", ".bench-venvs/pythae/bin/python"))
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not Path(args.pythae_python).exists():
        parser.error(f"no python at {args.pythae_python}: install pythae in a throwaway venv (see the module docstring)")

    results: dict[str, list[dict]] = {"vaepipe": [], "vaepipe_2x256": [], "vaepipe_sorted": [], "pythae": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shuffled, sorted_, arrays = build_split(root)
        for seed in range(args.runs):
            for arm in results:  # interleaved, so machine load drifts hit every arm alike
                work = root / f"{arm}-{seed}"
                work.mkdir()
                if arm == "pythae":
                    r = pythae_arm(args.pythae_python, arrays, seed, args.epochs, args.k, work)
                elif arm == "vaepipe_sorted":
                    r = vaepipe_arm(sorted_, work, seed, args.epochs, args.k, open_shards=1)
                else:
                    r = vaepipe_arm(shuffled, work, seed, args.epochs, args.k, open_shards=4,
                                    mlp=MLP_SHAPES["old_default" if arm == "vaepipe_2x256" else "default"])
                results[arm].append(r)
                print(f"[bench] {arm} seed {seed}: NLL {r['nll']:.2f} nats, training {r['train_s']:.1f} s",
                      file=sys.stderr)

    nll = {arm: [r["nll"] for r in rs] for arm, rs in results.items()}
    wall = {arm: [r["train_s"] for r in rs] for arm, rs in results.items()}
    met = statistics.median(nll["vaepipe"]) <= statistics.median(nll["pythae"])
    load = os.getloadavg()[0]
    rows = {
        "vaepipe": "vaepipe `vae`, default MLP (1 x 512, the shape of pythae's default), shuffled shards, 4 shards open per reader slot",
        "vaepipe_2x256": "vaepipe `vae`, the MLP default before this change (2 x 256: `hidden_dim=256, mlp_layers=2`), shuffled shards",
        "vaepipe_sorted": "vaepipe `vae`, class-sorted shards read one at a time (the path before issue 17)",
        "pythae": "pythae 0.1.2 `VAE` (its default MLP encoder/decoder, BCE), BaseTrainer",
    }
    lines = [
        "## VAE held-out likelihood vs pythae (benchmarks/vae_vs_pythae.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, mnist5k (4,000 train / 1,000 val, seed 0), latent {LATENT}, batch {BATCH}, "
        f"{args.epochs} epochs, Adam lr {LR}, Bernoulli likelihood; NLL = −IWAE log p(x) with k = {args.k} on the "
        f"1,000 val images, {args.runs} seeds per arm, interleaved in one run; 2-core CPU, 1-min load average "
        f"{load:.1f} at the end. Training wall time excludes evaluation (vaepipe's includes its per-epoch "
        "validation pass).",
        "",
        "| arm | NLL nats, median (min–max) | training s, median (min–max) |",
        "|---|---|---|",
        *[f"| {rows[arm]} | {summary(nll[arm])} | {summary(wall[arm])} |" for arm in results],
        "",
        f"Target: vaepipe's NLL (default MLP) at most pythae's: **{'met' if met else 'missed'}** "
        f"({statistics.median(nll['vaepipe']):.1f} vs {statistics.median(nll['pythae']):.1f} nats, medians).",
    ]
    from benchmarks.report import update_section

    update_section(args.report, "\n".join(lines))
    print(json.dumps({"nll": nll, "train_s": wall, "target_met": met}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
