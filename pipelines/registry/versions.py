"""The MLflow Model Registry side: `register_run` makes a training run's final model a new
version of a named model (pickle-free weights + config, signature, checksums, dataset hash, key
metrics, sample grid) and gates the `champion` alias on a metric; `pull` resolves
`models:/NAME@ALIAS` (or `models:/NAME/VERSION`), downloads the version, verifies its checksums
and loads it as a ready model without unpickling anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vaemodels
from pipelines.registry import tracking
from pipelines.registry.pyfunc_package import MLMODEL_FILE, PickledModelError, add_pyfunc_model, check_not_pickled
from pipelines.registry.tracking import FIGURES_ARTIFACT, MODEL_ARTIFACT, connect, read_dataset_info

CHAMPION, CHALLENGER = "champion", "challenger"
CHECKSUMS_FILE = "checksums.json"
SIGNATURE_FILE = "signature.json"
PACKAGE_ARTIFACT = "mlflow_model"  # the MLflow package of a run whose model/ an older vaepipe registered
CHECKSUMS_TAG = "checksums_sha256"  # version tag: sha256 of checksums.json, so a rewrite of weights + checksums shows
# metrics where smaller is better; everything else (elbo, log-likelihood, accuracy, ...) is larger-is-better
LOWER_IS_BETTER = ("loss", "recon", "kl", "fid", "anomaly_score")


class RegistryError(ValueError):
    """A registry request names something that does not exist, or its artifacts are broken."""


def metric_mode(metric: str) -> str:
    return "min" if any(part in metric for part in LOWER_IS_BETTER) else "max"


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (bounded time) when an HTTP tracking server does not answer, naming the URI."""
    tracking.check_reachable(tracking_uri, timeout_s, error=RegistryError)


def check_model_name(name: str) -> None:
    """MLflow's rules for registered-model names, checked before anything is uploaded."""
    if not name.strip() or any(c in name for c in "/:") or name in (".", ".."):
        raise RegistryError(f"invalid registered model name {name!r}: it must be non-empty and contain "
                            "no '/' or ':' (e.g. digits-cvae)")


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (the MLflow package's `code/` included:
    it runs when a consumer loads the model); a folder of plain files gives plain names, as before."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != CHECKSUMS_FILE
            and "__pycache__" not in p.parts}


def model_signature(model: vaemodels.AutoEncoderModel) -> dict[str, Any]:
    """MLflow's tensor signature of the decoder: latent (and label) in, image batch out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    latent_dim = model.config.latent_dim
    inputs = [TensorSpec(np.dtype(np.float32), (-1, latent_dim), "z")]
    if model.is_conditional:
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "label"))
    # "image" for image models; a table model's output is its encoded row (decoded by its table spec)
    outputs = [TensorSpec(np.dtype(np.float32), (-1, *model.input_shape), model.input_key)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs)).to_dict()


@dataclass(frozen=True)
class RegisterRequest:
    run_id: str  # the training run whose `model/` artifact is registered
    name: str  # registered model name
    tracking_uri: str
    metric: str = "val_elbo"  # the champion gate compares this run metric
    force: bool = False  # promote to champion whatever the comparison says


def register_run(request: RegisterRequest, extra_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Register run `run_id`'s model as a new version; returns name, version, aliases and the decision.
    A run already registered under the name is not registered twice: its version is returned."""
    check_model_name(request.name)
    check_reachable(request.tracking_uri)
    client = connect(request.tracking_uri, must_exist=True)
    try:
        run = client.get_run(request.run_id)
    except Exception as exc:  # mlflow raises MlflowException subclasses
        raise RegistryError(f"no MLflow run {request.run_id!r} at {request.tracking_uri}: "
                            f"{str(exc).splitlines()[0]}") from None
    metrics = {**run.data.metrics, **(extra_metrics or {})}
    if request.metric not in metrics:
        raise RegistryError(f"run {request.run_id} has no metric {request.metric!r} "
                            f"(it has: {', '.join(sorted(metrics)) or 'none'})")
    existing = _version_of_run(client, request.name, request.run_id)
    if existing is not None:
        return _already_registered(client, request, existing, metrics[request.metric])
    with tempfile.TemporaryDirectory() as tmp:
        folder = _download(request.tracking_uri, f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", Path(tmp) / "dl",
                           f"run {request.run_id} has no {MODEL_ARTIFACT}/ artifact (did training finish?)")
        model = vaemodels.load_model(folder)
        if "iwae_log_likelihood" not in metrics:
            iwae = iwae_on_validation(model, run.data.params.get("data"))
            if iwae is not None:
                metrics["iwae_log_likelihood"] = iwae
                client.log_metric(request.run_id, "iwae_log_likelihood", iwae)
        dataset = read_dataset_info(folder) or _dataset_info_from_run(folder, run.data.params.get("data"))
        folder, artifact_path, reuse = _package(request, run.info.artifact_uri, folder, Path(tmp))
        if not reuse:
            (folder / SIGNATURE_FILE).write_text(json.dumps(model_signature(model), indent=2) + "\n")
            add_pyfunc_model(folder, model, (dataset or {}).get("class_names"))
            (folder / CHECKSUMS_FILE).write_text(json.dumps(file_checksums(folder), indent=2) + "\n")
            client.log_artifacts(request.run_id, str(folder), artifact_path)
        checksums = (folder / CHECKSUMS_FILE).read_text()
    source = f"{run.info.artifact_uri}/{artifact_path}"

    try:
        client.get_registered_model(request.name)
    except Exception:
        client.create_registered_model(request.name, description="vaepipe model (pickle-free: safetensors + config)")
    key_metrics = {k: v for k, v in metrics.items() if k.startswith(("val_", "iwae", "fid", "tstr", "mig"))}
    class_names = json.dumps((dataset or {}).get("class_names"))
    tags = {
        "model_family": model.name,
        "dataset_sha256": run.data.tags.get("dataset_sha256", "") or (dataset or {}).get("manifest_sha256", ""),
        "samples_grid": f"runs:/{request.run_id}/{FIGURES_ARTIFACT}/samples.png",
        "gate_metric": request.metric,
        CHECKSUMS_TAG: hashlib.sha256(checksums.encode()).hexdigest(),
        **({"class_names": class_names} if dataset and len(class_names) <= 5000 else {}),
        **{f"metric.{k}": f"{v:.6g}" for k, v in key_metrics.items()},
    }
    version = client.create_model_version(request.name, source=source, run_id=request.run_id, tags=tags)
    decision = _gate(client, request, version.version, metrics[request.metric])
    aliases = sorted(client.get_model_version(request.name, version.version).aliases)
    return {"name": request.name, "version": int(version.version), "aliases": aliases, **decision}


def _package(request: RegisterRequest, artifact_uri: str, folder: Path, tmp: Path) -> tuple[Path, str, bool]:
    """Where this registration's MLflow package is: (folder, its artifact path, whether it exists
    already). A run registered before (under another name) already holds one: it is reused
    unchanged, since MLmodel differs at every write and would break that version's pinned checksums.
    A run registered by a vaepipe without MLflow packages keeps its `model/` files as that version
    pinned them; its package goes to `mlflow_model/`."""
    if (folder / MLMODEL_FILE).is_file():
        verify_checksums(folder, f"run {request.run_id} {MODEL_ARTIFACT}/")
        return folder, MODEL_ARTIFACT, True
    if not (folder / CHECKSUMS_FILE).is_file():
        return folder, MODEL_ARTIFACT, False
    import mlflow

    try:
        packaged = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{PACKAGE_ARTIFACT}",
                                                            dst_path=str(tmp / "pkg"),
                                                            tracking_uri=request.tracking_uri))
    except Exception:  # none yet
        packaged = None
    if packaged is not None and (packaged / MLMODEL_FILE).is_file():
        verify_checksums(packaged, f"run {request.run_id} {PACKAGE_ARTIFACT}/")
        return packaged, PACKAGE_ARTIFACT, True
    for stale in (CHECKSUMS_FILE, SIGNATURE_FILE):
        (folder / stale).unlink(missing_ok=True)
    return folder, PACKAGE_ARTIFACT, False


def _version_of_run(client, name: str, run_id: str):
    """The version of `name` registered from `run_id`, if any (None when the name is new)."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:
        return None
    found = [v for v in versions if v.run_id == run_id]
    return min(found, key=lambda v: int(v.version)) if found else None


def _already_registered(client, request: RegisterRequest, version, value: float) -> dict[str, Any]:
    """Re-registering a run adds no duplicate version; --force still makes that version champion."""
    if request.force:
        decision = _gate(client, request, str(version.version), value)
        aliases = sorted(client.get_model_version(request.name, version.version).aliases)
        return {"name": request.name, "version": int(version.version), "aliases": aliases, **decision}
    reason = f"run {request.run_id} is already version {version.version} of {request.name}"
    aliases = sorted(client.get_model_version(request.name, version.version).aliases)
    print(f"[register] {request.name} v{version.version}: already registered ({reason})", file=sys.stderr)
    return {"name": request.name, "version": int(version.version), "aliases": aliases,
            "decision": "already_registered", "reason": reason, "metric": request.metric, "value": value,
            "champion_value": None}


def _dataset_info_from_run(folder: Path, data: str | None) -> dict[str, Any] | None:
    """Runs trained before models carried dataset.json: recover it from the run's dataset, if readable."""
    if not data:
        return None
    from pipelines.data import read_manifest

    try:
        manifest = read_manifest(data)
    except (ValueError, OSError) as exc:
        print(f"[register] the model will carry no class names: {exc}", file=sys.stderr)
        return None
    tracking.write_dataset_info(folder, manifest)
    return read_dataset_info(folder)


def _gate(client, request: RegisterRequest, version: str, value: float) -> dict[str, Any]:
    """New versions are `challenger`; `champion` only if strictly better on the metric (or none yet,
    or --force). Compared at full precision: the champion's run metric, not the rounded tag."""
    mode = metric_mode(request.metric)
    try:
        champion = client.get_model_version_by_alias(request.name, CHAMPION)
    except Exception:
        champion = None
    champion_value = None if champion is None else _champion_value(client, champion, request.metric)
    if champion is None:
        promote, reason = True, "no champion yet"
    elif request.force:
        promote, reason = True, "forced"
        print(f"[register] WARNING: --force promotes version {version} to {CHAMPION} over version "
              f"{champion.version} ({request.metric} {value!r} vs {champion_value!r})", file=sys.stderr)
    else:
        better = value > champion_value if mode == "max" else value < champion_value
        promote = bool(better) or math.isnan(champion_value)
        verdict = "beats" if promote else "ties" if value == champion_value else "does not beat"
        reason = f"{request.metric} {value!r} {verdict} champion's {champion_value!r} ({mode})"
    if promote:
        client.set_registered_model_alias(request.name, CHAMPION, version)
        aliases = client.get_registered_model(request.name).aliases
        if str(aliases.get(CHALLENGER, "")) == str(version):
            client.delete_registered_model_alias(request.name, CHALLENGER)
    else:
        client.set_registered_model_alias(request.name, CHALLENGER, version)
    decision = "promoted" if promote else "kept_as_challenger"
    for key, val in {"gate_decision": decision, "gate_reason": reason,
                     "gate_champion_value": "" if champion_value is None else repr(champion_value),
                     "gate_value": repr(value)}.items():
        client.set_model_version_tag(request.name, version, key, val)
    print(f"[register] {request.name} v{version}: {decision} ({reason})", file=sys.stderr)
    return {"decision": decision, "reason": reason, "metric": request.metric, "value": value,
            "champion_value": champion_value}


def _champion_value(client, champion, metric: str) -> float:
    """The champion's `metric` at full precision: its run's metric (register also logs the IWAE
    there), else its own full-precision gate tag, else the rounded display tag (older versions)."""
    try:
        value = client.get_run(champion.run_id).data.metrics.get(metric)
    except Exception:
        value = None
    if value is None and champion.tags.get("gate_metric") == metric and champion.tags.get("gate_value"):
        value = champion.tags["gate_value"]
    if value is None:
        value = champion.tags.get(f"metric.{metric}", "nan")
    return float(value)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS -> (NAME, ALIAS, None); models:/NAME/VERSION -> (NAME, None, VERSION)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"model URI must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not version.isdigit():
        raise RegistryError(f"model URI must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    return name, None, version


def resolve_version(client, uri: str):
    """The ModelVersion a models:/ URI names, with errors that list what exists."""
    name, alias, version = parse_model_uri(uri)
    try:
        registered = client.get_registered_model(name)
    except Exception:
        names = [m.name for m in client.search_registered_models(max_results=50)]
        raise RegistryError(f"no registered model named {name!r} (registered: {', '.join(names) or 'none'})") from None
    if alias is not None:
        if alias not in registered.aliases:
            existing = ", ".join(f"{a} (v{v})" for a, v in sorted(registered.aliases.items())) or "none"
            raise RegistryError(f"model {name!r} has no alias {alias!r}; its aliases: {existing}")
        return client.get_model_version_by_alias(name, alias)
    try:
        return client.get_model_version(name, version)
    except Exception:
        raise RegistryError(f"model {name!r} has no version {version}") from None


def pull(uri: str, tracking_uri: str, out: str | Path) -> tuple[vaemodels.AutoEncoderModel, dict[str, Any]]:
    """Download the version `uri` names into folder `out`, verify checksums, load it (no pickle).

    `out` must be absent, empty, or hold an earlier pull of the same version (then it is refreshed).
    """
    check_reachable(tracking_uri)
    client = connect(tracking_uri, must_exist=True)
    version = resolve_version(client, uri)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        previous = out / "registry.json"
        same = previous.is_file() and json.loads(previous.read_text()).get("name") == version.name and \
            json.loads(previous.read_text()).get("version") == int(version.version)
        if not same:
            raise RegistryError(f"--out {out} is not empty and holds no pull of {version.name} v{version.version}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.pull-") as staging:
        source = _artifact_location(client, version)
        folder = _download(tracking_uri, source, Path(staging),
                           f"version {version.version} of {version.name!r} has no artifacts at {source}")
        label = f"{version.name} v{version.version}"
        try:
            check_not_pickled(folder, label)  # before anything else reads the folder
        except PickledModelError as exc:
            raise RegistryError(str(exc)) from None
        verify_checksums(folder, label, version.tags.get(CHECKSUMS_TAG))
        model = vaemodels.load_model(folder)
        dataset = read_dataset_info(folder) or {}
        info = {"name": version.name, "version": int(version.version), "aliases": sorted(version.aliases),
                "run_id": version.run_id, "path": str(out.resolve()), "model_family": model.name,
                "model_uri": uri, "dataset_sha256": version.tags.get("dataset_sha256", ""),
                "class_names": dataset.get("class_names")}
        (folder / "registry.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    return model, info


def _artifact_location(client, version) -> str:
    """Where the version's files are. Versions logged the MLflow 3 way (`log_model`, not vaepipe) name
    a logged model (`models:/m-...`), which MLflow resolves against the global registry URI rather
    than the one passed in: resolve it here, through this server."""
    if not version.source.startswith("models:/"):
        return version.source
    model_id = getattr(version, "model_id", None) or version.source[len("models:/"):]  # models:/m-<id>
    try:
        return client.get_logged_model(model_id).artifact_location
    except Exception as exc:
        raise RegistryError(f"version {version.version} of {version.name!r}: its logged model {model_id} "
                            f"is not on this server: {str(exc).splitlines()[0]}") from None


@torch.no_grad()
def iwae_on_validation(model, data: str | None, num_samples: int = 256, k: int = 100) -> float | None:
    """IWAE log p(x) (Burda et al. 2016) on the first `num_samples` validation images, in nats."""
    if not model.is_variational or not data:
        return None
    from pipelines.data import open_stream, read_manifest

    try:
        manifest = read_manifest(data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[register] skipping IWAE estimate: {exc}", file=sys.stderr)
        return None
    split = "val" if manifest.num_samples("val") else "train"
    images, labels = [], []
    for sample in open_stream(manifest, split, shuffle_buffer=0):
        images.append(sample[model.input_key])
        labels.append(sample["label"])
        if len(images) == num_samples:
            break
    x, y = torch.stack(images), torch.stack(labels)
    torch.manual_seed(0)
    return float(model.log_likelihood(x, k=k, labels=model.condition_on(y, all_known=True)).mean())


def verify_checksums(folder: Path, label: str, checksums_sha256: str | None = None) -> None:
    """Every file against checksums.json, and checksums.json against the digest recorded in the
    version's tags at registration (versions registered before that tag existed have none)."""
    expected_file = folder / CHECKSUMS_FILE
    if not expected_file.is_file():
        raise RegistryError(f"{label}: {CHECKSUMS_FILE} is missing; the version was not registered by vaepipe")
    if checksums_sha256 and hashlib.sha256(expected_file.read_bytes()).hexdigest() != checksums_sha256:
        raise RegistryError(f"{label}: {CHECKSUMS_FILE} does not match the digest recorded at registration "
                            "(artifacts rewritten after registration); re-register the run")
    expected = json.loads(expected_file.read_text())
    actual = file_checksums(folder)
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise RegistryError(f"{label}: artifact file(s) missing: {', '.join(missing)}")
    bad = sorted(name for name, digest in expected.items() if actual[name] != digest)
    if bad:
        raise RegistryError(f"{label}: checksum mismatch for {', '.join(bad)} (artifacts corrupted or altered)")


def _download(tracking_uri: str, artifact_uri: str, dst: Path, missing_message: str) -> Path:
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                        tracking_uri=tracking_uri))
    except Exception as exc:
        raise RegistryError(f"{missing_message}: {exc}") from None
    if not path.is_dir() or not any(path.iterdir()):
        raise RegistryError(missing_message)
    return path
