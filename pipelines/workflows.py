"""The workflows that chain stages, written once: search -> register (`vaepipe tune --register-as`,
`python -m jobs.tune`), pull -> run a batch job or the evaluation on a registered model (`vaepipe
generate|embed|score|denoise|interpolate|evaluate`, `python -m jobs.generate`). The CLI and jobs/
only build the typed config and call one of these; what each stage does lives in its own folder.
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.batch.generate import GenerateConfig, GenerationPlan, plan_generation, run_plan
from pipelines.batch.job import OutputExistsError, finished_manifest
from pipelines.registry.tracking import set_run_tag, tracking_uri_or_env
from pipelines.registry.versions import RegisterRequest, pull, register_run
from pipelines.training.search import run_search
from pipelines.training.search_config import TuneConfig

REGISTER_AS_TAG = "vaepipe.register_as"  # on a search's parent run: the name its best trial was registered as


def search_and_register(config: TuneConfig, register_as: str | None = None) -> dict[str, Any]:
    """Run the search; with `register_as`, tag the search and register its best trial's model under
    that name (the champion gate compares the search's own metric)."""
    result = run_search(config)
    registered = None
    if register_as:
        set_run_tag(result["tracking_uri"], result["parent_run_id"], REGISTER_AS_TAG, register_as)
        registered = register_run(RegisterRequest(run_id=result["best"]["run_id"], name=register_as,
                                                  tracking_uri=result["tracking_uri"], metric=config.search.metric))
    return {**result, "register_as": register_as, "registered": registered}


@contextmanager
def resolved_model(model: str | None, tracking_uri: str | None) -> Iterator[dict[str, Any] | None]:
    """A models:/ URI is pulled (checksums verified) into a temporary folder that lives as long as the
    block; yields registry.pull's info (path, name, version, ...). A folder (or None) yields None: it
    is used as it is."""
    if model is None or not model.startswith("models:/"):
        if model is not None and not Path(model).is_dir():
            raise ValueError(f"--model {model}: no such folder; give a saved model folder or models:/NAME@ALIAS")
        yield None
        return
    tracking_uri = tracking_uri_or_env(tracking_uri)
    if not tracking_uri:
        raise ValueError(f"model {model} needs a tracking URI (--tracking-uri, tracking_uri in the config, "
                         "or MLFLOW_TRACKING_URI)")
    with tempfile.TemporaryDirectory(prefix="vaepipe-model-") as tmp:
        _, info = pull(model, tracking_uri, f"{tmp}/model")
        yield info


def pull_and_run(data: dict[str, Any], config_class: type, run: Callable[[Any], dict[str, Any]],
                 model: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Run a batch job (generate, embed, score, denoise, interpolate) on `model`: a saved folder, or a
    models:/ URI that is pulled first. `data` is the job's config as a dict; without `model` its
    `model_dir` is used, else its models:/ `model_uri` is pulled (the generate job config's shape)."""
    if model is None and not data.get("model_dir") and str(data.get("model_uri", "")).startswith("models:/"):
        model = data["model_uri"]
    with resolved_model(model, tracking_uri) as info:
        if info is not None:
            data = {**data, "model_dir": info["path"], "model_uri": model, "model_name": info["name"],
                    "model_version": str(info["version"])}
        elif model is not None:
            data = {**data, "model_dir": model}
        return run(config_class.from_dict(data))


def pull_and_generate(data: dict[str, Any], model: str | None = None,
                      tracking_uri: str | None = None) -> dict[str, Any]:
    """`vaepipe generate` and `python -m jobs.generate`: pull (if registered), then generate, recorded
    as an MLflow lineage run when a tracking URI is known (and evaluated with `evaluate_against`)."""
    if model is not None and not model.startswith("models:/"):
        data = {**data, "model_uri": data.get("model_uri") or model}  # a folder is its own provenance
    if "tracking_uri" in data:  # the job configs' key (configmaps.yaml); a --tracking-uri flag wins
        data = dict(data)
        tracking_uri = tracking_uri or data.pop("tracking_uri")
    tracking_uri = tracking_uri_or_env(tracking_uri)
    return pull_and_run(data, GenerateConfig, functools.partial(generate_with_lineage, tracking_uri=tracking_uri),
                        model, tracking_uri)


EVALUATION_DIR = "evaluation"  # OUT/evaluation/: metrics.json, report.html, figures of --evaluate-against
EVALUATION_RECORD = "request.json"  # in it: what was evaluated against what (a rerun with the same skips it)


def generate_with_lineage(config: GenerateConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Generate per `config`; with a tracking URI (and `config.track`) the generation is an MLflow run
    (pipelines/registry/lineage.py) whose id lands in the manifest and the result. A finished request is
    not generated (or logged) again: the result names the run that recorded it. Without a tracking URI
    nothing is logged (a local model folder has no registry to link to); stderr says so."""
    plan = plan_generation(config)
    if config.evaluate_against is not None:
        check_evaluation(plan, config.evaluate_against, config.evaluation)  # before anything is written
    tracking_uri = tracking_uri if config.track else None
    if tracking_uri is None:
        _log("no lineage run: " + ("track is off" if not config.track else
                                    "no tracking URI (--tracking-uri or MLFLOW_TRACKING_URI)"))
    finished = finished_manifest(plan.job)
    run, writing = None, False  # writing: this call opened the run to record a (resumed) generation
    if finished is not None:
        result = run_plan(plan)  # a no-op that answers the finished manifest's result
        if tracking_uri is not None:
            from pipelines.registry.lineage import reopen

            run = reopen(tracking_uri, finished)
            if run is None:
                _log("this dataset was written without a lineage run in this store: nothing is logged for it")
    elif tracking_uri is not None:
        from pipelines.registry.lineage import GenerationRun

        run, writing = GenerationRun.open(tracking_uri, plan), True
        started = time.perf_counter()
        try:
            result = run_plan(plan, run.manifest_entry())
        except OutputExistsError:  # refused before writing (another run holds out, other data in it)
            run.discard()
            raise
        except KeyboardInterrupt:  # the next run resumes the data and this run
            run.end("KILLED")
            raise
        except BaseException:
            run.end("FAILED")
            raise
        if result["skipped"]:  # another process finished it between our look and our lock
            run.discard()
            run, writing = reopen(tracking_uri, json.loads(Path(result["manifest"]).read_text())), False
        else:
            try:
                run.record_dataset(plan, result, time.perf_counter() - started)
            except BaseException:  # the data is complete, its record is not: `vaepipe datasets` shows FAILED
                run.end("FAILED")
                raise
    else:
        result = run_plan(plan)
    if not result["skipped"]:
        _remove_stale_evaluation(Path(result["out"]))
    result = {**result, "lineage_run_id": run.run_id if run is not None else result["lineage_run_id"],
              "tracking_uri": tracking_uri, "experiment": config.experiment if run is not None else None,
              "evaluation": None}
    if config.evaluate_against is not None:
        try:
            result["evaluation"] = evaluate_generated(plan, result, config.evaluate_against, config.evaluation, run)
        except BaseException:
            if run is not None:  # the data is complete; a rerun evaluates again into this run
                run.end("FAILED")
            raise
    if run is not None and (writing or config.evaluate_against is not None):
        run.end("FINISHED")
    return result


def evaluation_config(plan: GenerationPlan, against: str, budget: dict[str, Any], out: str,
                      run=None) -> Any:
    from pipelines.evaluation.config import EvaluateConfig

    fixed = {"model": plan.config.model_dir, "data": against, "out": out, "synthetic": str(plan.job.out)}
    clash = sorted(set(budget) & {*fixed, "tracking_uri", "run_id"})
    if clash:
        from pipelines.config import config_error

        raise config_error()(f"evaluation.{clash[0]} is set by generate itself (the model, the data written, "
                             "evaluate_against and the lineage run); remove it")
    tracking = {"tracking_uri": run.tracking_uri, "run_id": run.run_id} if run is not None else {}
    return EvaluateConfig.from_dict({**budget, **fixed, **tracking})


def check_evaluation(plan: GenerationPlan, against: str, budget: dict[str, Any]) -> None:
    """`evaluate_against` must be a dataset the model fits (image shape, classes) and `evaluation` valid
    EvaluateConfig keys; ValueError names the problem before any sample is written."""
    from pipelines.batch.model import model_class_names
    from pipelines.data import read_manifest

    evaluation_config(plan, against, budget, "unused")
    manifest = read_manifest(against)
    model = plan.model
    if tuple(model.input_shape) != tuple(manifest.image_shape):
        raise ValueError(f"evaluate_against {manifest.location} holds images of shape {tuple(manifest.image_shape)} "
                         f"but the model makes {tuple(model.input_shape)}: give the dataset it was trained on")
    if model.num_classes is not None and model.num_classes != manifest.num_classes:
        raise ValueError(f"evaluate_against {manifest.location} has {manifest.num_classes} classes but the "
                         f"{model.name!r} model has {model.num_classes}: give the dataset it was trained on")
    names = model_class_names(plan.config.model_dir)
    if model.num_classes is not None and names and list(names) != list(manifest.class_names):
        raise ValueError(f"evaluate_against {manifest.location} names its classes {list(manifest.class_names)} "
                         f"but the model was trained on {names}: give the dataset it was trained on")


def evaluate_generated(plan: GenerationPlan, result: dict[str, Any], against: str, budget: dict[str, Any],
                       run=None) -> dict[str, Any]:
    """Evaluate the data just written against the real dataset into OUT/evaluation/ (and the lineage
    run). The same evaluation of the same data is not repeated: its record is read back."""
    from pipelines.data import read_manifest
    from pipelines.evaluation.evaluate import METRICS_NAME, run_evaluation

    out = Path(result["out"]) / EVALUATION_DIR
    config = evaluation_config(plan, against, budget, str(out), run)
    record = {"against": read_manifest(against).location, "against_sha256": read_manifest(against).sha256(),
              "generated_manifest_sha256": _sha256(Path(result["manifest"])),
              # the model by its digest: a pulled model lives in a new temporary folder each time
              "model_sha256": plan.model.sha256,
              "evaluation": {k: v for k, v in config.__dict__.items() if k not in ("model", "tracking_uri", "run_id")},
              "lineage_run_id": run.run_id if run is not None else None}
    record = json.loads(json.dumps(record, default=list))
    done = _read_json(out / EVALUATION_RECORD)
    if done is not None and done == record and (out / METRICS_NAME).is_file():
        _log(f"{out} already holds this evaluation: not repeated")
        document = json.loads((out / METRICS_NAME).read_text())
        metrics = {k: v for k, v in document.items() if isinstance(v, (int, float))}
        return {"out": str(out), "metrics": metrics, "reliability": document.get("reliability"), "skipped": True}
    if out.exists():
        shutil.rmtree(out)
    try:
        evaluation = run_evaluation(config)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    (out / EVALUATION_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if run is not None:
        run.record_evaluation(plan, evaluation, record["against"])
    return {"out": str(out), "metrics": evaluation["metrics"], "reliability": evaluation["reliability"],
            "skipped": False}


def _remove_stale_evaluation(out: Path) -> None:
    """New data makes an evaluation of the old data in OUT/evaluation/ wrong: only ours is removed."""
    if (out / EVALUATION_DIR / EVALUATION_RECORD).is_file():
        shutil.rmtree(out / EVALUATION_DIR)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _log(message: str) -> None:
    print(f"[generate] {message}", file=sys.stderr, flush=True)
