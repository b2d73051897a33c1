"""Make a saved vaepipe model folder also an MLflow pyfunc model, from code: `MLmodel`, the python
model source (`pyfunc_model.py`, no pickle), `code/vaemodels/`, the environment files and an input
example are added beside `config.json` + `model.safetensors`, whose MLmodel artifact entries point
at those same files (one copy of the weights). And the check that refuses pickled MLflow models.
"""
from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

MLMODEL_FILE = "MLmodel"
PYFUNC_SOURCE = Path(__file__).with_name("pyfunc_model.py")
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
# MLmodel artifact name -> the model folder's file (the python model reads them by these names)
ARTIFACT_FILES = {"config": "config.json", "weights": "model.safetensors", "dataset": "dataset.json"}
# what a consumer installs: the versions the model was registered with
REQUIREMENTS = ("mlflow", "torch", "safetensors", "numpy", "pandas")


class PickledModelError(ValueError):
    """An MLmodel that would run pickled code when loaded."""


def pyfunc_signature(model):
    """Rows in: label (conditional models; index or name), seed, temperature, n. Rows out: one per sample."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    inputs = [ColSpec(AnyType(), "label")] if model.is_conditional else []
    # seed is required so a request always says which draw it wants (and a misspelt column is an error)
    # n is Any, not long: rows that leave it out make a column with gaps, which MLflow refuses to cast
    # to long; the model checks it is an integer >= 1
    inputs += [ColSpec(DataType.long, "seed"), ColSpec(DataType.double, "temperature", required=False),
               ColSpec(AnyType(), "n", required=False)]
    outputs = [ColSpec(DataType.long, "row"), ColSpec(DataType.long, "index"), ColSpec(DataType.long, "label"),
               ColSpec(DataType.string, "class_name", required=False), ColSpec(DataType.long, "seed"),
               ColSpec(Array(Array(Array(DataType.float))), "image"), ColSpec(Array(DataType.float), "latent")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(model, class_names: list[str] | None) -> dict[str, list[Any]]:
    example: dict[str, list[Any]] = {"seed": [0, 1], "temperature": [1.0, 0.8], "n": [2, 1]}
    if model.is_conditional:
        example = {"label": [0, class_names[1] if class_names else 1], **example}
    return example


def requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def add_pyfunc_model(folder: Path, model, class_names: list[str] | None) -> None:
    """Write the MLflow pyfunc files into `folder` (a vaemodels.save_model folder)."""
    import mlflow
    from mlflow.models import Model

    import vaemodels

    folder = Path(folder)
    artifacts = {name: str(folder / file) for name, file in ARTIFACT_FILES.items() if (folder / file).is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code" / "vaemodels"
        shutil.copytree(Path(vaemodels.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        source = Path(tmp) / PYFUNC_SOURCE.name  # copied so MLmodel records no checkout path
        shutil.copyfile(PYFUNC_SOURCE, source)
        staging = Path(tmp) / "mlflow"
        mlflow.pyfunc.save_model(path=str(staging), python_model=str(source), artifacts=artifacts,
                                 code_paths=[str(code)], signature=pyfunc_signature(model),
                                 input_example=input_example(model, class_names), pip_requirements=requirements())
        # save_model copied the artifacts into artifacts/: point MLmodel at the folder's own files
        # instead, so the version holds one copy of the weights, where `vaepipe pull` reads them
        shutil.rmtree(staging / "artifacts")
        mlmodel = Model.load(str(staging / MLMODEL_FILE))
        for name, entry in mlmodel.flavors["python_function"]["artifacts"].items():
            entry["path"] = entry["uri"] = ARTIFACT_FILES[name]
        mlmodel.flavors["python_function"]["model_code_path"] = PYFUNC_SOURCE.name
        mlmodel.save(str(staging / MLMODEL_FILE))
        for entry in staging.iterdir():
            target = folder / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(entry), str(target))


def check_not_pickled(folder: Path, label: str) -> None:
    """Refuse a folder whose MLmodel would unpickle code on load: only the pyfunc flavor logged from
    code is accepted (no python_model.pkl, no other flavor). Folders without MLmodel pass (older
    versions hold only safetensors + JSON)."""
    path = Path(folder) / MLMODEL_FILE
    if not path.is_file():
        return
    try:
        flavors = (yaml.safe_load(path.read_text()) or {}).get("flavors") or {}
    except yaml.YAMLError as exc:
        raise PickledModelError(f"{label}: {MLMODEL_FILE} is not valid YAML ({exc}); re-register the run") from None
    pyfunc = flavors.get("python_function") or {}
    others = sorted(set(flavors) - {"python_function"})
    if others or pyfunc.get("python_model") or pyfunc.get("loader_module") != CODE_LOADER \
            or not pyfunc.get("model_code_path"):
        what = f"flavor(s) {', '.join(others)}" if others else \
            f"python model {pyfunc.get('python_model') or pyfunc.get('loader_module')!r}"
        raise PickledModelError(f"{label}: refused: its {MLMODEL_FILE} names {what}, which loads by unpickling; "
                                "vaepipe loads only models logged from code (re-register the run with vaepipe)")
