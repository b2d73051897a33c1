"""Generation job: `python -m jobs.generate --config FILE` locally, or `vaepipe submit generate
--address http://HEAD:8265 --config FILE` on a cluster (the scheduled daily run uses an `out`
with `{date}`). The config is configs/generate.yaml's shape; `model_uri: models:/NAME@ALIAS`
with `tracking_uri` pulls the registered model first (a `model_dir` is used as given).
`filter_classifier` (a saved reference classifier folder the driver can read; it is shipped to the
actors) with `filter_confidence` keeps only samples the classifier assigns to their label. With a
tracking URI the run is recorded in MLflow (pipelines/registry/lineage.py); `seed: null` with a `{date}`
out derives each day's seed from the date; `evaluate_against` evaluates the data written."""
import sys

from jobs._entry import run_job
from pipelines.workflows import pull_and_generate


def main(argv=None) -> int:
    # the cluster images set MLFLOW_TRACKING_URI (infra/kuberay: vaepipe-env), as MLflow itself reads it
    return run_job("jobs.generate", argv, lambda data: pull_and_generate(data, tracking_uri=data.pop("tracking_uri", None)))


if __name__ == "__main__":
    sys.exit(main())
