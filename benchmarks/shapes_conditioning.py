"""Why the shapes `cvae` gives class-blind samples (issue 12): a diagnostic, not a target.

Trains a `cvae` in memory (plain loop, Adam, batch 64, clip 10, the family's defaults unless
`--params` overrides them) on 10,800 shapes and after each epoch asks a reference classifier
trained on real shapes (vaepipe's `fit_classifier`, early-stopped on 1,000 held-out train images)
three questions: are class-conditional samples of the right shape ("label agreement", 300 per
class)? are reconstructions with the true label? and does decoding a val code with a *wrong* label
change the shape (if the decoder ignores the label, the classifier still sees the true class)?
Prints one JSON line per epoch to stdout.

    python -m benchmarks.shapes_conditioning [--epochs 12] [--batch-size 64] [--params '{"beta": 0.5}'] [--res-max-side 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import vaemodels.backbones as backbones
from pipelines.data.sources import shapes_source
from pipelines.evaluation.metrics.classifier import accuracy, fit_classifier, per_class_accuracy
from vaemodels.cvae import CVAE, CVAEConfig

NUM_TRAIN, NUM_VAL, PER_CLASS = 10_800, 1_200, 300


def images_and_labels(total: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = shapes_source(total, 0, None).batch(np.arange(total))[:2]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(labels).long()


@torch.no_grad()
def diagnose(model: CVAE, reference, val_x: torch.Tensor, val_y: torch.Tensor) -> dict:
    model.eval()
    labels = torch.arange(3).repeat_interleave(PER_CLASS)
    samples = model.sample(len(labels), labels, generator=torch.Generator().manual_seed(1))
    mu, _ = model.encode(val_x, val_y)
    wrong = (val_y + 1) % 3
    decoded_wrong = model.decode(mu, wrong)
    out = {
        "val_elbo": round(float(model.loss({"image": val_x, "label": val_y})["elbo"]), 1),
        "sample_label_agreement": round(accuracy(reference, samples, labels), 3),
        "sample_agreement_per_class": [round(a, 3) for a in per_class_accuracy(reference, samples, labels, 3)],
        "recon_accuracy_per_class": [round(a, 3) for a in
                                     per_class_accuracy(reference, model.decode(mu, val_y), val_y, 3)],
        "wrong_label_decode_seen_as_given": round(accuracy(reference, decoded_wrong, wrong), 3),
        "wrong_label_decode_seen_as_true": round(accuracy(reference, decoded_wrong, val_y), 3),
    }
    model.train()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--params", default="{}", help="CVAEConfig overrides as JSON")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64, help="per step; smaller = more steps per epoch")
    parser.add_argument("--res-max-side", type=int, default=backbones.RES_BLOCK_MAX_SIDE,
                        help="largest feature-map side that gets a residual block (default: the backbone's)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = images_and_labels(NUM_TRAIN + NUM_VAL)
    train_x, train_y, val_x, val_y = x[:NUM_TRAIN], y[:NUM_TRAIN], x[NUM_TRAIN:], y[NUM_TRAIN:]
    reference, report = fit_classifier(train_x[:-1000], train_y[:-1000], 3, holdout=(train_x[-1000:], train_y[-1000:]))
    print(json.dumps({"reference_val_accuracy": round(accuracy(reference, val_x, val_y), 3),
                      "reference_steps": report.steps}), flush=True)
    backbones.RES_BLOCK_MAX_SIDE = args.res_max_side
    model = CVAE(CVAEConfig(**json.loads(args.params)), (1, 64, 64), 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator, step, started = torch.Generator().manual_seed(0), 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(NUM_TRAIN, generator=generator)
        for i in range(0, NUM_TRAIN - args.batch_size + 1, args.batch_size):
            index = order[i:i + args.batch_size]
            model.set_training_step(step)
            loss = model.loss({"image": train_x[index], "label": train_y[index]})["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            step += 1
        row = {"epoch": epoch, "steps": step, "seconds": round(time.perf_counter() - started), **diagnose(model, reference, val_x, val_y)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
