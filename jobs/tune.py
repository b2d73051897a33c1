"""Search job: `python -m jobs.tune --config FILE` locally, or `vaepipe submit tune --address
http://HEAD:8265 --config FILE` on a cluster. The config is `vaepipe tune`'s YAML (base, search,
scheduler); an optional top-level `register_as: NAME` registers the best trial's model."""
import sys

from jobs._entry import run_job
from pipelines.registry.versions import RegisterRequest, register_run
from pipelines.training.search import run_search
from pipelines.training.search_config import TuneConfig


def search_and_register(data: dict) -> dict:
    register_as = data.pop("register_as", None)
    config = TuneConfig.from_dict(data)
    result = run_search(config)
    if register_as:
        result["registered"] = register_run(RegisterRequest(
            run_id=result["best"]["run_id"], name=register_as, tracking_uri=result["tracking_uri"],
            metric=config.search.metric))
    return result


def main(argv=None) -> int:
    return run_job("jobs.tune", argv, search_and_register)


if __name__ == "__main__":
    sys.exit(main())
