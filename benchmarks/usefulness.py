"""Does the synthetic data help a classifier? Issue 12's numbers, through the commands a user runs:
`vaepipe data build` -> `vaepipe train` (defaults: only data, model and epochs given) ->
`vaepipe generate --per-class N` -> `vaepipe evaluate --synthetic`, then the same question asked
again by classifiers vaepipe did not write (scikit-learn's SVC and HistGradientBoosting on raw
pixels), so the verdict does not rest on vaepipe's own evaluator. Writes a section of BENCHMARKS.md.

    python -m benchmarks.usefulness [--dataset mnist5k|shapes] [--epochs E] [--per-class N]
        [--filter-confidence P (default 0.9; 0 skips that arm)] [--plain-mean] [--keep DIR]
        [--train-arg=--batch-size --train-arg=16]   # more `vaepipe train` flags, named in the section
        [--mixture-prior]   # also judge `--latent-prior mixture --prior-data DATA` (codes from a fitted mixture)

Arms, each generated from the one trained model and judged the same way: `vaepipe generate`'s defaults;
optionally `--pixel-temperature 1` (the plain decoder mean); classifier-filtered sampling with the
reference classifier the first evaluation saved (`--filter-classifier REPORT/reference_classifier`).

Targets (issue 12): mnist5k `cvae` trained in <= 5 min, reference accuracy >= 0.97, CAS >= 0.90 x
TRTR, augmentation gain at 10% real > 0 beyond one std; shapes reference accuracy >= 0.95, CAS >=
0.85 x TRTR.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASETS = {  # build flags, the targets
    "mnist5k": {"build": ["--source", "mnist5k", "--val-fraction", "0.2", "--seed", "0"],
                "reference": 0.97, "cas_ratio": 0.90, "train_s": 300},
    "shapes": {"build": ["--source", "shapes", "--limit", "12000", "--val-fraction", "0.1", "--seed", "0"],
               "reference": 0.95, "cas_ratio": 0.85, "train_s": None},
}


def vaepipe(*args: str) -> tuple[dict, float]:
    """Run one vaepipe command as a user would; its last stdout line is the JSON result."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"vaepipe {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def real_split(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, C*H*W) in [0, 1] and labels of a built split, read with plain webdataset (no vaepipe code)."""
    import webdataset as wds
    from PIL import Image

    manifest = json.loads((data / "manifest.json").read_text())
    urls = [str(data / s["name"]) for s in manifest["splits"][split]["shards"]]
    xs, ys = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        xs.append(np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float32).ravel() / 255.0)
        ys.append(int(sample["cls"]))
    return np.stack(xs), np.array(ys)


def synthetic_split(out: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The generated image folder (OUT/images/<class>/*.png), read with PIL alone."""
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(class_names):
        folder = out / "images" / name
        if not folder.is_dir():
            folder = out / "images" / str(label)
        for png in sorted(folder.glob("*.png")):
            xs.append(np.asarray(Image.open(png), dtype=np.float32).ravel() / 255.0)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def outside_check(data: Path, synthetic: Path, class_names: list[str], seeds: int = 3) -> dict:
    """TSTR/TRTR and the 10% augmentation gain with scikit-learn classifiers on raw pixels."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.svm import SVC

    x_train, y_train = real_split(data, "train")
    x_val, y_val = real_split(data, "val")
    x_syn, y_syn = synthetic_split(synthetic, class_names)
    makers = {"svc": lambda seed: SVC(C=5.0, gamma="scale", random_state=seed),
              "hgb": lambda seed: HistGradientBoostingClassifier(max_iter=100, random_state=seed)}
    result = {}
    for name, make in makers.items():
        trtr = make(0).fit(x_train, y_train).score(x_val, y_val)
        tstr = make(0).fit(x_syn, y_syn).score(x_val, y_val)
        gains = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            subset = rng.choice(len(x_train), size=len(x_train) // 10, replace=False)
            alone = make(seed).fit(x_train[subset], y_train[subset]).score(x_val, y_val)
            mixed = make(seed).fit(np.concatenate([x_train[subset], x_syn]),
                                   np.concatenate([y_train[subset], y_syn])).score(x_val, y_val)
            gains.append(mixed - alone)
        result[name] = {"trtr": trtr, "tstr": tstr, "ratio": tstr / trtr,
                        "gain_10pct": float(np.mean(gains)), "gain_10pct_std": float(np.std(gains))}
    return result


def judge_arm(data: Path, model: str, workdir: Path, arm: str, class_names: list[str], generate_args: list[str],
              per_class: int) -> dict:
    """generate -> evaluate -> outside check for one way of generating."""
    synthetic, report = workdir / f"synthetic-{arm}", workdir / f"report-{arm}"
    generated, generate_s = vaepipe("generate", "--model", model, "--out", str(synthetic),
                                    "--per-class", str(per_class), "--seed", "1", *generate_args)
    print(f"[bench] {arm}: generated in {generate_s:.0f} s (acceptance {generated.get('acceptance_rate')})",
          file=sys.stderr)
    _, evaluate_s = vaepipe("evaluate", "--model", model, "--data", str(data), "--synthetic", str(synthetic),
                            "--out", str(report))
    metrics = json.loads((report / "metrics.json").read_text())
    outside = outside_check(data, synthetic, class_names)
    print(f"[bench] {arm}: evaluated in {evaluate_s:.0f} s: CAS {metrics.get('cas')}, outside {outside}",
          file=sys.stderr)
    return {"arm": arm, "generate_args": generate_args, "generate_s": generate_s, "evaluate_s": evaluate_s,
            "acceptance_rate": generated.get("acceptance_rate"), "metrics": metrics, "outside": outside,
            "report": str(report)}


def run(dataset: str, epochs: int, per_class: int, workdir: Path, filter_confidence: float | None,
        plain_mean: bool, train_args: list[str] | None = None, mixture_prior: bool = False) -> dict:
    data, storage = workdir / "data", workdir / "runs"
    build, _ = vaepipe("data", "build", *DATASETS[dataset]["build"], "--out", str(data))
    print(f"[bench] built {build['samples']}", file=sys.stderr)
    trained, train_s = vaepipe("train", "--data", str(data), "--model", "cvae", "--epochs", str(epochs),
                               "--storage", str(storage), "--name", f"{dataset}-cvae", *(train_args or []))
    print(f"[bench] trained in {train_s:.0f} s: {trained['metrics'].get('val_elbo')}", file=sys.stderr)
    model = str(Path(trained["checkpoint"]) / "model")
    class_names = json.loads((data / "manifest.json").read_text())["class_names"]
    # the default generation (sharpened means), then the plain decoder mean it replaced, then (optionally)
    # classifier-filtered sampling with the reference classifier the first evaluation saved
    arms = [judge_arm(data, model, workdir, "default", class_names, [], per_class)]
    if plain_mean:
        arms.append(judge_arm(data, model, workdir, "plain-mean", class_names, ["--pixel-temperature", "1"], per_class))
    if mixture_prior:
        arms.append(judge_arm(data, model, workdir, "mixture-prior", class_names,
                              ["--latent-prior", "mixture", "--prior-data", str(data)], per_class))
    if filter_confidence is not None:
        classifier = str(Path(arms[0]["report"]) / "reference_classifier")
        arms.append(judge_arm(data, model, workdir, f"filtered-{filter_confidence:g}", class_names,
                              ["--filter-classifier", classifier, "--filter-confidence", str(filter_confidence)],
                              per_class))
    return {"dataset": dataset, "epochs": epochs, "per_class": per_class, "train_s": train_s,
            "train_args": list(train_args or []),
            "val_elbo": trained["metrics"].get("val_elbo"),
            "val_active_units": trained["metrics"].get("val_active_units"), "arms": arms}


ARM_TITLES = {"default": "`vaepipe generate` defaults (pixel temperature 0.25)",
              "mixture-prior": "`--latent-prior mixture --prior-data DATA` (50 Gaussians per class)",
              "plain-mean": "`--pixel-temperature 1` (the plain decoder mean, the default before)"}


def section(r: dict) -> str:
    target = DATASETS[r["dataset"]]
    verdict = lambda ok: "**met**" if ok else "**missed**"
    lines = [
        f"## Usefulness of synthetic data, {r['dataset']} (benchmarks/usefulness.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}: `vaepipe train --model cvae --epochs {r['epochs']}"
        f"{''.join(' ' + a for a in r.get('train_args', []))}` (all other settings "
        f"default), then per arm `vaepipe generate --per-class {r['per_class']} --seed 1 [ARM FLAGS]` and "
        "`vaepipe evaluate --synthetic` (defaults: gains over 3 seeds); one training run; 2-core CPU, 1-min load "
        f"average {os.getloadavg()[0]:.1f} at the end (other work ran beside it: wall times are upper bounds).",
        "",
        f"Training {r['train_s']:.0f} s (whole command, Ray start-up included), val ELBO {r['val_elbo']:.1f}, "
        f"active units {r['val_active_units']:.0f}.",
        "",
        "| arm | judge | TRTR | CAS / TSTR | ratio | gain at 10% real (± std) |",
        "|---|---|---|---|---|---|",
    ]
    for a in r["arms"]:
        m = a["metrics"]
        title = ARM_TITLES.get(a["arm"], f"`{' '.join(a['generate_args'][2:])}` filter, acceptance "
                                          f"{a['acceptance_rate'] or float('nan'):.2f}")
        lines.append(f"| {title} | vaepipe reference CNN (val accuracy {m['reference_accuracy']:.3f}) | "
                     f"{m['trtr_accuracy']:.3f} | {m['cas']:.3f} | {m['cas_ratio']:.3f} | "
                     f"{m['augmentation_gain_10pct']:+.3f} ± {m['augmentation_gain_10pct_std']:.3f} |")
        lines += [f"| | scikit-learn {name.upper()} on pixels (outside check) | {o['trtr']:.3f} | {o['tstr']:.3f} | "
                  f"{o['ratio']:.3f} | {o['gain_10pct']:+.3f} ± {o['gain_10pct_std']:.3f} |"
                  for name, o in a["outside"].items()]
    lines.append("")
    for a in r["arms"]:
        m = a["metrics"]
        gains = ", ".join(f"{f}: {m[f'augmentation_gain_{f}']:+.3f} ± {m[f'augmentation_gain_{f}_std']:.3f}"
                          for f in ("1pct", "10pct", "100pct") if f"augmentation_gain_{f}" in m)
        lines.append(
            f"- {a['arm']}: gains (reference CNN) {gains}; memorisation ratio {m.get('memorisation_ratio', float('nan')):.2f}, "
            f"copies {m.get('copy_fraction', float('nan')):.3f} (val base rate {m.get('val_copy_fraction', float('nan')):.3f}); "
            f"FID {m.get('fid', float('nan')):.2f}, precision {m.get('precision', float('nan')):.3f}, recall "
            f"{m.get('recall', float('nan')):.3f}; worst-class CAS {m.get('cas_worst_class', float('nan')):.3f}; "
            f"generation {a['generate_s']:.0f} s, evaluation {a['evaluate_s']:.0f} s.")
    lines.append("")
    for a in r["arms"]:
        m = a["metrics"]
        line = (f"Targets, {a['arm']}: reference accuracy >= {target['reference']} "
                f"{verdict(m['reference_accuracy'] >= target['reference'])}; CAS >= {target['cas_ratio']} x TRTR "
                f"{verdict(m['cas_ratio'] >= target['cas_ratio'])}")
        if r["dataset"] == "mnist5k":
            gain_ok = m["augmentation_gain_10pct"] > m["augmentation_gain_10pct_std"]
            line += (f"; gain at 10% > 0 beyond one std {verdict(gain_ok)}; training <= {target['train_s']} s "
                     f"{verdict(r['train_s'] <= target['train_s'])}")
        lines += [line + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist5k")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--report", default="BENCHMARKS.md")
    parser.add_argument("--keep", help="keep the work folder here instead of a temporary one")
    parser.add_argument("--filter-confidence", type=float, default=0.9,
                        help="also judge classifier-filtered generation at this confidence (0 = skip the arm)")
    parser.add_argument("--train-arg", action="append", default=[], metavar="FLAG",
                        help="one more `vaepipe train` argument (repeatable; use --train-arg=--batch-size)")
    parser.add_argument("--mixture-prior", action="store_true",
                        help="also judge `--latent-prior mixture --prior-data DATA` (a mixture fitted to real codes)")
    parser.add_argument("--plain-mean", action="store_true",
                        help="also judge `--pixel-temperature 1` (the plain decoder mean)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.dataset, args.epochs, args.per_class, workdir, args.filter_confidence or None,
                     args.plain_mean, args.train_arg, args.mixture_prior)
    from benchmarks.report import update_section

    update_section(args.report, section(result))
    summary = {**{k: v for k, v in result.items() if k != "arms"}, "arms": [
        {**{k: v for k, v in a.items() if k != "metrics"},
         "metrics": {k: v for k, v in a["metrics"].items() if isinstance(v, (int, float))}} for a in result["arms"]]}
    if args.keep:
        (Path(args.keep) / "usefulness-result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
