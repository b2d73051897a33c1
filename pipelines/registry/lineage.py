"""Lineage of generated datasets in MLflow: every `vaepipe generate` (CLI, jobs/generate.py, the scheduled
run) that has a tracking URI is one run in a generation experiment, holding the model (params, and input
tags of the dataset), the dataset it wrote (an MLflow dataset input: location + manifest digest), the
rows per class, the seed and the wall time; the registered version gets tags pointing at its latest
dataset, and an evaluation of the data lands on the same run. Not here: writing the data (pipelines/batch).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.registry.tracking import check_reachable, connect, ensure_experiment, read_dataset_info

KIND_TAG = "vaepipe.kind"  # = GENERATION_KIND on every generation run: what `vaepipe datasets` lists
GENERATION_KIND = "generation"
OUT_TAG = "vaepipe.out"
REQUEST_TAG = "vaepipe.request_sha256"  # with OUT_TAG: finds the run an interrupted generation resumes
MODEL_NAME_TAG, MODEL_VERSION_TAG = "vaepipe.model_name", "vaepipe.model_version"
DATE_TAG = "vaepipe.date"
MANIFEST_TAG = "vaepipe.manifest_sha256"
RESUMED_TAG = "vaepipe.resumed"  # how many times an interrupted run was continued
RELIABLE_TAG, RELIABILITY_REASON_TAG = "vaepipe.evaluation_reliable", "vaepipe.evaluation_reliability_reason"
EVALUATED_AGAINST_TAG = "vaepipe.evaluated_against"
HEADLINE_TAG = "vaepipe.usefulness"  # "cas=0.931" (+ " UNRELIABLE: ..." when the evaluator cannot judge)
# on the registered model version
LATEST_DATASET_TAG = "vaepipe.latest_generated_dataset"
LATEST_RUN_TAG = "vaepipe.latest_generation_run"
LATEST_USEFULNESS_TAG = "vaepipe.latest_generated_dataset_usefulness"
HEADLINE_METRICS = ("cas", "fid")  # the usefulness number shown per dataset: CAS when labelled, else FID
GENERATED_CONTEXT, TRAINING_CONTEXT = "generated", "model_training_data"


def _log(message: str) -> None:
    print(f"[generate] {message}", file=sys.stderr, flush=True)


def request_sha256(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def without_credentials(uri: str) -> str:
    """A tracking URI fit for a manifest: user:password@ dropped."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    for key in HEADLINE_METRICS:
        if key in metrics:
            return key, metrics[key]
    return None


@dataclass
class GenerationRun:
    """One generation's MLflow run (created, or an interrupted one reopened)."""

    tracking_uri: str
    run_id: str
    experiment_id: str
    created: bool  # False: a resume of an interrupted generation's run

    @classmethod
    def open(cls, tracking_uri: str, plan) -> "GenerationRun":
        """The run for `plan` (a pipelines.batch.generate.GenerationPlan): an unfinished run of the same
        request into the same folder is reopened (so a resume logs no second run), else a new one."""
        check_reachable(tracking_uri)
        client = connect(tracking_uri)
        config = plan.config
        experiment_id = ensure_experiment(client, tracking_uri, config.experiment)
        digest, out = request_sha256(plan.job.request), str(plan.job.out)
        for run in client.search_runs([experiment_id], f"tags.`{REQUEST_TAG}` = '{digest}'", max_results=50):
            if run.data.tags.get(OUT_TAG) == out and run.info.status != "FINISHED" \
                    and run.info.lifecycle_stage == "active":
                resumed = int(run.data.tags.get(RESUMED_TAG, "0")) + 1
                client.update_run(run.info.run_id, status="RUNNING")
                client.set_tag(run.info.run_id, RESUMED_TAG, str(resumed))
                _log(f"resuming lineage run {run.info.run_id} (an interrupted generation of this request)")
                return cls(tracking_uri, run.info.run_id, experiment_id, created=False)
        schedule = plan.schedule
        registered = bool(config.model_version)
        tags = {KIND_TAG: GENERATION_KIND, OUT_TAG: out, REQUEST_TAG: digest,
                MODEL_NAME_TAG: config.model_name, MODEL_VERSION_TAG: config.model_version,
                DATE_TAG: schedule["date"] or "", "mlflow.runName": _run_name(plan)}
        run = client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"])
        params = {
            "model_uri": plan.job.request["model"]["uri"],
            "model_name": config.model_name or "(unregistered)",
            "model_version": config.model_version or "(unregistered)",
            "model_sha256": plan.model.sha256,
            "model_family": plan.model.name,
            "seed": schedule["seed"], "seed_source": schedule["seed_source"], "date": schedule["date"] or "",
            "num_samples": config.num_samples, "per_class": config.per_class,
            "temperature": config.temperature, "pixel_temperature": config.pixel_temperature,
            "batch_size": config.batch_size, "block_size": config.block_size, "out": out,
            "request_sha256": digest,
        }
        if not registered:  # a model folder has no registered version: what identifies it instead
            params["model_dir"] = str(Path(config.model_dir).resolve())
            params["model_config_sha256"] = hashlib.sha256((Path(config.model_dir) / "config.json").read_bytes()
                                                           ).hexdigest()
        if plan.job.request.get("filter"):
            params["filter_confidence"] = plan.job.request["filter"]["confidence"]
            params["filter_classifier_sha256"] = plan.job.request["filter"]["classifier_sha256"]
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, "" if v is None else str(v)) for k, v in params.items()])
        what = (f"{config.model_name} v{config.model_version}" if registered else
                f"the model folder {params['model_dir']} (not a registered version: its config digest is recorded)")
        _log(f"lineage run {run.info.run_id} in experiment {config.experiment!r} records {what}")
        return cls(tracking_uri, run.info.run_id, experiment_id, created=True)

    def manifest_entry(self) -> dict[str, Any]:
        """What the dataset's manifest.json keeps about this run (no credentials)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id,
                "tracking_uri": without_credentials(self.tracking_uri)}

    def record_dataset(self, plan, result: dict[str, Any], seconds: float) -> None:
        """Log what was written: rows (per class), wall time, the dataset as an input with its manifest
        digest, the manifest itself; tag the registered version with its latest dataset."""
        from mlflow.entities import DatasetInput, InputTag, Metric

        client = connect(self.tracking_uri)
        manifest_path = Path(result["manifest"])
        manifest_bytes = manifest_path.read_bytes()
        manifest = json.loads(manifest_bytes)
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        now = int(time.time() * 1000)
        metrics = {"rows": manifest["total"], "wall_seconds": seconds, "blocks_written": result["blocks_written"],
                   **{f"rows.label_{label}": n for label, n in manifest["counts"].items()}}
        if result.get("acceptance_rate") is not None:
            metrics["acceptance_rate"] = result["acceptance_rate"]
        client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        client.set_tag(self.run_id, MANIFEST_TAG, manifest_sha)
        config = plan.config
        model_tags = {"model_uri": manifest["request"]["model"]["uri"],
                      "model_version": config.model_version or "(unregistered)",
                      "model_sha256": plan.model.sha256, "manifest_sha256": manifest_sha,
                      "rows": str(manifest["total"])}
        inputs = [DatasetInput(_dataset(result["out"], _dataset_name(plan), manifest_sha),
                               [InputTag("mlflow.data.context", GENERATED_CONTEXT),
                                *(InputTag(k, v[:500]) for k, v in model_tags.items())])]
        trained_on = read_dataset_info(config.model_dir) or {}
        if trained_on.get("manifest") and trained_on.get("manifest_sha256"):  # the data the model learned from
            inputs.append(DatasetInput(_dataset(str(trained_on["manifest"]), "training-data",
                                                trained_on["manifest_sha256"]),
                                       [InputTag("mlflow.data.context", TRAINING_CONTEXT)]))
        client.log_inputs(self.run_id, datasets=inputs)
        client.log_artifact(self.run_id, str(manifest_path), "generation")
        class_names = list(config.class_names) if config.class_names else None
        client.log_dict(self.run_id, {"rows_per_class": {
            (class_names[int(k)] if class_names and k != "-1" else k): n for k, n in manifest["counts"].items()}},
            "generation/rows_per_class.json")
        if config.model_version:
            for key, value in ((LATEST_DATASET_TAG, result["out"]), (LATEST_RUN_TAG, self.run_id)):
                client.set_model_version_tag(config.model_name, config.model_version, key, value)

    def record_evaluation(self, plan, evaluation: dict[str, Any], against: str) -> None:
        """Tags that make the evaluation's verdict visible where its metrics are (the metrics themselves
        are logged by pipelines.evaluation): its headline number, and whether the evaluator could judge."""
        client = connect(self.tracking_uri)
        reliability = evaluation.get("reliability")
        reliable = reliability is None or reliability.get("reliable", True)
        client.set_tag(self.run_id, EVALUATED_AGAINST_TAG, against)
        client.set_tag(self.run_id, RELIABLE_TAG, str(reliable).lower())
        if not reliable:
            client.set_tag(self.run_id, RELIABILITY_REASON_TAG, str(reliability.get("reason", ""))[:5000])
        best = headline(evaluation["metrics"])
        text = "none" if best is None else f"{best[0]}={best[1]:.3f}"
        if not reliable:
            text += f" UNRELIABLE: {reliability.get('reason', '')}"
        client.set_tag(self.run_id, HEADLINE_TAG, text[:5000])
        if plan.config.model_version:
            client.set_model_version_tag(plan.config.model_name, plan.config.model_version, LATEST_USEFULNESS_TAG,
                                         text[:5000])

    def end(self, status: str = "FINISHED") -> None:
        connect(self.tracking_uri).set_terminated(self.run_id, status=status)

    def discard(self) -> None:
        """A new run whose generation was refused before anything was written leaves no trace."""
        if self.created:
            connect(self.tracking_uri).delete_run(self.run_id)
        else:
            self.end("FAILED")


def reopen(tracking_uri: str, manifest: dict[str, Any]) -> GenerationRun | None:
    """The run recorded in a finished dataset's manifest, if it lives in this tracking store."""
    lineage = manifest.get("lineage") or {}
    if not lineage.get("run_id"):
        return None
    check_reachable(tracking_uri)
    client = connect(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(lineage["run_id"])
    except MlflowException:
        return None
    return GenerationRun(tracking_uri, run.info.run_id, run.info.experiment_id, created=False)


def _run_name(plan) -> str:
    who = plan.config.model_name or plan.model.name
    return f"generate-{who}-{plan.schedule['date'] or Path(plan.config.out).name}"


def _dataset_name(plan) -> str:
    who = f"{plan.config.model_name}-v{plan.config.model_version}" if plan.config.model_version else plan.model.name
    return f"{who}-{plan.schedule['date'] or Path(plan.config.out).name}"[:500]


def _dataset(location: str, name: str, sha256: str):
    """An MLflow dataset entity for files at `location` (local path or URL): metadata only, its digest the
    first 32 hex digits of the manifest's sha256 (MLflow keeps at most 36 characters)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the local source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(location)
    return MetaDataset(source, name=name, digest=sha256[:32])._to_mlflow_entity()
