"""One SDV TVAESynthesizer arm of benchmarks/tables_vs_sdv.py, run inside SDV's own virtualenv (it pins
other versions of what vaepipe uses). Reads the train rows and an sdtype per column, fits, samples, writes
the synthetic rows as Parquet and prints one JSON line: fit seconds and epochs.

    .bench-venvs/sdv/bin/python benchmarks/sdv_tvae_arm.py --train T.parquet --sdtypes S.json --out O.parquet ...
"""
import argparse
import json
import time

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--sdtypes", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sdv.metadata import Metadata
    from sdv.single_table import TVAESynthesizer

    import sklearn.mixture  # noqa: F401  one-off lazy imports, paid outside the timing in both arms
    import torch._dynamo  # noqa: F401

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    train = pd.read_parquet(args.train)
    sdtypes = json.loads(open(args.sdtypes).read())
    metadata = Metadata.load_from_dict({"tables": {"table": {"columns": {c: {"sdtype": t} for c, t in sdtypes.items()}}}})
    synthesizer = TVAESynthesizer(metadata, epochs=args.epochs, batch_size=args.batch_size, enable_gpu=False)
    started = time.perf_counter()
    synthesizer.fit({"table": train})  # SDV 2: data is a {table name: DataFrame} dict
    fit_s = time.perf_counter() - started
    sampled = synthesizer.sample(num_rows=args.rows)
    (sampled["table"] if isinstance(sampled, dict) else sampled).to_parquet(args.out)
    print(json.dumps({"fit_s": fit_s, "epochs": args.epochs}))


if __name__ == "__main__":
    main()
