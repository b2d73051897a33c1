"""Generation throughput of the Ray Data job (Parquet + PNG files, actor pool) against one process
doing the same decode + PNG encode + write, and against decoding alone: same model, same request,
measured side by side in one run. Writes a section of BENCHMARKS.md.

    python -m benchmarks.generate_throughput [--samples 20000] [--workers 2]

The Ray figure is end to end (planning, actor start-up with model load, every file, markers,
manifest) on an already started Ray instance; starting Ray itself is a one-off and not counted.
A second job of one sample per actor measures the fixed start-up, reported beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import vaemodels
from benchmarks.report import update_section
from pipelines.batch.job import BlockWriter
from pipelines.batch.generate import GenerateBlock, GenerateConfig, plan_blocks, run_generation

INPUT_SHAPE = (1, 64, 64)
BATCH = 256
BLOCK = 1000


def decode_alone(model_dir: str, config: GenerateConfig, threads: int) -> float:
    """Seeded noise -> decode -> uint8, nothing encoded or written: samples/s."""
    torch.set_num_threads(threads)
    model = vaemodels.load_model(model_dir)
    started = time.perf_counter()
    with torch.inference_mode():
        for block in plan_blocks(config, None):
            generator = torch.Generator().manual_seed(block["seed"])
            for i in range(0, block["count"], BATCH):
                images, _ = model.sample_with_latent(min(BATCH, block["count"] - i), None, generator, 1.0)
                (images * 255).round().to(torch.uint8)
    return config.num_samples / (time.perf_counter() - started)


def single_process(model_dir: str, config: GenerateConfig, out: Path) -> float:
    """The job's own per-block compute (decode, PNG, Parquet + PNG files) in a plain loop: samples/s."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    compute = GenerateBlock(model_dir, False, BATCH, 1.0, config.seed, {"uri": "", "name": "", "version": ""}, None)
    for block in plan_blocks(config, None):
        compute(block, BlockWriter(out))
    return config.num_samples / (time.perf_counter() - started)


def ray_job(config: GenerateConfig) -> float:
    """Seconds for the whole job."""
    started = time.perf_counter()
    result = run_generation(config)
    assert result["total"] == config.num_samples and not result["skipped"]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    import ray

    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = vaemodels.build("vae", INPUT_SHAPE, backbone="conv", latent_dim=10)
        model_dir = str(vaemodels.save_model(model, Path(tmp) / "model"))

        def config(out: str) -> GenerateConfig:
            return GenerateConfig(model_dir=model_dir, out=out, num_samples=args.samples, batch_size=BATCH,
                                  block_size=BLOCK, workers=args.workers)

        decode_1 = decode_alone(model_dir, config("-"), threads=1)
        decode_all = decode_alone(model_dir, config("-"), threads=cores)
        loop = single_process(model_dir, config("-"), Path(tmp) / "loop")
        job_s = ray_job(config(str(Path(tmp) / "job")))
        # the fixed cost (planning, actor start-up, model load): one sample per actor
        startup_s = ray_job(dataclasses.replace(config(str(Path(tmp) / "tiny")), num_samples=args.workers,
                                                block_size=1))
    ray.shutdown()
    job = args.samples / job_s
    steady = args.samples / max(job_s - startup_s, 1e-9)
    load = os.getloadavg()[0]

    result = {
        "samples": args.samples, "workers": args.workers, "cores": cores,
        "ray_job_samples_per_s": round(job, 1), "ray_job_s": round(job_s, 2), "ray_startup_s": round(startup_s, 2),
        "ray_job_after_startup_samples_per_s": round(steady, 1), "single_process_samples_per_s": round(loop, 1),
        "decode_alone_1_thread_samples_per_s": round(decode_1, 1),
        f"decode_alone_{cores}_threads_samples_per_s": round(decode_all, 1),
        "ratio_job_to_single_process": round(job / loop, 3),
        "ratio_job_to_decode_alone_1_thread": round(job / decode_1, 3),
        f"ratio_job_to_decode_alone_{cores}_threads": round(job / decode_all, 3),
        "load_average_1min_at_end": round(load, 2),
    }
    section = (
        "## Generation throughput (benchmarks/generate_throughput.py)\n\n"
        f"{time.strftime('%Y-%m-%d')}, {args.samples} samples from an untrained conv VAE on 1x64x64 (latent 10), "
        f"blocks of {BLOCK}, decode batches of {BATCH}, {cores}-core CPU machine shared with other work "
        f"(1-min load average {load:.1f} at the end). "
        "The Ray job is end to end on a started Ray (actor start-up, Parquet + one PNG file per sample, "
        "markers, manifest); the single process runs the same block function in a loop, 1 torch thread.\n\n"
        "| path | samples/s | ratio to single process |\n|---|---|---|\n"
        f"| Ray Data job, {args.workers} actors (1 CPU each), end to end | {job:.0f} | {job / loop:.2f} |\n"
        f"| same job, its {startup_s:.1f} s fixed start-up excluded | {steady:.0f} | {steady / loop:.2f} |\n"
        f"| single process: decode + PNG + write | {loop:.0f} | 1.00 |\n"
        f"| decode alone, 1 thread | {decode_1:.0f} | {decode_1 / loop:.2f} |\n"
        f"| decode alone, {cores} threads | {decode_all:.0f} | {decode_all / loop:.2f} |\n\n"
        f"Job end to end / decode alone: {job / decode_1:.2f} (1 thread), {job / decode_all:.2f} ({cores} threads).\n"
        "Targets: job >= 1.5x the single process, >= 0.6x decode alone.\n"
    )
    update_section(args.out, section)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
