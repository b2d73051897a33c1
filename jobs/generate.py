"""Generation job: `python -m jobs.generate --config FILE` locally, or `vaepipe submit generate
--address http://HEAD:8265 --config FILE` on a cluster (the scheduled daily run uses an `out`
with `{date}`). The config is configs/generate.yaml's shape; `model_uri: models:/NAME@ALIAS`
with `tracking_uri` pulls the registered model first (a `model_dir` is used as given).
`filter_classifier` (a saved reference classifier folder the driver can read; it is shipped to the
actors) with `filter_confidence` keeps only samples the classifier assigns to their label."""
import os
import sys
import tempfile

from jobs._entry import run_job
from pipelines.batch.generate import GenerateConfig, run_generation
from pipelines.registry.versions import pull


def pull_and_generate(data: dict) -> dict:
    # the cluster images set MLFLOW_TRACKING_URI (infra/kuberay: vaepipe-env), as MLflow itself reads it
    tracking_uri = data.pop("tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    uri = data.get("model_uri", "")
    with tempfile.TemporaryDirectory(prefix="vaepipe-model-") as tmp:
        if uri.startswith("models:/") and not data.get("model_dir"):
            if not tracking_uri:
                raise ValueError("model_uri models:/... needs tracking_uri in the generate config "
                                 "(or MLFLOW_TRACKING_URI)")
            _, info = pull(uri, tracking_uri, f"{tmp}/model")
            data.update(model_dir=info["path"], model_name=info["name"], model_version=str(info["version"]))
        return run_generation(GenerateConfig.from_dict(data))


def main(argv=None) -> int:
    return run_job("jobs.generate", argv, pull_and_generate)


if __name__ == "__main__":
    sys.exit(main())
