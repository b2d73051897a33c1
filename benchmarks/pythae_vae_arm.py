"""The pythae arm of benchmarks/vae_vs_pythae.py. Runs inside a throwaway virtualenv that has
pythae (and no vaepipe): trains pythae's VAE on the given arrays and prints one JSON line with
its held-out NLL (pythae's own `get_nll`, an IWAE estimate) and the training wall time. With
`--k 0` it skips the NLL: benchmarks/fast_path.py times this whole process as pythae's side.
"""
import argparse
import json
import time

import numpy as np
import torch
from pythae.models import VAE, VAEConfig
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig

parser = argparse.ArgumentParser()
for flag, kind in [("--data", str), ("--seed", int), ("--epochs", int), ("--k", int), ("--latent", int),
                   ("--batch", int), ("--lr", float), ("--workdir", str)]:
    parser.add_argument(flag, type=kind, required=True)
args = parser.parse_args()

arrays = np.load(args.data)
x_train, x_val = arrays["x_train"], arrays["x_val"]
torch.manual_seed(args.seed)
model = VAE(VAEConfig(input_dim=tuple(x_train.shape[1:]), latent_dim=args.latent, reconstruction_loss="bce"))
trainer_config = BaseTrainerConfig(
    output_dir=args.workdir, num_epochs=args.epochs, learning_rate=args.lr, seed=args.seed,
    per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch, no_cuda=True,
)
started = time.perf_counter()
TrainingPipeline(training_config=trainer_config, model=model)(train_data=x_train, eval_data=x_val)
train_s = time.perf_counter() - started
if args.k == 0:
    print(json.dumps({"train_s": train_s}))
    raise SystemExit(0)
model.eval()
torch.manual_seed(args.seed)
log_p = model.get_nll(torch.from_numpy(x_val), n_samples=args.k, batch_size=min(args.k, 500))
print(json.dumps({"nll": -float(log_p), "train_s": train_s}))  # get_nll returns the mean log p(x)
