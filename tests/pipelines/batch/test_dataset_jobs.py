"""The dataset batch jobs (embed, score, denoise, interpolate) on the digits shards with briefly trained
models: exact rows per input shard, values the model itself gives, thresholds that flag what they
promise, denoising that helps, grids with checksums; reruns are no-ops, same requests give the same
bytes, and bad requests fail before anything is written."""
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import vaemodels
from pipelines.batch.job import BlockWriter, OutputExistsError, verify_files
from pipelines.config import ConfigError
from pipelines.data import BuildConfig, ManifestError, ShardStream, build_dataset, read_manifest
from pipelines.data.reader import decode_png, read_raw_samples
from pipelines.batch.dataset import shard_blocks, shard_urls
from pipelines.batch.denoise import DenoiseBlock, DenoiseConfig, run_denoising
from pipelines.batch.embed import EmbedBlock, EmbedConfig, run_embedding
from pipelines.batch.interpolate import InterpolateBlock, InterpolateConfig, plan_block, run_interpolation
from pipelines.evaluation.metrics import detection_metrics, train_briefly
from pipelines.batch.score import ScoreBlock, ScoreConfig, run_scoring

TRAIN_ROWS, VAL_ROWS = 1617, 180  # the digits fixture: 5 train shards (400 x 4 + 17), 1 val shard
LATENT_DIM = 4


def split_samples(dataset, split):
    """Images, labels and indices of a split in stored order (what the jobs' rows must match): the
    manifest's shards in turn, each shard's samples as written."""
    manifest = read_manifest(str(dataset))
    samples = [sample for shard in manifest.shards(split) for sample in read_raw_samples(shard.url, [])]
    return (torch.stack([decode_png(s["png"]) for s in samples]),
            torch.tensor([int(s["cls"]) for s in samples]),
            [int(s["__key__"]) for s in samples])


def trained(digits_dataset, tmp_path_factory, family, steps, lr, **params):
    images, labels, _ = split_samples(digits_dataset, "train")
    torch.manual_seed(0)
    model = vaemodels.build(family, (1, 8, 8), backbone="mlp", hidden_dim=64, **params)
    train_briefly(model, images, labels, steps=steps, lr=lr)
    return str(vaemodels.save_model(model, tmp_path_factory.mktemp("models") / family))


@pytest.fixture(scope="module")
def vae_dir(digits_dataset, tmp_path_factory):
    return trained(digits_dataset, tmp_path_factory, "vae", steps=200, lr=3e-3, latent_dim=LATENT_DIM)


@pytest.fixture(scope="module")
def dae_dir(digits_dataset, tmp_path_factory):
    return trained(digits_dataset, tmp_path_factory, "dae", steps=300, lr=1e-2, latent_dim=8, corruption="gaussian")


@pytest.fixture(scope="module")
def noise_dataset(tmp_path_factory):
    """300 images of uniform noise, digit-sized and unlabelled, built like any npz source."""
    folder = tmp_path_factory.mktemp("noise")
    np.savez(folder / "noise.npz", x=np.random.default_rng(0).integers(0, 256, size=(300, 8, 8), dtype=np.uint8))
    build_dataset(BuildConfig(f"npz:{folder / 'noise.npz'}", str(folder / "shards"), shard_size=400))
    return folder / "shards"


def files_under(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in Path(out).rglob("*")}


def common(model_dir, data, split, out, **overrides):
    return {"model_dir": model_dir, "data": str(data), "split": split, "out": str(out), "workers": 1, **overrides}


# -- the four jobs on Ray -------------------------------------------------------------------------

@pytest.mark.ray
def test_embed_writes_the_models_code_for_every_sample(ray_session, vae_dir, digits_dataset, tmp_path):
    out = tmp_path / "embed"
    config = EmbedConfig.from_dict(common(vae_dir, digits_dataset, "train", out, batch_size=100,
                                          model_uri="models:/digits-vae@champion"))
    result = run_embedding(config)
    assert result["total"] == TRAIN_ROWS and result["blocks_written"] == 5 and not result["skipped"]

    frame = pd.read_parquet(result["parquet"])
    images, labels, indices = split_samples(digits_dataset, "train")
    assert len(frame) == TRAIN_ROWS and frame["index"].tolist() == indices  # every sample once, shard order
    assert frame["label"].tolist() == labels.tolist()
    assert set(frame["model_uri"]) == {"models:/digits-vae@champion"}
    with torch.no_grad():
        expected = vaemodels.load_model(vae_dir).embed(images).numpy()
    assert np.abs(np.stack(frame["latent"]) - expected).max() < 1e-5

    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == [f"parquet/shard-{i:06d}.parquet" for i in range(5)]
    assert [f["rows"] for f in manifest["files"]] == [400, 400, 400, 400, 17]
    assert manifest["counts"] == {str(k): int((labels == k).sum()) for k in range(10)}
    assert (out / "_SUCCESS").is_file() and verify_files(out) == []

    before = mtimes(out)
    again = run_embedding(config)
    assert again == {**result, "skipped": True, "blocks_written": 0} and mtimes(out) == before
    with pytest.raises(OutputExistsError, match=r"differs in: batch_size"):
        run_embedding(EmbedConfig.from_dict({**config.to_dict(), "batch_size": 7}))


@pytest.mark.ray
def test_score_flags_target_fpr_of_normal_data_and_most_noise(ray_session, vae_dir, digits_dataset, noise_dataset,
                                                              tmp_path):
    out = tmp_path / "noise"
    config = ScoreConfig.from_dict(common(vae_dir, noise_dataset, "train", out, reference=str(digits_dataset)))
    noise = run_scoring(config)
    assert noise["total"] == read_manifest(str(noise_dataset)).num_samples("train") == 270
    manifest = json.loads((out / "manifest.json").read_text())
    threshold = manifest["threshold"]
    assert threshold["value"] == noise["threshold"] and manifest["request"]["target_fpr"] == 0.05
    assert threshold["reference_split"] == "val" and threshold["reference_samples"] == VAL_ROWS

    # the job's own block compute on the digits val split: the threshold is the 95% quantile of exactly
    # these scores, so 9 of 180 lie above it
    digits = read_manifest(str(digits_dataset))
    ScoreBlock(vae_dir, False, config.batch_size, shard_urls(digits, "val"), config.seed, noise["threshold"])(
        shard_blocks(digits, "val")[0], BlockWriter(tmp_path / "val"))
    normal, anomalous = pd.read_parquet(tmp_path / "val" / "parquet"), pd.read_parquet(noise["parquet"])
    auroc = detection_metrics(normal["score"], anomalous["score"])["auroc"]
    print(f"flagged: digits val {normal['flagged'].mean():.3f}, noise {noise['flagged_fraction']:.3f}; AUROC {auroc:.3f}")
    assert normal["flagged"].mean() == pytest.approx(0.05, abs=0.01) == threshold["reference_flagged_fraction"]
    assert noise["flagged_fraction"] > 0.9 and manifest["counts"]["flagged"] == anomalous["flagged"].sum()
    assert (anomalous["flagged"] == (anomalous["score"] > noise["threshold"])).all()
    assert set(anomalous["label"]) == {-1} and anomalous["index"].is_unique
    assert auroc > 0.95

    before = mtimes(out)
    assert run_scoring(config)["skipped"] and mtimes(out) == before
    with pytest.raises(OutputExistsError, match=r"differs in: target_fpr"):
        run_scoring(ScoreConfig.from_dict({**config.to_dict(), "target_fpr": 0.1}))


@pytest.mark.ray
def test_denoise_output_is_closer_to_the_clean_images(ray_session, dae_dir, digits_dataset, tmp_path):
    out = tmp_path / "denoise"
    config = DenoiseConfig.from_dict(common(dae_dir, digits_dataset, "val", out, noise="gaussian", noise_level=0.3))
    result = run_denoising(config)
    assert result["total"] == VAL_ROWS

    frame = pd.read_parquet(result["parquet"])
    clean, labels, indices = split_samples(digits_dataset, "val")
    assert frame["index"].tolist() == indices and frame["label"].tolist() == labels.tolist()
    noisy = torch.stack([decode_png(png) for png in frame["noisy"]])
    denoised = torch.stack([decode_png(png) for png in frame["denoised"]])
    ratio = ((denoised - clean) ** 2).mean() / ((noisy - clean) ** 2).mean()
    print(f"denoise MSE ratio (denoised vs noisy, to the clean images): {ratio:.3f}")
    assert ratio < 0.8
    with torch.no_grad():  # the stored noisy image is exactly what the model was given
        again = vaemodels.load_model(dae_dir).reconstruct(noisy[:20])
    assert (again * 255).round().sub(denoised[:20] * 255).abs().max() <= 1

    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == VAL_ROWS and {p.parent.name for p in pngs} == {str(k) for k in range(10)}
    row = frame.iloc[17]
    assert (out / "images" / str(row["label"]) / f"{row['index']:08d}.png").read_bytes() == row["denoised"]
    with Image.open(pngs[0]) as image:
        assert image.size == (8, 8) and image.mode == "L"
    assert verify_files(out) == []

    before = mtimes(out)
    assert run_denoising(config)["skipped"] and mtimes(out) == before


@pytest.mark.ray
def test_interpolate_writes_one_grid_per_pair_and_a_traversal(ray_session, vae_dir, digits_dataset, tmp_path):
    out = tmp_path / "interpolate"
    config = InterpolateConfig.from_dict(common(vae_dir, digits_dataset, "val", out, pairs=3, steps=6, traverse=True))
    result = run_interpolation(config)
    grids = [f"grids/interp-{p:03d}.png" for p in range(3)] + ["grids/traverse.png"]
    assert result["grids"] == [str(out / g) for g in grids]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == sorted(grids + ["grids/pairs.json"])
    assert all(len(f["sha256"]) == 64 for f in manifest["files"]) and verify_files(out) == []
    # 8x8 digits are shown 8x: 6 tiles of 8 + 2 padding, plus the outer padding
    with Image.open(out / grids[0]) as image:
        assert image.size == ((6 * 10 + 2) * 8, 12 * 8)
    with Image.open(out / "grids" / "traverse.png") as image:
        assert image.size == ((6 * 10 + 2) * 8, (LATENT_DIM * 10 + 2) * 8)  # one row per latent dimension

    listing = json.loads((out / "grids" / "pairs.json").read_text())
    _, labels, indices = split_samples(digits_dataset, "val")
    label_of = dict(zip(indices, labels.tolist()))
    for entry in listing["interpolations"]:
        for end in (entry["from"], entry["to"]):
            assert label_of[end["index"]] == end["label"]
        assert entry["from"]["index"] != entry["to"]["index"]
    assert listing["traverse"]["sample"] == listing["interpolations"][0]["from"]

    before = mtimes(out)
    assert run_interpolation(config)["skipped"] and mtimes(out) == before


# -- without Ray: determinism and refusals ---------------------------------------------------------

def test_same_block_same_bytes_other_seed_other_noise(dae_dir, digits_dataset, tmp_path):
    manifest = read_manifest(str(digits_dataset))
    block = shard_blocks(manifest, "val")[0]

    def run(seed, folder):
        DenoiseBlock(dae_dir, False, 64, shard_urls(manifest, "val"), "salt_and_pepper", 0.25, seed)(
            block, BlockWriter(tmp_path / folder))
        return files_under(tmp_path / folder)

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == again and len(first) == VAL_ROWS + 1
    noisy = {seed: pd.read_parquet(io.BytesIO(files["parquet/shard-000000.parquet"]))["noisy"]
             for seed, files in ((0, first), (1, other))}
    assert (noisy[0] != noisy[1]).mean() > 0.9

    # noise "none": the model is given the dataset's own pixels
    DenoiseBlock(dae_dir, False, 64, shard_urls(manifest, "val"), "none", 0.0, 0)(block, BlockWriter(tmp_path / "d"))
    given = pd.read_parquet(tmp_path / "d" / "parquet")["noisy"]
    assert torch.equal(torch.stack([decode_png(png) for png in given]), split_samples(digits_dataset, "val")[0])


@pytest.mark.parametrize("family", sorted(n for n, c in vaemodels.MODELS.items() if "image" in c.data_modalities))
def test_every_family_runs_every_job(family, digits_dataset, tmp_path):
    """The block computes use only the shared model interface (embed, anomaly_score, reconstruct,
    decode), so every family runs every job; the traversal only where there is a prior."""
    params = {"num_classes": 10} if vaemodels.model_class(family).is_conditional else {}
    torch.manual_seed(0)
    model = vaemodels.build(family, (1, 8, 8), backbone="mlp", latent_dim=LATENT_DIM, hidden_dim=16, **params)
    model_dir = str(vaemodels.save_model(model, tmp_path / family))
    manifest = read_manifest(str(digits_dataset))
    block, urls = shard_blocks(manifest, "val")[0], shard_urls(manifest, "val")
    computes = {"embed": EmbedBlock(model_dir, False, 64, urls, "u"),
                "score": ScoreBlock(model_dir, False, 64, urls, 0, 0.0),
                "denoise": DenoiseBlock(model_dir, False, 64, urls, "masking", 0.25, 0)}
    for name, compute in computes.items():
        assert sum(compute(block, BlockWriter(tmp_path / name)).values()) == VAL_ROWS
    assert np.isfinite(pd.read_parquet(tmp_path / "score" / "parquet")["score"]).all()
    assert np.stack(pd.read_parquet(tmp_path / "embed" / "parquet")["latent"]).shape == (VAL_ROWS, LATENT_DIM)
    config = InterpolateConfig.from_dict(common(model_dir, digits_dataset, "val", "o", pairs=2, steps=3,
                                                traverse=model.is_generative))
    counts = InterpolateBlock(model_dir, False, urls)(plan_block(manifest, config), BlockWriter(tmp_path / "grids"))
    assert counts == {"interpolations": 2, **({"traversals": 1} if model.is_generative else {})}


def test_bad_requests_fail_before_anything_is_written(vae_dir, digits_dataset, noise_dataset, tmp_path_factory,
                                                     tmp_path):
    out = tmp_path / "out"

    def save(name, family, shape=(1, 8, 8), **params):
        model = vaemodels.build(family, shape, backbone="mlp", latent_dim=LATENT_DIM, hidden_dim=16, **params)
        return str(vaemodels.save_model(model, tmp_path_factory.mktemp("models") / name))

    with pytest.raises(ManifestError, match=r"split 'test' not in manifest .* \(has: train, val\)"):
        run_embedding(EmbedConfig.from_dict(common(vae_dir, digits_dataset, "test", out)))
    with pytest.raises(ConfigError, match=r"takes images of shape \(1, 16, 16\) but the dataset .* holds \(1, 8, 8\)"):
        run_scoring(ScoreConfig.from_dict(common(save("big", "vae", (1, 16, 16)), digits_dataset, "val", out)))
    with pytest.raises(ConfigError, match="traverse needs a generative model"):
        run_interpolation(InterpolateConfig.from_dict(common(save("ae", "ae"), digits_dataset, "val", out,
                                                             traverse=True)))
    with pytest.raises(ConfigError, match="'cvae' model has 3 classes but the dataset .* has 10"):
        run_denoising(DenoiseConfig.from_dict(common(save("cvae3", "cvae", num_classes=3), digits_dataset, "val",
                                                     out)))
    with pytest.raises(ConfigError, match="'cvae' model is conditional and the dataset .* has no class labels"):
        run_embedding(EmbedConfig.from_dict(common(save("cvae10", "cvae", num_classes=10), noise_dataset, "val",
                                                   out)))
    with pytest.raises(ConfigError, match=r"model_dir .*nowhere.* is not a saved model"):
        run_embedding(EmbedConfig.from_dict(common(str(tmp_path / "nowhere"), digits_dataset, "val", out)))
    with pytest.raises(ManifestError, match="no dataset manifest"):
        run_denoising(DenoiseConfig.from_dict(common(vae_dir, tmp_path / "nodata", "val", out)))
    assert not out.exists()


@pytest.mark.parametrize("config_class, overrides, message", [
    (ScoreConfig, {"target_fpr": 1.5}, "target_fpr must be in (0, 1)"),
    (DenoiseConfig, {"noise": "speckle"}, "noise must be one of gaussian, masking, salt_and_pepper, none"),
    (DenoiseConfig, {"noise": "none", "noise_level": 0.2}, "noise_level has no meaning with noise none"),
    (DenoiseConfig, {"noise": "masking", "noise_level": 1.0}, "must be in [0, 1)"),
    (InterpolateConfig, {"steps": 1}, "steps must be >= 2"),
    (EmbedConfig, {"batch_size": 0}, "batch_size must be >= 1"),
    (EmbedConfig, {"latent": 3}, "unknown config key(s): latent"),
])
def test_bad_config_names_the_problem(config_class, overrides, message):
    with pytest.raises(ConfigError) as info:
        config_class.from_dict(common("m", "d", "val", "o", **overrides))
    assert message in str(info.value)


def test_denoise_level_defaults_to_the_dae_defaults():
    config = lambda noise: DenoiseConfig.from_dict(common("m", "d", "val", "o", noise=noise))  # noqa: E731
    assert config("gaussian").level == vaemodels.DAEConfig().noise_std
    assert config("masking").level == config("salt_and_pepper").level == vaemodels.DAEConfig().corruption_fraction
    assert config("none").level == 0.0
