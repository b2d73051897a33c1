"""Classifier-filtered generation: with --filter-classifier/--filter-confidence every class still gets
exactly its count, every kept sample's classifier probability for its label (recomputed from the
written files) reaches the confidence, the acceptance rate is recorded, the same seed gives the same
bytes, and every bad input is refused with exit 2 before anything is written."""
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vaemodels
from pipelines.batch.job import BlockWriter, verify_files
from pipelines.config import ConfigError
from pipelines.batch.generate import GenerateBlock, GenerateConfig, plan_blocks
from pipelines.evaluation.metrics.classifier import ReferenceClassifier, load_classifier, predict_proba, save_classifier
from pipelines.batch.sample_filter import FilterRejectedError

NUM_CLASSES, CONFIDENCE = 10, 0.7  # the cvae draws from its class prior: most samples pass 0.5
PROVENANCE = {"uri": "u", "name": "n", "version": "v"}


def digits_split(digits_dataset, split):
    from pipelines.data.manifest import read_manifest
    from pipelines.evaluation.data import load_split

    return load_split(read_manifest(str(digits_dataset)), split, 10**6)


@pytest.fixture(scope="module")
def classifier_dir(digits_dataset, tmp_path_factory):
    """A reference classifier fit on real digits for a few hundred steps (~0.95 val accuracy)."""
    from pipelines.evaluation.metrics.classifier import accuracy, fit_classifier

    train, val = digits_split(digits_dataset, "train"), digits_split(digits_dataset, "val")
    classifier, _ = fit_classifier(train.images, train.labels, NUM_CLASSES, steps=200, seed=0)
    folder = tmp_path_factory.mktemp("classifiers") / "reference_classifier"
    return str(save_classifier(classifier, folder, val_accuracy=accuracy(classifier, val.images, val.labels),
                               class_names=[str(k) for k in range(NUM_CLASSES)]))


@pytest.fixture(scope="module")
def cvae_dir(digits_dataset, tmp_path_factory):
    """A small cvae trained 300 Adam steps on digits: its samples are digit-like enough that most,
    not all, pass a 0.5 confidence."""
    train = digits_split(digits_dataset, "train")
    torch.manual_seed(0)
    model = vaemodels.build("cvae", (1, 8, 8), backbone="mlp", latent_dim=4, hidden_dim=64, num_classes=NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        index = torch.randint(0, len(train.images), (64,), generator=generator)
        loss = model.loss({"image": train.images[index], "label": train.labels[index]})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return str(vaemodels.save_model(model.eval(), tmp_path_factory.mktemp("models") / "cvae"))


def untrained(tmp_path_factory, name, family, num_classes=None):
    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = vaemodels.build(family, (1, 8, 8), backbone="mlp", latent_dim=4, hidden_dim=32, **kwargs)
    return str(vaemodels.save_model(model, tmp_path_factory.mktemp("models") / name))


def label_probabilities(classifier_dir, pngs, labels):
    """The filter's decision recomputed from written PNG bytes, with the classifier loaded afresh."""
    from pipelines.data.reader import decode_png

    classifier, _ = load_classifier(classifier_dir)
    images = torch.stack([decode_png(png) for png in pngs])
    return predict_proba(classifier, images).numpy()[np.arange(len(labels)), np.asarray(labels)]


def filtered_block(cvae_dir, classifier_dir, confidence, per_class=20):
    config = GenerateConfig.from_dict({"model_dir": cvae_dir, "out": "x", "per_class": per_class,
                                       "block_size": per_class * NUM_CLASSES})
    compute = GenerateBlock(cvae_dir, False, 64, 1.0, 0, PROVENANCE, None, classifier_dir, confidence)
    return plan_blocks(config, NUM_CLASSES)[0], compute


# -- the block (no Ray) ---------------------------------------------------------------------------

def test_filtered_block_keeps_exact_counts_of_confident_samples(cvae_dir, classifier_dir, tmp_path):
    block, compute = filtered_block(cvae_dir, classifier_dir, CONFIDENCE)
    writer = BlockWriter(tmp_path / "a")
    assert compute(block, writer) == {str(k): 20 for k in range(NUM_CLASSES)}
    drawn, accepted = writer.tallies["drawn"], writer.tallies["accepted"]
    assert set(drawn) == set(accepted) == {str(k) for k in range(NUM_CLASSES)}
    assert all(20 <= accepted[k] <= drawn[k] for k in drawn)
    rate = sum(accepted.values()) / sum(drawn.values())
    assert 0 < rate < 1  # some samples of this half-trained model were rejected, and they were replaced

    frame = pd.read_parquet(tmp_path / "a" / "parquet")
    assert len(frame) == 200 and sorted(frame["sample_index"]) == list(range(200))
    probability = label_probabilities(classifier_dir, frame["image"], frame["label"].astype(int))
    assert probability.min() >= CONFIDENCE
    for png, label, sample_id in zip(frame["image"], frame["label"], frame["id"]):
        assert (tmp_path / "a" / "images" / str(label) / f"{sample_id}.png").read_bytes() == png

    # the unfiltered block draws the same first candidates: the filter only replaced the rejected ones
    plain = GenerateBlock(cvae_dir, False, 64, 1.0, 0, PROVENANCE, None)
    plain(block, BlockWriter(tmp_path / "plain"))
    unfiltered = pd.read_parquet(tmp_path / "plain" / "parquet")
    before = label_probabilities(classifier_dir, unfiltered["image"], unfiltered["label"].astype(int))
    assert before.min() < CONFIDENCE and (before >= CONFIDENCE).mean() < 1

    again = BlockWriter(tmp_path / "b")
    compute(block, again)  # the same block, the same actor: the same draws, decisions and bytes
    assert again.files == writer.files and again.tallies == writer.tallies


def test_higher_confidence_keeps_fewer_draws(cvae_dir, classifier_dir, tmp_path):
    rates = {}
    for confidence in (0.5, CONFIDENCE):
        block, compute = filtered_block(cvae_dir, classifier_dir, confidence, per_class=10)
        writer = BlockWriter(tmp_path / str(confidence))
        assert sum(compute(block, writer).values()) == 100
        rates[confidence] = sum(writer.tallies["accepted"].values()) / sum(writer.tallies["drawn"].values())
    assert 0 < rates[CONFIDENCE] < rates[0.5] <= 1


def test_a_class_that_never_passes_is_given_up_on_by_name(tmp_path_factory, tmp_path):
    """An untrained 2-class classifier gives ~0.5 to everything: nothing reaches 0.99."""
    cvae = untrained(tmp_path_factory, "cvae2", "cvae", num_classes=2)
    torch.manual_seed(0)
    classifier = save_classifier(ReferenceClassifier((1, 8, 8), 2), tmp_path / "clf")
    config = GenerateConfig.from_dict({"model_dir": cvae, "out": "x", "per_class": 5})
    compute = GenerateBlock(cvae, False, 256, 1.0, 0, PROVENANCE, ["round", "square"], str(classifier), 0.99)
    with pytest.raises(FilterRejectedError, match=r"class 'round' \(label 0\): 0 of \d+ draws \(0.000%\) reached "
                                                  r"probability >= 0.99 .*fewer than 1 in 1000; lower "
                                                  r"--filter-confidence"):
        compute(plan_blocks(config, 2)[0], BlockWriter(tmp_path / "out"))


# -- refusals: exit 2, one line, nothing written ---------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"filter_classifier": "c"}, "filter_classifier and filter_confidence go together"),
    ({"filter_confidence": 0.5}, "got only filter_confidence"),
    ({"filter_classifier": "c", "filter_confidence": 1.0}, "filter_confidence must be in (0, 1), got 1.0"),
    ({"filter_classifier": "c", "filter_confidence": 0}, "filter_confidence must be in (0, 1), got 0.0"),
    ({"filter_classifier": "c", "filter_confidence": "high"}, "filter_confidence must be a number"),
])
def test_bad_filter_config_names_the_problem(overrides, message):
    with pytest.raises(ConfigError) as info:
        GenerateConfig.from_dict({"model_dir": "m", "out": "o", "per_class": 3, **overrides})
    assert message in str(info.value)


@pytest.fixture(scope="module")
def bad_classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-classifiers")
    torch.manual_seed(0)
    broken = root / "broken"
    save_classifier(ReferenceClassifier((1, 8, 8), NUM_CLASSES), broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    return {
        "wrong_shape": str(save_classifier(ReferenceClassifier((1, 16, 16), NUM_CLASSES), root / "shape")),
        "wrong_classes": str(save_classifier(ReferenceClassifier((1, 8, 8), 3), root / "classes")),
        "other_names": str(save_classifier(ReferenceClassifier((1, 8, 8), NUM_CLASSES), root / "names",
                                           class_names=list("abcdefghij"))),
        "broken": str(broken),
    }


def run_cli(capsys, *argv):
    from pipelines.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals (a flag's type): usage line + error, status 2
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case, message", [
    ("not_a_classifier", "is not a saved reference classifier: config.json is missing"),
    ("a_model", "holds a saved 'cvae' model, not a reference classifier: give the folder `vaepipe evaluate`"),
    ("missing", "no such folder; give a saved reference classifier"),
    ("broken", "its model.safetensors is damaged"),
    ("wrong_shape", "scores 10 classes of [1, 16, 16] images but the 'cvae' model draws 10 classes of [1, 8, 8]"),
    ("wrong_classes", "scores 3 classes of [1, 8, 8] images but the 'cvae' model draws 10 classes"),
    ("confidence_1", "filter_confidence must be in (0, 1), got 1.0"),
    ("confidence_negative", "filter_confidence must be in (0, 1), got -0.5"),
    ("confidence_nan", "expected a finite number, got 'nan'"),
    ("confidence_alone", "got only filter_confidence"),
    ("unconditional", "filter_classifier needs a conditional model"),
])
def test_bad_filter_input_exits_2_before_anything_is_written(case, message, cvae_dir, classifier_dir,
                                                             bad_classifiers, tmp_path_factory, tmp_path, capsys):
    model, flags = cvae_dir, ["--filter-classifier", classifier_dir, "--filter-confidence", "0.5"]
    count = ["--per-class", "5"]
    if case == "not_a_classifier":
        (tmp_path / "empty").mkdir()
        flags[1] = tmp_path / "empty"
    elif case == "a_model":
        flags[1] = cvae_dir
    elif case == "missing":
        flags[1] = tmp_path / "nowhere"
    elif case in bad_classifiers:
        flags[1] = bad_classifiers[case]
    elif case.startswith("confidence_") and case != "confidence_alone":
        flags[3] = {"confidence_1": "1", "confidence_negative": "-0.5", "confidence_nan": "nan"}[case]
    elif case == "confidence_alone":
        flags = flags[2:]
    elif case == "unconditional":
        model, count = untrained(tmp_path_factory, "vae", "vae"), ["--num-samples", "5"]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "generate", "--model", model, "--out", out, *count, *flags)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in err
    # argparse refuses a flag's type itself, printing its usage before the error; everything else is one line
    assert lines[0].startswith("usage:") if case == "confidence_nan" else len(lines) == 1
    assert stdout == "" and not out.exists()


def test_classifier_of_other_classes_is_refused(tmp_path_factory, bad_classifiers, tmp_path, capsys):
    """A model that knows its class names (its dataset.json) is checked against the classifier's."""
    model = Path(untrained(tmp_path_factory, "named", "cvae", num_classes=NUM_CLASSES))
    (model / "dataset.json").write_text(json.dumps({"class_names": [str(k) for k in range(NUM_CLASSES)]}))
    code, _, err = run_cli(capsys, "generate", "--model", model, "--out", tmp_path / "out", "--per-class", "5",
                           "--filter-classifier", bad_classifiers["other_names"], "--filter-confidence", "0.5")
    assert code == 2 and "trained on classes ['a', 'b'" in err and "but the model on ['0', '1'" in err
    assert not (tmp_path / "out").exists()


def test_job_config_takes_the_filter_keys(cvae_dir, tmp_path):
    from pipelines.workflows import pull_and_generate

    config = {"model_dir": cvae_dir, "out": str(tmp_path / "out"), "per_class": 3,
              "filter_classifier": str(tmp_path / "nowhere"), "filter_confidence": 0.9}
    with pytest.raises(ConfigError, match=r"filter_classifier .*nowhere: no such folder"):
        pull_and_generate(config)
    assert not (tmp_path / "out").exists()


# -- the Ray job ----------------------------------------------------------------------------------

@pytest.mark.ray
def test_filtered_generation_end_to_end(ray_session, cvae_dir, classifier_dir, tmp_path, capsys):
    from pipelines.batch.sample_filter import classifier_sha256

    argv = ["generate", "--model", cvae_dir, "--per-class", "60", "--set", "block_size=250", "--batch-size", "64",
            "--filter-classifier", classifier_dir, "--filter-confidence", str(CONFIDENCE)]
    code, stdout, err = run_cli(capsys, *argv, "--out", tmp_path / "a")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["total"] == 600 and result["per_class"] == {str(k): 60 for k in range(NUM_CLASSES)}
    assert 0 < result["acceptance_rate"] < 1

    out = Path(result["out"])
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["filter"]
    assert recorded["classifier"] == str(Path(classifier_dir).resolve())
    assert recorded["classifier_sha256"] == classifier_sha256(classifier_dir) and recorded["confidence"] == CONFIDENCE
    assert recorded["acceptance_rate"] == result["acceptance_rate"]
    assert recorded["accepted"] / recorded["drawn"] == pytest.approx(recorded["acceptance_rate"], abs=1e-6)
    assert set(recorded["per_class"]) == {str(k) for k in range(NUM_CLASSES)}
    assert all(0 < c["acceptance_rate"] <= 1 and c["accepted"] >= 60 for c in recorded["per_class"].values())
    assert manifest["request"]["filter"] == {"classifier_sha256": recorded["classifier_sha256"],
                                             "confidence": CONFIDENCE}
    assert verify_files(out) == []

    frame = pd.read_parquet(out / "parquet")
    assert len(frame) == 600 and frame["id"].is_unique
    assert frame["label"].astype(int).value_counts().to_dict() == {k: 60 for k in range(NUM_CLASSES)}
    assert label_probabilities(classifier_dir, frame["image"], frame["label"].astype(int)).min() >= CONFIDENCE

    code, stdout, _ = run_cli(capsys, *argv, "--out", tmp_path / "a")  # the same request again: nothing to do
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1]) == {**result, "skipped": True,
                                                                          "blocks_written": 0}
    code, stdout, _ = run_cli(capsys, *argv, "--out", tmp_path / "b")  # same seed elsewhere: same bytes
    assert code == 0

    def files(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.suffix in (".parquet", ".png")}

    assert files(out) == files(tmp_path / "b")

    # another confidence is another request: refused into the same folder, like any other change
    code, _, err = run_cli(capsys, *argv[:-1], "0.9", "--out", tmp_path / "a")
    assert code == 2 and "differs in: filter" in err


@pytest.mark.ray
def test_give_up_in_an_actor_is_one_line_and_no_manifest(ray_session, tmp_path_factory, tmp_path, capsys):
    """A refusal raised inside a Ray actor reaches the user as the filter's own line, exit 2; no
    manifest or _SUCCESS, so nothing reads the folder as a finished dataset."""
    cvae = untrained(tmp_path_factory, "cvae2-ray", "cvae", num_classes=2)
    torch.manual_seed(0)
    classifier = save_classifier(ReferenceClassifier((1, 8, 8), 2), tmp_path / "clf")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "generate", "--model", cvae, "--out", out, "--per-class", "5", "--workers", "1",
                                "--filter-classifier", classifier, "--filter-confidence", "0.99")
    assert code == 2 and stdout == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("vaepipe: error: generate: block 0: filter: class '0' (label 0): 0 of ")
    # no traceback of ours ("Traceback" alone also matches logging's complaint about an earlier test's capsys stream)
    assert "fewer than 1 in 1000" in line and "FilterRejectedError" not in err and "UserCodeException" not in err
    assert not (out / "manifest.json").exists() and not (out / "_SUCCESS").exists()
    assert not list((out / "_blocks").iterdir()) and not (out / "parquet").exists()
