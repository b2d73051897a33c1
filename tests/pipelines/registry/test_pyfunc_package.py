"""The MLflow package of a saved model, without a server: MLmodel from code (no pickle) with one copy
of the weights, `mlflow.pyfunc` predictions that match the model's own decoder, clear errors for bad
rows, and the check that refuses pickled MLmodels."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import vaemodels
from pipelines.registry.pyfunc_package import PickledModelError, add_pyfunc_model, check_not_pickled

NAMES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pkg") / "model"
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), 3, backbone="mlp", latent_dim=4, hidden_dim=32)
    vaemodels.save_model(model, folder)
    (folder / "dataset.json").write_text(json.dumps({"class_names": NAMES}))
    add_pyfunc_model(folder, model, NAMES)
    return folder, vaemodels.load_model(folder)


@pytest.fixture(scope="module")
def pyfunc(packaged):
    import mlflow

    return mlflow.pyfunc.load_model(str(packaged[0]))


def test_package_is_code_not_pickle_with_one_copy_of_the_weights(packaged):
    folder, _ = packaged
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    assert pyfunc["model_code_path"] == "pyfunc_model.py" and (folder / "pyfunc_model.py").is_file()
    assert {k: v["path"] for k, v in pyfunc["artifacts"].items()} == {
        "config": "config.json", "weights": "model.safetensors", "dataset": "dataset.json"}
    assert not (folder / "artifacts").exists() and not list(folder.rglob("*.pkl"))
    assert (folder / "code" / "vaemodels" / "serialization.py").is_file()
    inputs = [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])]
    assert inputs == ["label", "seed", "temperature", "n"]
    requirements = (folder / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {"mlflow", "torch", "safetensors", "numpy", "pandas"}
    check_not_pickled(folder, "pkg")  # passes


def test_predict_matches_the_decoder_and_is_seeded(packaged, pyfunc):
    model = packaged[1]
    request = pd.DataFrame({"label": [2, "one"], "seed": [7, 7], "temperature": [1.0, 0.5], "n": [3, 2]})
    out = pyfunc.predict(request)
    assert len(out) == 5 and list(out["row"]) == [0, 0, 0, 1, 1] and list(out["index"]) == [0, 1, 2, 0, 1]
    assert list(out["label"]) == [2, 2, 2, 1, 1] and list(out["class_name"]) == ["two"] * 3 + ["one"] * 2
    images, latents = np.stack(out["image"]), np.stack(out["latent"])
    assert images.shape == (5, 1, 8, 8) and latents.shape == (5, 4) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    # the latent is the seeded prior noise times the temperature, and the image is its decoding
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    assert np.allclose(latents[:3], noise.numpy()) and np.allclose(latents[3:], 0.5 * noise[:2].numpy())
    with torch.no_grad():
        decoded = model.decode(torch.from_numpy(latents), torch.tensor([2, 2, 2, 1, 1]))
    assert np.allclose(images, decoded.numpy(), atol=1e-6)
    again = pyfunc.predict(request)
    assert np.array_equal(np.stack(again["image"]), images)


@pytest.mark.parametrize("rows, message", [
    ({"label": ["seven"], "seed": [0]}, "unknown label 'seven': use a class index 0..2 or one of zero, one, two"),
    ({"label": [3], "seed": [0]}, "unknown label 3"),
    ({"label": [1], "seed": [0], "n": [-2]}, "n must be >= 1, got -2"),
    ({"label": [1], "seed": [0], "temperature": [0.0]}, "temperature must be a finite number > 0"),
    ({"label": [1], "seed": [0], "n": [5000]}, "at most 1000 per request"),
    ({"label": [1], "seed": [-1]}, "seed must be in"),
    ({"lable": [1], "seed": [0]}, r"missing inputs \['label'\]"),
    ({"label": [1]}, r"missing inputs \['seed'\]"),
])
def test_bad_rows_get_one_clear_message(pyfunc, rows, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message) as caught:
        pyfunc.predict(pd.DataFrame(rows))
    assert caught.value.get_http_status_code() == 400  # a client error when served, not a 500


def test_pickled_or_foreign_mlmodels_are_refused(packaged, tmp_path):
    folder, _ = packaged
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pickled = json.loads(json.dumps(mlmodel))
    pyfunc = pickled["flavors"]["python_function"]
    pyfunc.pop("model_code_path")
    pyfunc["loader_module"], pyfunc["python_model"] = "mlflow.pyfunc.model", "python_model.pkl"
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(pickled))
    with pytest.raises(PickledModelError, match="v3: refused: its MLmodel names python model 'python_model.pkl'"):
        check_not_pickled(tmp_path, "m v3")
    foreign = json.loads(json.dumps(mlmodel))
    foreign["flavors"]["sklearn"] = {"pickled_model": "model.pkl", "serialization_format": "cloudpickle"}
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(foreign))
    with pytest.raises(PickledModelError, match="names flavor\\(s\\) sklearn"):
        check_not_pickled(tmp_path, "m v3")
    (tmp_path / "MLmodel").unlink()
    check_not_pickled(tmp_path, "m v3")  # older versions have no MLmodel: nothing to refuse
