"""Training job: `python -m jobs.train --config FILE` locally, or on a cluster with
`vaepipe submit train --address http://HEAD:8265 --config FILE` (or `ray job submit --working-dir . --
python -m jobs.train --config FILE`). The config is `vaepipe train`'s YAML."""
import sys

from jobs._entry import run_job
from pipelines.training.train import run_training
from pipelines.training.config import TrainConfig


def main(argv=None) -> int:
    return run_job("jobs.train", argv, lambda data: run_training(TrainConfig.from_dict(data)))


if __name__ == "__main__":
    sys.exit(main())
