"""vaepipe's tabular VAE (`tvae`) against SDV's TVAESynthesizer on the same tables, split, batch size and
epochs (issue 15), side by side in one run; both judged by the same code (pipelines/evaluation/table_metrics.py):
SDMetrics' quality score against the real train rows, TSTR / TRTR (HistGradientBoosting tested on real
val), detection AUROC, DCR and exact copies. Writes a section of BENCHMARKS.md.

    python -m benchmarks.tables_vs_sdv [--runs 3] [--epochs 300] [--sdv-python PATH]

Tables: `student_placements` (the mixed-type table sdmetrics ships, 215 rows, label `placed`) and, when
statsmodels is installed, its `fair` data (6,366 rows; label `had_affair` = affairs > 0, `affairs` itself
dropped; occupation codes as categories). Split: `--val-fraction 0.3 --seed 0`. Both arms: batch 500 (or
the train split when smaller, so every epoch is at least one step), the same epochs, Adam lr 1e-3 with
weight decay 1e-5, TVAE's network (128-dim code, 2 x 128 layers, loss_factor 2). Each draws as many
synthetic rows as the train split has; vaepipe draws them with the train split's class mix (its model
is label-conditional), SDV's model generates the label as one more column. SDV runs in its own
virtualenv: `make bench-sdv` makes it in .bench-venvs/sdv (torch==2.13.0 + sdv==2.0.0) and runs this.
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

import pandas as pd

SDV_ARM = Path(__file__).with_name("sdv_tvae_arm.py")
BATCH, LR, WEIGHT_DECAY = 500, 1e-3, 1e-5
METRICS = ("quality_score", "column_shapes", "column_pair_trends", "tstr_accuracy", "trtr_accuracy", "tstr_ratio",
           "detection_auroc", "dcr_ratio", "exact_copy_fraction", "holdout_exact_copy_fraction", "epoch_s")


def tables(root: Path) -> dict[str, dict]:
    """name -> BuildConfig fields; `fair` only when statsmodels is installed."""
    out = {"student_placements": {"source": "student_placements"}}
    try:
        from statsmodels.datasets import fair
    except ImportError:
        print("[bench] statsmodels is not installed: the fair table is left out", file=sys.stderr)
        return out
    frame = fair.load_pandas().data
    frame["had_affair"] = frame.pop("affairs") > 0
    for column in ("occupation", "occupation_husb"):
        frame[column] = frame[column].astype(int)
    path = root / "fair.parquet"
    frame.to_parquet(path)
    out["fair"] = {"source": f"parquet:{path}", "label": "had_affair",
                   "column_types": ("occupation=categorical", "occupation_husb=categorical")}
    return out


def vaepipe_arm(data: Path, work: Path, seed: int, epochs: int, batch: int, rows: int) -> tuple[pd.DataFrame, float]:
    """`vaepipe train`'s loop in one process (as `--workers 0`), then rows drawn from the trained model."""
    import vaemodels
    from pipelines.data import read_manifest
    from pipelines.evaluation.table_evaluate import draw_synthetic, read_split
    from pipelines.evaluation.table_metrics import labels_of
    from pipelines.training.loop import run_loop
    from pipelines.training.sessions import LocalSession

    config = {
        "data": str(data), "storage": str(work),
        "model": {"name": "tvae", "params": {}},
        "optim": {"lr": LR, "weight_decay": WEIGHT_DECAY},
        "train": {"batch_size": batch, "epochs": epochs, "seed": seed, "checkpoint_every": 1_000_000},
        "tracking": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
    }
    import torch._dynamo  # noqa: F401  one-off lazy imports (Adam's, the GMM's), paid outside the timing in both arms
    import sklearn.mixture  # noqa: F401

    class TimedSession(LocalSession):  # epoch-end report times: the steady per-epoch cost, start-up aside
        def __init__(self):
            super().__init__()
            self.report_times: list[float] = []

        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            self.report_times.append(time.perf_counter())

    started = time.perf_counter()
    session = TimedSession()
    run_loop(config, session)
    train_s = time.perf_counter() - started
    steady = (session.report_times[-1] - session.report_times[0]) / max(len(session.report_times) - 1, 1)
    model = vaemodels.load_model(Path(session.latest_checkpoint) / "model").eval()
    manifest = read_manifest(data)
    train = read_split(manifest, "train", 10**9, 0)
    return draw_synthetic(model, labels_of(train, manifest.data["table"]), rows, seed), train_s, steady


def sdv_arm(python: str, train: pd.DataFrame, spec: dict, work: Path, seed: int, epochs: int, batch: int
            ) -> tuple[pd.DataFrame, float]:
    from pipelines.evaluation.table_metrics import sdmetrics_metadata

    train.to_parquet(work / "train.parquet")
    sdtypes = {name: c["sdtype"] for name, c in sdmetrics_metadata(spec)["columns"].items()}
    (work / "sdtypes.json").write_text(json.dumps(sdtypes))
    out = subprocess.run([python, str(SDV_ARM), "--train", str(work / "train.parquet"), "--sdtypes",
                          str(work / "sdtypes.json"), "--out", str(work / "synthetic.parquet"), "--epochs", str(epochs),
                          "--batch-size", str(batch), "--rows", str(len(train)), "--seed", str(seed)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    synthetic = pd.read_parquet(work / "synthetic.parquet")
    return synthetic[train.columns], result["fit_s"]


def judge(train: pd.DataFrame, val: pd.DataFrame, synthetic: pd.DataFrame, spec: dict, seed: int) -> dict:
    from pipelines.evaluation import table_metrics as tm

    out = tm.quality_report(train, synthetic, spec)[0]
    out.update(tm.tstr_trtr(train, val, synthetic, spec, seed))
    out["detection_auroc"] = tm.detection_auroc(train, synthetic, spec, seed)
    out.update(tm.privacy(train, val, synthetic, spec))
    return out


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per arm (median, min and max are reported)")
    parser.add_argument("--epochs", type=int, default=300, help="TVAE's default")
    parser.add_argument("--tables", default=None, help="comma list (default: all available)")
    parser.add_argument("--sdv-python", default=os.environ.get("SDV_PYTHON", ".bench-venvs/sdv/bin/python"))
    parser.add_argument("--report", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not Path(args.sdv_python).exists():
        parser.error(f"no python at {args.sdv_python}: install sdv in a throwaway venv (`make bench-sdv`)")
    import torch

    from pipelines.data import BuildConfig, build_dataset, read_manifest
    from pipelines.evaluation.table_evaluate import read_split

    torch.set_num_threads(1)  # both arms alike: SDV's subprocess is pinned to one thread below too
    os.environ["OMP_NUM_THREADS"] = "1"
    results: dict[str, dict[str, list[dict]]] = {}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        available = tables(root)
        names = args.tables.split(",") if args.tables else list(available)
        for name in names:
            data = root / name
            started = time.perf_counter()
            build_dataset(BuildConfig(out=str(data), val_fraction=0.3, seed=0, shard_size=1000, **available[name]))
            build_s = time.perf_counter() - started
            manifest = read_manifest(data)
            spec = manifest.data["table"]
            train, val = read_split(manifest, "train", 10**9, 0), read_split(manifest, "val", 10**9, 0)
            batch = min(BATCH, len(train))
            sizes[name] = (len(train), len(val), batch, build_s)
            results[name] = {"vaepipe": [], "sdv": []}
            for seed in range(args.runs):
                for arm in ("vaepipe", "sdv"):  # interleaved, so load drifts hit both arms alike
                    work = root / f"{name}-{arm}-{seed}"
                    work.mkdir()
                    if arm == "vaepipe":
                        synthetic, seconds, steady = vaepipe_arm(data, work, seed, args.epochs, batch, len(train))
                    else:
                        synthetic, seconds = sdv_arm(args.sdv_python, train, spec, work, seed, args.epochs, batch)
                        steady = float("nan")
                    scores = {**judge(train, val, synthetic, spec, seed), "epoch_s": seconds / args.epochs,
                              "train_s": seconds, "steady_epoch_s": steady}
                    results[name][arm].append(scores)
                    print(f"[bench] {name} {arm} seed {seed}: quality {scores['quality_score']:.3f}, TSTR "
                          f"{scores['tstr_accuracy']:.3f} / TRTR {scores['trtr_accuracy']:.3f}, detection "
                          f"{scores['detection_auroc']:.3f}, copies {scores['exact_copy_fraction']:.3f}, "
                          f"{seconds:.1f} s", file=sys.stderr)

    load = os.getloadavg()[0]
    lines = ["## Tables: vaepipe tvae vs SDV TVAESynthesizer (benchmarks/tables_vs_sdv.py)", "",
             f"{time.strftime('%Y-%m-%d')}, {args.epochs} epochs, {args.runs} seeds per arm interleaved in one run, "
             f"Adam lr {LR} + weight decay {WEIGHT_DECAY}, TVAE's network for both; split `--val-fraction 0.3 "
             f"--seed 0`; one torch thread per arm; 2-core CPU shared with other work (1-min load average {load:.1f} "
             "at the end). Medians (min–max). Quality = SDMetrics QualityReport vs the real train rows; TSTR/TRTR = "
             "accuracy of HistGradientBoosting on real val; detection = 5-fold AUROC real train vs synthetic; "
             "`epoch_s` = training wall time / epochs (vaepipe: its loop with a validation pass, a checkpoint and "
             "an MLflow log every epoch, plus its start-up; SDV: `fit`, which includes fitting its transformer; "
             "vaepipe fits its transformer in `data build`, timed below). torch's and scikit-learn's lazy one-off "
             "imports are paid before the clock starts in both arms.", ""]
    verdicts = []
    for name, arms in results.items():
        n_train, n_val, batch, build_s = sizes[name]
        lines += [f"**{name}** ({n_train} train / {n_val} val rows, batch {batch}; vaepipe's `data build` with "
                  f"the transformer fit: {build_s:.1f} s)", "",
                  "| metric | vaepipe `tvae` | SDV `TVAESynthesizer` |", "|---|---|---|"]
        for metric in METRICS:
            lines.append(f"| {metric} | {fmt([r[metric] for r in arms['vaepipe']])} | "
                         f"{fmt([r[metric] for r in arms['sdv']])} |")
        lines.append(f"| train_s (total) | {fmt([r['train_s'] for r in arms['vaepipe']], 1)} | "
                     f"{fmt([r['train_s'] for r in arms['sdv']], 1)} |")
        lines.append(f"| steady_epoch_s (vaepipe: between the first and last epoch ends) | "
                     f"{fmt([r['steady_epoch_s'] for r in arms['vaepipe']])} | not measurable from outside `fit` |")
        med = {arm: {m: statistics.median(r[m] for r in rs) for m in METRICS} for arm, rs in arms.items()}
        v, s = med["vaepipe"], med["sdv"]
        checks = [
            ("quality >= SDV's", v["quality_score"] >= s["quality_score"], f"{v['quality_score']:.3f} vs {s['quality_score']:.3f}"),
            ("TSTR >= SDV's", v["tstr_accuracy"] >= s["tstr_accuracy"], f"{v['tstr_accuracy']:.3f} vs {s['tstr_accuracy']:.3f}"),
            ("per epoch not slower than SDV", v["epoch_s"] <= s["epoch_s"], f"{v['epoch_s']*1000:.0f} vs {s['epoch_s']*1000:.0f} ms"),
            ("TSTR >= 0.9 x TRTR", v["tstr_ratio"] >= 0.9, f"ratio {v['tstr_ratio']:.3f}"),
            ("detection AUROC <= 0.75", v["detection_auroc"] <= 0.75, f"{v['detection_auroc']:.3f}"),
            ("no exact copies of train rows", max(r["exact_copy_fraction"] for r in arms["vaepipe"]) == 0,
             f"max {max(r['exact_copy_fraction'] for r in arms['vaepipe']):.4f}"),
        ]
        lines += ["", "Targets (vaepipe, medians): " + "; ".join(
            f"{label}: **{'met' if ok else 'missed'}** ({detail})" for label, ok, detail in checks) + ".", ""]
        verdicts.append({name: {label: ok for label, ok, _ in checks}})
    from benchmarks.report import update_section

    update_section(args.report, "\n".join(lines))
    print(json.dumps({"results": results, "targets": verdicts, "sizes": sizes}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
