"""Batch generation: a small conditional VAE's request becomes exactly the rows, files and PNGs
asked for; reruns are no-ops, same requests give the same bytes, interrupted runs resume without
duplicates, and bad requests fail before anything is written."""
import datetime
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vaemodels
from pipelines.batch.job import BlockWriter, OutputExistsError, verify_files
from pipelines.config import ConfigError
from pipelines.batch.generate import GenerateBlock, GenerateConfig, plan_blocks, resolve_out, run_generation
from pipelines.batch.generate_config import DEFAULT_PIXEL_TEMPERATURE

PER_CLASS, NUM_CLASSES, BLOCK_SIZE = 200, 10, 250  # 2,000 rows in 8 blocks


def save(tmp_path_factory, name, family, **kwargs):
    torch.manual_seed(0)
    model = vaemodels.build(family, (1, 8, 8), backbone="mlp", latent_dim=4, hidden_dim=32, **kwargs)
    return str(vaemodels.save_model(model, tmp_path_factory.mktemp("models") / name))


@pytest.fixture(scope="module")
def cvae_dir(tmp_path_factory):
    return save(tmp_path_factory, "cvae", "cvae", num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save(tmp_path_factory, "vae", "vae")


def request(model_dir, out, **overrides):
    return GenerateConfig.from_dict({"model_dir": model_dir, "out": str(out), "per_class": PER_CLASS,
                                     "block_size": BLOCK_SIZE, "batch_size": 64, "workers": 2,
                                     "model_uri": "models:/digits@prod", "model_name": "digits",
                                     "model_version": "3", **overrides})


@pytest.fixture(scope="module")
def generated(ray_session, cvae_dir, tmp_path_factory):
    """One finished run that the tests read (and copy), never modify."""
    out = tmp_path_factory.mktemp("generated") / "run"
    return run_generation(request(cvae_dir, out))


def files_under(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


def read_marker(out, index):
    return json.loads((Path(out) / "_blocks" / f"block-{index:06d}.json").read_text())


# -- planning and config (no Ray) -----------------------------------------------------------------

def test_blocks_are_a_pure_function_of_the_request(cvae_dir):
    config = request(cvae_dir, "x")
    blocks = plan_blocks(config, NUM_CLASSES)
    assert blocks == plan_blocks(config, NUM_CLASSES)
    assert [b["count"] for b in blocks] == [BLOCK_SIZE] * 8
    assert Counter(label for b in blocks for label in b["labels"]) == {k: PER_CLASS for k in range(NUM_CLASSES)}
    assert len({b["seed"] for b in blocks}) == 8
    assert all(0 <= b["seed"] < 2**63 for b in blocks)

    uniform = request(cvae_dir, "x", per_class=None, num_samples=1234, block_size=500)
    blocks = plan_blocks(uniform, NUM_CLASSES)
    labels = [label for b in blocks for label in b["labels"]]
    assert [b["count"] for b in blocks] == [500, 500, 234] and [b["start"] for b in blocks] == [0, 500, 1000]
    assert set(labels) == set(range(NUM_CLASSES)) and max(Counter(labels).values()) < 170  # ~123 each
    assert labels != [label for b in plan_blocks(request(cvae_dir, "x", per_class=None, num_samples=1234,
                                                         block_size=500, seed=1), NUM_CLASSES)
                      for label in b["labels"]]
    assert all(b["labels"] is None for b in plan_blocks(uniform, None))


@pytest.mark.parametrize("overrides, message", [
    ({"num_samples": 10}, "exactly one of num_samples and per_class (got both)"),
    ({"per_class": None}, "exactly one of num_samples and per_class (got neither)"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1}, "temperature must be > 0"),
    ({"pixel_temperature": 0.0}, "pixel_temperature must be > 0"),
    ({"pixel_temperature": -0.5}, "pixel_temperature must be > 0"),
    ({"pixel_temperature": float("nan")}, "pixel_temperature must be > 0"),
    ({"block_size": 0}, "block_size must be >= 1"),
    ({"workers": "two"}, "workers must be an integer"),
    ({"samples": 3}, "unknown config key(s): samples"),
    ({"class_names": ["a", "a"]}, "class_names must be unique"),
])
def test_bad_config_names_the_problem(cvae_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        request(cvae_dir, tmp_path / "out", **overrides)
    assert message in str(info.value)


def test_model_dependent_problems_fail_before_anything_is_written(cvae_dir, vae_dir, tmp_path_factory, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="missing required config key: model_dir"):
        GenerateConfig.from_dict({"out": str(out), "num_samples": 5})
    with pytest.raises(ConfigError, match=r"model_dir .*nowhere.* is not a saved model"):
        run_generation(request(str(tmp_path / "nowhere"), out))
    with pytest.raises(ConfigError, match="per_class needs a conditional model; 'vae'"):
        run_generation(request(vae_dir, out))
    with pytest.raises(ConfigError, match="class_names has 3 names but the 'cvae' model has 10 classes"):
        run_generation(request(cvae_dir, out, class_names=["a", "b", "c"]))
    with pytest.raises(ConfigError, match="'ae' model, which is not generative"):
        run_generation(request(save(tmp_path_factory, "ae", "ae"), out, per_class=None, num_samples=5))
    assert not out.exists()


def test_pixel_temperature_sharpens_the_written_pngs_and_is_part_of_the_request(cvae_dir, tmp_path):
    """The default request writes tempered means (pixels pushed away from grey, same side of it),
    records the pixel temperature in the request; a pixel temperature of 1 writes the plain decoder
    mean and leaves the request as it was before the option existed."""
    from pipelines.batch.generate import generation_request
    from pipelines.batch.model import load_saved_model

    labels = torch.full((200,), 3)
    pixels = {}
    for t in (1.0, DEFAULT_PIXEL_TEMPERATURE):
        fn = GenerateBlock(cvae_dir, False, 64, 1.0, 0, {"name": "", "version": "", "uri": ""}, None,
                           pixel_temperature=t)
        pixels[t] = fn.sample(200, labels, torch.Generator().manual_seed(11))[1].astype(int)
    plain, sharp = pixels[1.0], pixels[DEFAULT_PIXEL_TEMPERATURE]
    assert np.all(np.sign(sharp - 128) * np.sign(plain - 128) >= 0)  # each pixel stays on its side of grey
    assert np.abs(sharp - 127.5).mean() > np.abs(plain - 127.5).mean() + 20
    _, model = load_saved_model(cvae_dir)
    assert generation_request(request(cvae_dir, tmp_path), model)["pixel_temperature"] == DEFAULT_PIXEL_TEMPERATURE
    assert "pixel_temperature" not in generation_request(request(cvae_dir, tmp_path, pixel_temperature=1.0), model)


def test_example_config_is_valid():
    from pipelines.config import load_config_file

    config = GenerateConfig.from_dict(load_config_file(Path(__file__).parents[3] / "configs" / "generate.yaml"))
    assert config.num_samples == 20000 and config.out.endswith("{date}")


def test_date_placeholder_becomes_the_date():
    assert resolve_out("gen/{date}/digits", datetime.date(2026, 3, 9)) == Path("gen/2026-03-09/digits")


def test_unconditional_block_writes_unlabelled_partition(vae_dir, tmp_path):
    """The per-block compute runs without Ray too: a VAE's samples land under label=-1."""
    config = request(vae_dir, tmp_path, per_class=None, num_samples=30, block_size=30)
    block = plan_blocks(config, None)[0]
    writer = BlockWriter(tmp_path)
    compute = GenerateBlock(vae_dir, False, 8, 1.0, 0, {"uri": "u", "name": "n", "version": "v"}, None)
    assert compute(block, writer) == {"-1": 30}
    assert len(list((tmp_path / "images" / "unlabelled").glob("*.png"))) == 30
    assert [f["path"] for f in writer.files][-1] == "parquet/label=-1/block-000000.parquet"
    assert not list(tmp_path.rglob("*.tmp"))


# -- the Ray job ----------------------------------------------------------------------------------

@pytest.mark.ray
def test_rows_files_and_pngs_are_exactly_the_request(generated, ray_session):
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from PIL import Image

    out = Path(generated["out"])
    total = PER_CLASS * NUM_CLASSES
    expected = {str(k): PER_CLASS for k in range(NUM_CLASSES)}
    assert generated["total"] == total and generated["per_class"] == expected
    assert not generated["skipped"] and generated["blocks_written"] == 8

    frame = pd.read_parquet(generated["parquet"])
    assert len(frame) == total and frame["id"].is_unique
    assert sorted(frame["sample_index"]) == list(range(total))
    assert Counter(frame["label"].astype(int)) == {k: PER_CLASS for k in range(NUM_CLASSES)}
    assert set(frame["model_uri"]) == {"models:/digits@prod"} and set(frame["model_version"]) == {"3"}
    assert all(len(z) == 4 for z in frame["latent"])

    table = ds.dataset(generated["parquet"], partitioning="hive").to_table()
    assert table.num_rows == total
    counts = {d["values"]: d["counts"] for d in pc.value_counts(table["label"]).to_pylist()}
    assert counts == {k: PER_CLASS for k in range(NUM_CLASSES)}

    rows = ray_session.data.read_parquet(generated["parquet"]).to_pandas()
    assert len(rows) == total and Counter(rows["label"].astype(int)) == {k: PER_CLASS for k in range(NUM_CLASSES)}

    for label in range(NUM_CLASSES):
        pngs = sorted((out / "images" / str(label)).glob("*.png"))
        assert len(pngs) == PER_CLASS
        for path in pngs[:: PER_CLASS // 10]:
            with Image.open(path) as image:
                assert image.size == (8, 8) and image.mode == "L"
    some = frame.iloc[1234]
    assert (out / "images" / str(some["label"]) / f"{some['id']}.png").read_bytes() == some["image"]

    manifest = json.loads(Path(generated["manifest"]).read_text())
    assert (out / "_SUCCESS").is_file() and verify_files(out) == []
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p for p in files_under(out) if p.startswith(("parquet/", "images/"))}
    assert listed == on_disk and len(listed) == total + 8 * 2  # 2,000 PNGs + 2 classes per 250-row block
    assert sum(f["rows"] for f in manifest["files"] if f["path"].endswith(".parquet")) == total
    assert manifest["request"]["model"]["uri"] == "models:/digits@prod" and manifest["counts"] == expected


@pytest.mark.ray
def test_rows_are_the_models_own_samples(generated, cvae_dir):
    """Each row's image is what model.sample() draws from its block seed, and decode(latent) again."""
    from PIL import Image

    model = vaemodels.load_model(cvae_dir)
    frame = pd.read_parquet(generated["parquet"], filters=[("label", "=", 4)]).sort_values("sample_index")
    block = frame[frame["block_seed"] == frame["block_seed"].iloc[0]]  # samples 800..999 of block 3
    labels = torch.full((len(block),), 4)
    generator = torch.Generator().manual_seed(int(block["block_seed"].iloc[0]))
    offset = int(block["sample_index"].iloc[0]) - 3 * BLOCK_SIZE  # rows of the block before label 4
    expected = model.sample(offset + len(block), torch.full((offset + len(block),), 4), generator)[offset:]
    expected = model.temper_pixels(expected, DEFAULT_PIXEL_TEMPERATURE)  # the request's (default) pixel temperature
    stored = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in block["image"]])
    assert np.abs(stored.astype(int) - (expected[:, 0] * 255).round().numpy().astype(int)).max() <= 1
    latents = torch.tensor(np.stack(block["latent"]))
    again = model.temper_pixels(model.decode(latents, labels), DEFAULT_PIXEL_TEMPERATURE)[:, 0].detach()
    assert np.abs(stored.astype(int) - (again * 255).round().numpy().astype(int)).max() <= 1


@pytest.mark.ray
def test_identical_rerun_is_a_noop(generated, cvae_dir):
    out = Path(generated["out"])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_generation(request(cvae_dir, out))
    assert again == {**generated, "skipped": True, "blocks_written": 0}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.ray
def test_same_request_same_bytes_other_seed_other_bytes(generated, cvae_dir, tmp_path):
    copy = run_generation(request(cvae_dir, tmp_path / "copy"))
    assert files_under(copy["out"]) == files_under(generated["out"])

    daily = run_generation(request(cvae_dir, tmp_path / "daily-{date}", seed=1))
    assert daily["out"].endswith(f"daily-{datetime.date.today().isoformat()}")
    assert daily["total"] == PER_CLASS * NUM_CLASSES
    first, other = files_under(generated["out"]), files_under(daily["out"])
    parquet = [p for p in first if p.endswith(".parquet")]
    assert parquet and all(other[p] != first[p] for p in parquet)  # same layout, different samples
    assert not set(p for p in first if p.endswith(".png")) & set(other)  # ids carry the seed


@pytest.mark.ray
def test_interrupted_run_resumes_without_duplicates(generated, cvae_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(generated["out"], out)
    for index in (2, 5):  # blocks that never ran: no marker, no files
        for entry in read_marker(out, index)["files"]:
            (out / entry["path"]).unlink()
        (out / "_blocks" / f"block-{index:06d}.json").unlink()
    # block 6 died mid-write: some PNGs and half a Parquet file, no marker
    partial = out / read_marker(out, 6)["files"][-1]["path"]
    partial.write_bytes(partial.read_bytes()[:100])
    (out / "_blocks" / "block-000006.json").unlink()
    strays = [out / "parquet" / "label=0" / ".block-000000.parquet.tmp", out / "images" / "3" / ".0-00000700.png.tmp"]
    for stray in strays:
        stray.write_bytes(b"partial")
    (out / "_SUCCESS").unlink()
    (out / "manifest.json").unlink()

    resumed = run_generation(request(cvae_dir, out))
    assert resumed["blocks_written"] == 3 and resumed["total"] == PER_CLASS * NUM_CLASSES
    assert not any(stray.exists() for stray in strays)
    frame = pd.read_parquet(resumed["parquet"])
    assert len(frame) == PER_CLASS * NUM_CLASSES and frame["id"].is_unique
    assert files_under(out) == files_under(generated["out"])  # byte for byte what the first run wrote


@pytest.mark.ray
def test_other_request_is_refused_unless_overwrite(generated, cvae_dir, tmp_path):
    out = Path(generated["out"])
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(OutputExistsError, match=r"finished generate run of a different request \(differs in: seed, "
                                                 r"temperature\)"):
        run_generation(request(cvae_dir, out, seed=7, temperature=0.5))
    assert (out / "manifest.json").read_bytes() == manifest

    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "_SUCCESS").unlink()
    with pytest.raises(OutputExistsError, match="unfinished generate run of a different request"):
        run_generation(request(cvae_dir, unfinished, per_class=3))
    (tmp_path / "foreign" / "images").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="holds images but no generate run record"):
        run_generation(request(cvae_dir, tmp_path / "foreign", per_class=3))

    replaced = run_generation(request(cvae_dir, unfinished, per_class=3, overwrite=True))
    assert replaced["total"] == 30 and len(list((unfinished / "images").rglob("*.png"))) == 30
    assert verify_files(unfinished) == []


# -- scheduled runs: a seed per day (issue 18) -----------------------------------------------------

def test_seed_of_a_dated_out_comes_from_the_day_and_the_request(cvae_dir):
    from pipelines.batch.generate import date_seed, resolve_schedule

    dated = request(cvae_dir, "gen/{date}")
    assert dated.seed is None  # no seed given: the default
    first, schedule = resolve_schedule(dated, datetime.date(2026, 3, 9))
    assert first.out == "gen/2026-03-09" and schedule == {"date": "2026-03-09", "seed": first.seed,
                                                          "seed_source": "date"}
    assert first.seed == date_seed(dated, "2026-03-09") and 0 <= first.seed < 2**31
    assert resolve_schedule(dated, datetime.date(2026, 3, 9))[0].seed == first.seed  # a rerun: the same
    assert resolve_schedule(dated, datetime.date(2026, 3, 10))[0].seed != first.seed  # the next day: another
    # the request is part of it: another count or another out template on the same day draws other samples
    assert resolve_schedule(request(cvae_dir, "gen/{date}", per_class=7), datetime.date(2026, 3, 9))[0].seed != first.seed
    assert resolve_schedule(request(cvae_dir, "other/{date}"), datetime.date(2026, 3, 9))[0].seed != first.seed
    # the rule as documented: sha256 of the JSON of the day + identifying fields, 4 bytes, 31 bits
    import hashlib

    identity = {"date": "2026-03-09", "model_uri": "models:/digits@prod", "num_samples": None,
                "per_class": PER_CLASS, "out": "gen/{date}"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()
    assert first.seed == int.from_bytes(digest[:4], "big") & (2**31 - 1)
    # --date pins the day; an explicit seed pins the seed; no {date}: seed 0 as always
    assert resolve_schedule(request(cvae_dir, "gen/{date}", date="2026-03-09"))[0].seed == first.seed
    assert resolve_schedule(request(cvae_dir, "gen/{date}", seed=5), datetime.date(2026, 3, 9))[1] == \
        {"date": "2026-03-09", "seed": 5, "seed_source": "given"}
    assert resolve_schedule(request(cvae_dir, "gen/fixed"))[1] == {"date": None, "seed": 0, "seed_source": "default"}


@pytest.mark.parametrize("overrides, message", [
    ({"date": "2026-13-01"}, "date must be YYYY-MM-DD, got '2026-13-01'"),
    ({"date": "09.03.2026"}, "date must be YYYY-MM-DD"),
    ({"track": "yes"}, "track must be true or false"),
    ({"evaluation": 3}, "evaluation must be a mapping"),
])
def test_bad_schedule_keys_name_the_problem(cvae_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        request(cvae_dir, tmp_path / "{date}", **overrides)
    with pytest.raises(ConfigError, match="date 2026-03-09 is given but out .* has no {date}"):
        request(cvae_dir, tmp_path / "fixed", date="2026-03-09")


@pytest.mark.ray
def test_two_days_make_disjoint_samples_and_a_rerun_of_a_day_makes_none(ray_session, cvae_dir, tmp_path):
    out = str(tmp_path / "daily" / "{date}")
    days = {day: run_generation(request(cvae_dir, out, per_class=20, block_size=100, date=day))
            for day in ("2026-03-09", "2026-03-10")}
    first, second = days["2026-03-09"], days["2026-03-10"]
    assert first["out"].endswith("daily/2026-03-09") and second["out"].endswith("daily/2026-03-10")
    assert first["seed"] != second["seed"] and first["date"] == "2026-03-09"
    ids = {day: set(pd.read_parquet(r["parquet"])["id"]) for day, r in days.items()}
    assert len(ids["2026-03-09"]) == 200 and not ids["2026-03-09"] & ids["2026-03-10"]
    files = {day: files_under(r["out"]) for day, r in days.items()}
    parquet = lambda fs: sorted(v for k, v in fs.items() if k.endswith(".parquet"))  # noqa: E731
    assert not set(parquet(files["2026-03-09"])) & set(parquet(files["2026-03-10"]))  # other bytes
    manifest = json.loads(Path(first["manifest"]).read_text())
    assert manifest["request"]["seed"] == first["seed"]
    assert manifest["schedule"] == {"date": "2026-03-09", "seed": first["seed"], "seed_source": "date"}

    again = run_generation(request(cvae_dir, out, per_class=20, block_size=100, date="2026-03-09"))
    assert again["skipped"] and again["seed"] == first["seed"] and files_under(again["out"]) == files["2026-03-09"]
    # the same day after losing the folder (a fresh volume): the same request, so byte-identical data
    shutil.rmtree(first["out"])
    redone = run_generation(request(cvae_dir, out, per_class=20, block_size=100, date="2026-03-09", workers=1))
    assert not redone["skipped"] and files_under(redone["out"]) == files["2026-03-09"]


def test_a_yaml_date_is_a_day(cvae_dir, tmp_path):
    """YAML (a config file, --set date=2026-03-09) reads an ISO day as a date object: it is the same day."""
    from pipelines.config import apply_overrides

    data = apply_overrides({"model_dir": cvae_dir, "out": str(tmp_path / "{date}"), "per_class": 1}, ["date=2026-03-09"])
    assert GenerateConfig.from_dict(data).date == "2026-03-09"


def test_plots_per_class_is_for_series_models_only(cvae_dir, tmp_path):
    with pytest.raises(ConfigError, match="plots_per_class .* applies to series models"):
        run_generation(request(cvae_dir, tmp_path / "o", plots_per_class=2))
    assert not (tmp_path / "o").exists()
