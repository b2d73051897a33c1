"""Generation throughput of `vaepipe generate` (Ray Data actor pool, Parquet + images, markers,
manifest) against decoding alone and against one process doing the same decode + PNG encode +
write, all with every core (issue 14). Each arm is a fresh process; arms are interleaved and
repeated, and figures are medians with min and max. Writes a section of BENCHMARKS.md.

    python -m benchmarks.generate_throughput [--runs 3] [--sizes 20000,100000] [--large 1000000]

Models: an untrained `vae` with an MLP (1x28x28, latent 16) and one with the conv backbone (1x64x64,
latent 10). `--sizes` run for both with every arm; `--large` (28x28 only, one run: it is long) checks
that time stays linear in samples, the driver's peak RSS and the manifest size with
`--image-format shards`. The `vaepipe generate` process starts its own Ray, so "end to end" holds
Ray's start-up; "after start-up" subtracts the wall time of the same command making 2 samples.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH, BLOCK = 256, 1000
MODELS = {"28": ((1, 28, 28), {"backbone": "mlp", "latent_dim": 16}),
          "64": ((1, 64, 64), {"backbone": "conv", "latent_dim": 10})}
VAEPIPE = str(Path(sys.executable).with_name("vaepipe"))


def decode_alone(model_dir: str, samples: int) -> float:
    """Seeded prior noise -> decoder -> uint8 in batches, nothing encoded or written: seconds."""
    import torch

    import vaemodels
    from pipelines.batch.model import to_uint8

    model = vaemodels.load_model(model_dir)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for i in range(0, samples, BATCH):
            x, _ = model.sample_with_latent(min(BATCH, samples - i), None, generator, 1.0)
            to_uint8(model.temper_pixels(x, 0.25))
    return time.perf_counter() - started


def single_process(model_dir: str, samples: int, out: str, image_format: str) -> float:
    """generate's own block function (decode, PNG, Parquet + image files) in a plain loop: seconds."""
    from pipelines.batch.generate import GenerateBlock, GenerateConfig, plan_blocks
    from pipelines.batch.job import BlockWriter

    config = GenerateConfig(model_dir=model_dir, out=out, num_samples=samples, batch_size=BATCH, block_size=BLOCK)
    started = time.perf_counter()
    compute = GenerateBlock(model_dir, False, BATCH, 1.0, 0, {"uri": "", "name": "", "version": ""}, None,
                            pixel_temperature=0.25, image_format=image_format)
    for block in plan_blocks(config, None):
        compute(block, BlockWriter(Path(out)))
    return time.perf_counter() - started


def peak_rss_mib(pid: int, stop: threading.Event, peak: list[float]) -> None:
    """Poll the process's VmHWM (its own peak RSS, children not included)."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except FileNotFoundError:
            return
        stop.wait(0.2)


def generate_command(model_dir: str, samples: int, out: str, image_format: str, workers: int) -> dict:
    """`vaepipe generate` as a user runs it: wall seconds, the driver's peak RSS, the manifest's size."""
    command = [VAEPIPE, "generate", "--model", model_dir, "--out", out, "--num-samples", str(samples),
               "--batch-size", str(BATCH), "--workers", str(workers), "--image-format", image_format,
               "--set", f"block_size={min(BLOCK, samples)}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), [0.0]
    watcher = threading.Thread(target=peak_rss_mib, args=(process.pid, stop, peak), daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    stop.set()
    if process.returncode != 0:
        raise RuntimeError(f"vaepipe generate failed: {stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["total"] == samples and not result["skipped"], result
    return {"wall_s": wall, "driver_peak_rss_mib": peak[0], "manifest_bytes": Path(result["manifest"]).stat().st_size}


def arm_process(*args: str) -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.generate_throughput", *args],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def summary(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="20000,100000", help="sample counts run with every arm, both models")
    parser.add_argument("--large", type=int, default=1_000_000, help="28x28 only, one run (0 = skip)")
    parser.add_argument("--linear-base", type=int, default=100_000,
                        help="the size --large is compared with for linearity (28x28 shards; one run unless in --sizes)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--arm", choices=("decode", "single"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--image-format", default="png", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm == "decode":
        print(decode_alone(args.model_dir, args.samples))
        return 0
    if args.arm == "single":
        print(single_process(args.model_dir, args.samples, args.folder, args.image_format))
        return 0

    import torch

    import vaemodels
    from benchmarks.report import update_section

    sizes = [int(s) for s in args.sizes.split(",") if s]
    cores = os.cpu_count() or 1
    rows, loads, verdicts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dirs = {}
        for key, (shape, params) in MODELS.items():
            torch.manual_seed(0)
            model_dirs[key] = str(vaemodels.save_model(vaemodels.build("vae", shape, **params), root / f"model-{key}"))
        startup = [generate_command(model_dirs["28"], 2, str(root / f"tiny-{r}"), "shards", args.workers)["wall_s"]
                   for r in range(args.runs)]
        job_walls: dict[tuple[str, int, str], list[float]] = {}
        for key in MODELS:
            for n in sizes:
                walls: dict[str, list[float]] = {a: [] for a in ("decode", "single", "png", "shards")}
                for run in range(args.runs):
                    tag = f"{key}-{n}-{run}"
                    walls["decode"].append(arm_process("--arm", "decode", "--model-dir", model_dirs[key],
                                                       "--samples", str(n)))
                    walls["single"].append(arm_process("--arm", "single", "--model-dir", model_dirs[key],
                                                       "--samples", str(n), "--folder", str(root / f"single-{tag}"),
                                                       "--image-format", "shards"))
                    for image_format in ("png", "shards"):
                        walls[image_format].append(generate_command(model_dirs[key], n, str(root / f"{image_format}-{tag}"),
                                                                    image_format, args.workers)["wall_s"])
                    loads.append(os.getloadavg()[0])
                    print(f"[bench] {tag}: " + ", ".join(f"{a} {w[-1]:.1f} s" for a, w in walls.items()), file=sys.stderr)
                decode = statistics.median(walls["decode"])
                for arm, label in (("decode", "decode alone, every core"),
                                   ("single", "one process: decode + PNG + Parquet + tar shard, every core"),
                                   ("png", f"`vaepipe generate`, {args.workers} actors, PNG files, end to end"),
                                   ("shards", f"`vaepipe generate`, {args.workers} actors, `--image-format shards`, end to end")):
                    rate = [n / w for w in walls[arm]]
                    rows.append(f"| {key}x{key} | {n:,} | {label} | {summary(rate)} | {decode / statistics.median(walls[arm]):.2f} |")
                for image_format in ("png", "shards"):
                    after = [w - statistics.median(startup) for w in walls[image_format]]
                    if min(after) > 0:  # under heavy load a 2-sample run can take longer than a big one
                        rows.append(f"| {key}x{key} | {n:,} | same, {image_format}, Ray start-up subtracted | "
                                    f"{summary([n / a for a in after])} | {decode / statistics.median(after):.2f} |")
                    job_walls[(key, n, image_format)] = walls[image_format]
                    ratio = decode / statistics.median(walls[image_format])
                    verdicts.append(f"{key}x{key} {n:,} {image_format}: {ratio:.2f}× "
                                    f"({'met' if ratio >= 0.8 else 'missed'})")
        large = None
        if args.large:
            decode_large = arm_process("--arm", "decode", "--model-dir", model_dirs["28"], "--samples", str(args.large))
            large = generate_command(model_dirs["28"], args.large, str(root / "large"), "shards", args.workers)
            large["decode_s"] = decode_large
            if ("28", args.linear_base, "shards") not in job_walls:
                job_walls[("28", args.linear_base, "shards")] = [generate_command(
                    model_dirs["28"], args.linear_base, str(root / "linear-base"), "shards", args.workers)["wall_s"]]
            loads.append(os.getloadavg()[0])
            print(f"[bench] large: {large}", file=sys.stderr)
    lines = [
        "## Generation throughput (benchmarks/generate_throughput.py)",
        "",
        f"{time.strftime('%Y-%m-%d')}, untrained `vae` models (28x28 MLP latent 16; 64x64 conv latent 10), pixel "
        f"temperature 0.25, blocks of {BLOCK}, decode batches of {BATCH}, {cores} cores, torch's default threads in "
        f"the single-process arms, {args.workers} Ray Data actors of 1 CPU each; each arm a fresh process, "
        f"{args.runs} runs interleaved, median (min–max); 1-min load average {min(loads):.1f}–{max(loads):.1f} while "
        f"it ran. `vaepipe generate` is the whole command (it starts Ray: {summary(startup, 1)} s for a 2-sample "
        "request). Ratio = decode alone's time / the arm's time.",
        "",
        "| images | samples | path | samples/s | ratio to decode alone |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Target: generation end to end ≥ 0.8× decode alone with every core: " + "; ".join(verdicts) + ".",
    ]
    if large is not None:
        n = args.large
        base = job_walls.get(("28", args.linear_base, "shards"))
        linear = (large["wall_s"] / statistics.median(base)) if base else None
        ratio = large["decode_s"] / large["wall_s"]
        lines += [
            "",
            f"At {n:,} samples (28x28, `--image-format shards`, one run): {large['wall_s']:.0f} s end to end "
            f"({n / large['wall_s']:.0f} samples/s), decode alone {large['decode_s']:.0f} s: ratio {ratio:.2f} "
            f"(**{'met' if ratio >= 0.8 else 'missed'}**); driver peak RSS {large['driver_peak_rss_mib']:.0f} MiB "
            f"(target < 1024: **{'met' if large['driver_peak_rss_mib'] < 1024 else 'missed'}**); manifest "
            f"{large['manifest_bytes'] / 1e6:.2f} MB (target < 1 MB: **{'met' if large['manifest_bytes'] < 1e6 else 'missed'}**)"
            + (f"; time at {n:,} / time at {args.linear_base:,} = {linear:.1f} (target {n / args.linear_base:.0f} ± "
               f"{0.15 * n / args.linear_base:.1f}: **{'met' if abs(linear - n / args.linear_base) <= 0.15 * n / args.linear_base else 'missed'}**)."
               if linear else "."),
        ]
    update_section(args.out, "\n".join(lines))
    print(json.dumps({"rows": rows, "large": large, "verdicts": verdicts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
