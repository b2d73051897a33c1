"""Search job: `python -m jobs.tune --config FILE` locally, or `vaepipe submit tune --address
http://HEAD:8265 --config FILE` on a cluster. The config is `vaepipe tune`'s YAML (base, search,
scheduler); an optional top-level `register_as: NAME` registers the best trial's model."""
import sys

from jobs._entry import run_job
from pipelines.training.search_config import TuneConfig
from pipelines.workflows import search_and_register


def main(argv=None) -> int:
    def pipeline(data: dict) -> dict:
        register_as = data.pop("register_as", None)
        return search_and_register(TuneConfig.from_dict(data), register_as)

    return run_job("jobs.tune", argv, pipeline)


if __name__ == "__main__":
    sys.exit(main())
