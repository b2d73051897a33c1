"""Classifier-filtered generation on a built-in source: acceptance rate at several confidences and
generation time with vs. without the filter (Ray started once, before timing).

    PYTHONPATH=$PWD python benchmarks/filter_acceptance.py --source digits --workdir /tmp/filterbench
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="digits")
    parser.add_argument("--workdir", default="/tmp/filterbench")
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--confidences", default="0.5,0.9")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import vaemodels
    from pipelines.data import BuildConfig, build_dataset
    from pipelines.data.manifest import read_manifest
    from pipelines.evaluation.data import early_stopping_split, load_split
    from pipelines.batch.generate import GenerateConfig, run_generation
    from pipelines.evaluation.metrics.classifier import accuracy, fit_classifier, save_classifier
    from pipelines.ray_runtime import ensure_ray

    work = Path(args.workdir)
    data = work / args.source
    if not (data / "manifest.json").is_file():
        build_dataset(BuildConfig(args.source, str(data), seed=0))
    manifest = read_manifest(str(data))
    train, val = load_split(manifest, "train", 10**6), load_split(manifest, "val", 10**6)
    shape, classes = tuple(train.images.shape[1:]), len(manifest.class_names)

    started = time.perf_counter()
    fit, stop = early_stopping_split(train, 0.1, 0)
    classifier, report = fit_classifier(fit.images, fit.labels, classes, 2000, seed=0, holdout=(stop.images, stop.labels))
    val_accuracy = accuracy(classifier, val.images, val.labels)
    save_classifier(classifier, work / "reference_classifier", val_accuracy=val_accuracy,
                    class_names=list(manifest.class_names))
    print(f"classifier: val accuracy {val_accuracy:.3f}, {report.steps} steps, {time.perf_counter() - started:.0f}s")

    started = time.perf_counter()
    torch.manual_seed(0)
    small = shape[1] <= 16
    model = vaemodels.build("cvae", shape, num_classes=classes, latent_dim=8 if small else 16,
                            **({"backbone": "mlp", "hidden_dim": 256} if small else {}))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.train_steps):
        index = torch.randint(0, len(train.images), (128,), generator=generator)
        loss = model.loss({"image": train.images[index], "label": train.labels[index]})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model_dir = vaemodels.save_model(model.eval(), work / "cvae")
    print(f"cvae: {args.train_steps} steps, final loss {float(loss):.1f}, {time.perf_counter() - started:.0f}s")

    ensure_ray()
    rows = []
    # an unfiltered run first and last: the first also pays for the actors' warm-up
    runs = [("unfiltered", None, 0), *((f"p{c}", float(c), 0) for c in args.confidences.split(",")),
            ("unfiltered-again", None, 1)]
    for name, confidence, seed in runs:
        config = {"model_dir": str(model_dir), "out": str(work / "gen" / name), "per_class": args.per_class,
                  "workers": 2, "overwrite": True, "seed": seed}
        if confidence is not None:
            config.update(filter_classifier=str(work / "reference_classifier"), filter_confidence=confidence)
        started = time.perf_counter()
        try:
            result = run_generation(GenerateConfig.from_dict(config))
        except ValueError as exc:
            rows.append({"run": name, "error": str(exc), "seconds": round(time.perf_counter() - started, 1)})
            continue
        seconds = time.perf_counter() - started
        entry = {"run": name, "total": result["total"], "seconds": round(seconds, 1),
                 "acceptance_rate": result["acceptance_rate"]}
        if confidence is not None:
            per_class = json.loads(Path(result["manifest"]).read_text())["filter"]["per_class"]
            rates = {k: v["acceptance_rate"] for k, v in per_class.items()}
            entry.update(min_class=min(rates, key=rates.get), min_rate=min(rates.values()), max_rate=max(rates.values()))
        rows.append(entry)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
