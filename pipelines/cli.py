"""The `vaepipe` command: one subcommand per pipeline stage, each a thin layer over a function in
`pipelines/`. Progress goes to stderr; the last line on stdout is one JSON result, so scripts can
chain commands. Errors in user input exit with status 2 and a one-line message naming the problem.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from pipelines.cli_parser import build_parser

# bad input: one line, exit 2. A path that is a file where a folder is expected (or the reverse), or
# that the user may not write (a read-only --out), is bad input too.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                            PermissionError)
# the machine, not the input: one line, exit 1
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


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
                         image_size=args.image_size, overwrite=args.overwrite, label=args.label,
                         column_types=tuple(args.column_types or ()))
    series_flags = {flag: getattr(args, flag) for flag in SERIES_BUILD_FLAGS if getattr(args, flag) is not None}
    if is_series_build(args.source, series_flags):
        from pipelines.data.series import SeriesOptions
        from pipelines.data.series_build import SeriesBuildConfig, build_series_dataset

        if args.label is not None or args.column_types:
            raise ValueError("--label and --column-types are for tables; a series source takes its class from "
                             "--label-column")
        manifest = build_series_dataset(SeriesBuildConfig(config, SeriesOptions(**series_flags)))
    else:
        if series_flags:
            raise ValueError(f"--{next(iter(series_flags)).replace('_', '-')} applies to series sources "
                             f"(aeon:NAME, csv:PATH, parquet:PATH), not {args.source!r}")
        manifest = build_dataset(config)
    emit({
        "manifest": f"{args.out.rstrip('/')}/manifest.json",
        # image manifests: the image shape; series: the model's input shape C x 1 x T; None for tables
        "image_shape": manifest.get("image_shape", manifest.get("input_shape")),
        "modality": manifest.get("modality", "image"),
        **({"columns": {c["name"]: c["kind"] for c in manifest["table"]["columns"]},
            "label": manifest["table"]["label"]} if "table" in manifest else {}),
        "num_classes": len(manifest["class_names"]),
        "samples": {split: info["num_samples"] for split, info in manifest["splits"].items()},
        "shards": {split: len(info["shards"]) for split, info in manifest["splits"].items()},
    })
    return 0


# the series-only options of `data build` (SeriesOptions fields); refused with an image or table source
SERIES_BUILD_FLAGS = ("layout", "label_column", "id_column", "time_column", "window", "stride")


def is_series_build(source: str, series_flags: dict) -> bool:
    """aeon:NAME is always a series; csv:/parquet: name a table (with --label) unless a series option
    (--layout, --label-column, --window, ...) says the file holds series."""
    from pipelines.data.series import is_series_source

    return is_series_source(source) and (source.startswith("aeon:") or bool(series_flags))


def cmd_data_verify(args: argparse.Namespace) -> int:
    from pipelines.data import open_stream, read_manifest, verify_shards

    manifest = read_manifest(args.dataset)
    bad = verify_shards(manifest)
    counts = {}
    if not bad and args.count:
        for split in manifest.data["splits"]:
            if manifest.num_samples(split):
                stream = open_stream(manifest, split, shuffle_buffer=0, max_bad_fraction=0.0)
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
    from pipelines.config import apply_overrides, config_error, load_config_file, set_dotted

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
                raise config_error()(f"--{flag.replace('_', '-')} expects a comma list of finite {kind.__name__}s, "
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
                  "temperature": "temperature", "pixel_temperature": "pixel_temperature",
                  "image_format": "image_format", "batch_size": "batch_size", "workers": "workers",
                  "gpu": "use_gpu", "overwrite": "overwrite", "filter_classifier": "filter_classifier",
                  "filter_confidence": "filter_confidence", "date": "date", "experiment": "experiment",
                  "track": "track", "evaluate_against": "evaluate_against", "plots_per_class": "plots_per_class",
                  "latent_prior": "latent_prior", "prior_data": "prior_data", "prior_components": "prior_components"}


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


# -- vaepipe datasets -----------------------------------------------------------------------------

def cmd_datasets(args: argparse.Namespace) -> int:
    from pipelines.registry.datasets_view import format_table, list_datasets
    from pipelines.registry.tracking import tracking_uri_or_env

    tracking_uri = tracking_uri_or_env(args.tracking_uri)
    if not tracking_uri:
        raise ValueError("datasets needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    rows = list_datasets(tracking_uri, args.model)
    if args.json:
        emit({"tracking_uri": tracking_uri, "model": args.model, "datasets": rows})
    else:
        print(format_table(rows))
    return 0


# -- vaepipe evaluate -----------------------------------------------------------------------------

# flags that set the EvaluateConfig field of the same name (--model and --tracking-uri are resolved first)
EVALUATE_FLAGS = ("data", "out", "synthetic", "iwae_k", "iwae_subset", "seeds", "max_real", "num_synthetic",
                  "held_out_class", "seed", "classifier_steps", "reliability_floor", "run_id",
                  "pixel_temperature")


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


def main(argv: list[str] | None = None) -> int:
    commands = {name.removeprefix("cmd_"): func for name, func in globals().items() if name.startswith("cmd_")}
    args = build_parser(commands).parse_args(argv)
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


def run() -> None:
    """The `vaepipe` console script: `main()`, then a quick exit. Tearing down every module torch,
    MLflow and Ray imported took ~1 s of a 12-s `train --workers 0` process on 2 cores; exit
    handlers (Ray's shutdown, logging, temp folders) still run, and the normal exit is kept while
    a non-daemon thread is alive (it would be killed)."""
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    run()
