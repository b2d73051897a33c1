"""The workflows that chain stages, written once: search -> register (`vaepipe tune --register-as`,
`python -m jobs.tune`), pull -> run a batch job or the evaluation on a registered model (`vaepipe
generate|embed|score|denoise|interpolate|evaluate`, `python -m jobs.generate`). The CLI and jobs/
only build the typed config and call one of these; what each stage does lives in its own folder.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.batch.generate import GenerateConfig, run_generation
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
    """`vaepipe generate` and `python -m jobs.generate`: pull (if registered), then generate."""
    if model is not None and not model.startswith("models:/"):
        data = {**data, "model_uri": data.get("model_uri") or model}  # a folder is its own provenance
    return pull_and_run(data, GenerateConfig, run_generation, model, tracking_uri)
