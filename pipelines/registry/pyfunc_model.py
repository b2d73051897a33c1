"""The MLflow python model of a registered version, logged *from code* (MLflow's models-from-code):
MLflow runs this file; nothing is unpickled. `load_context` rebuilds the network from the
version's `config.json` + `model.safetensors` with `vaemodels` (shipped beside it as `code/`), and
`predict` turns request rows into samples. It imports only mlflow, torch, numpy, pandas and
vaemodels, so a consumer without vaepipe can load and serve it. vaepipe itself never imports it.

Request: one row per draw request, columns `label` (conditional models: class index or class name),
`seed` (required), `temperature` (default 1.0), `n` (samples for the row, default 1). Answer: one
row per sample: `row`, `index`, `label`, `class_name`, `seed`, `image` (float [0, 1], nested
C x H x W lists), `latent` (the decoded z). A row's samples depend only on (label, seed,
temperature, n), so equal rows give equal samples.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_SAMPLES = 1000  # per request, all rows together: bigger jobs belong to `vaepipe generate`
COLUMNS = ("label", "seed", "temperature", "n")


class BadRequest(MlflowException):
    """A request row the model cannot answer; MLflow's scoring server turns it into an HTTP 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class VaeSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import vaemodels

        folder = Path(context.artifacts["config"]).parent
        self.model = vaemodels.load_model(folder)  # eval mode, CPU
        dataset_file = Path(context.artifacts.get("dataset", folder / "dataset.json"))
        dataset = json.loads(dataset_file.read_text()) if dataset_file.is_file() else {}
        names = dataset.get("class_names") if isinstance(dataset, dict) else None
        self.class_names = [str(n) for n in names] if names else None

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import numpy as np
        import pandas as pd
        import torch

        model = self.model
        if not model.is_generative:
            raise BadRequest(f"model {model.name!r} is not generative (it has no prior to sample from)")
        rows = _rows(model_input)
        requests = [self._parse_row(i, row) for i, row in enumerate(rows)]
        total = sum(r["n"] for r in requests)
        if total > MAX_SAMPLES:
            raise BadRequest(f"the request asks for {total} samples; at most {MAX_SAMPLES} per request "
                             "(use `vaepipe generate` for datasets)")
        out: list[dict[str, Any]] = []
        with torch.inference_mode():
            for i, r in enumerate(requests):
                images, latents = _draw(model, r["n"], r["label"], r["seed"], r["temperature"])
                for k in range(r["n"]):
                    out.append({"row": i, "index": k, "label": -1 if r["label"] is None else r["label"],
                                "class_name": r["class_name"], "seed": r["seed"],
                                "image": images[k], "latent": latents[k]})
        columns = ["row", "index", "label", "class_name", "seed", "image", "latent"]
        frame = pd.DataFrame(out, columns=columns)
        return frame.astype({"row": np.int64, "index": np.int64, "label": np.int64, "seed": np.int64})

    def _parse_row(self, i: int, row: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise BadRequest(f"row {i}: unknown column(s) {', '.join(map(repr, unknown))}; "
                             f"a row holds {', '.join(COLUMNS)}")
        n = _integer(row.get("n"), 1, f"row {i}: n")
        if n < 1:
            raise BadRequest(f"row {i}: n must be >= 1, got {n}")
        if _missing(row.get("seed")):
            raise BadRequest(f"row {i}: seed is missing: every row names its seed (an integer >= 0)")
        seed = _integer(row.get("seed"), 0, f"row {i}: seed")
        if not 0 <= seed < 2 ** 63:
            raise BadRequest(f"row {i}: seed must be in [0, 2**63), got {seed}")
        temperature = row.get("temperature")
        temperature = 1.0 if _missing(temperature) else temperature
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise BadRequest(f"row {i}: temperature must be a number, got {temperature!r}") from None
        if not (math.isfinite(temperature) and temperature > 0):
            raise BadRequest(f"row {i}: temperature must be a finite number > 0, got {temperature}")
        label, class_name = self._label(i, row.get("label"))
        return {"n": n, "seed": seed, "temperature": temperature, "label": label, "class_name": class_name}

    def _label(self, i: int, value: Any) -> tuple[int | None, str | None]:
        model = self.model
        if not model.is_conditional:
            if not _missing(value):
                raise BadRequest(f"row {i}: model {model.name!r} is unconditional: drop the label column")
            return None, None
        names = self.class_names or [str(k) for k in range(model.num_classes)]
        if _missing(value):
            raise BadRequest(f"row {i}: model {model.name!r} is conditional: give a label "
                             f"(class index 0..{model.num_classes - 1} or one of {_listing(names)})")
        value = value.item() if hasattr(value, "item") else value  # numpy scalars from a DataFrame
        if isinstance(value, float) and value.is_integer():  # an integer column with gaps comes back as floats
            value = int(value)
        text = str(value).strip()
        if text in names:
            label = names.index(text)
        elif text.lstrip("-").isdigit() and int(text) in range(model.num_classes):
            label = int(text)
        else:
            raise BadRequest(f"row {i}: unknown label {value!r}: use a class index 0..{model.num_classes - 1} "
                             f"or one of {_listing(names)}")
        return label, (self.class_names[label] if self.class_names else None)


def _draw(model, n: int, label: int | None, seed: int, temperature: float):
    """n samples and the latent z each was decoded from: the model's own `sample_with_latent`
    (its prior, e.g. a cvae's per-class one), seeded on the CPU as `vaepipe generate` draws."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    labels = None if label is None else torch.full((n,), label, dtype=torch.long)
    images, z = model.sample_with_latent(n, labels, generator, temperature)
    return list(images.float().cpu().numpy()), list(z.float().cpu().numpy())


def _rows(model_input) -> list[dict[str, Any]]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return model_input
    raise BadRequest(f"expected rows with columns {', '.join(COLUMNS)} (a DataFrame or a list of dicts), "
                     f"got {type(model_input).__name__}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _integer(value: Any, default: int, what: str) -> int:
    if _missing(value):
        return default
    value = value.item() if hasattr(value, "item") else value  # numpy scalars from a DataFrame
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():  # a column with gaps comes back as floats
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise BadRequest(f"{what} must be an integer, got {value!r}")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:20]) + (f", ... ({len(names)} classes)" if len(names) > 20 else "")


mlflow.models.set_model(VaeSampler())
