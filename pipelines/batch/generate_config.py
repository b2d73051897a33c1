"""What `vaepipe generate` is asked to do: its typed config, validated once. Light on purpose (no
torch, pyarrow or Ray), so the CLI takes its flags' defaults from here."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pipelines.config import config_error, from_dict


# images written are the mean of p(x|z)^(1/T) (vaemodels' `temper_pixels`): 1 = the plain decoder mean, which a
# Bernoulli decoder smears into grey blur; 0.25 sharpens its strokes (mnist5k cvae, 15 epochs: CAS with the
# reference CNN 0.69 at T = 1, 0.91 at 0.5, 0.93 at 0.25; issue 12). Gaussian likelihoods are unchanged by it.
DEFAULT_PIXEL_TEMPERATURE = 0.25

# where the images go besides the Parquet rows (which always hold the PNG bytes): "png" = one file per sample
# under images/<class>/ (what torchvision's ImageFolder reads); "shards" = one WebDataset tar per block under
# images/ (what object stores and streaming readers handle best at millions of samples); "none" = Parquet only
IMAGE_FORMATS = ("png", "shards", "none")

# where z comes from: "model" = the model's own prior (N(0, I), a cvae's per-class Gaussian); "mixture" = a
# Gaussian mixture per class fitted once per job to the posterior means of prior_data's train split
# (vaemodels/mixture_prior.py): codes where real images' codes are (shapes cvae: label agreement 0.67 -> 0.84)
LATENT_PRIORS = ("model", "mixture")


def _is_iso_date(text: str) -> bool:
    import datetime

    try:
        return datetime.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


@dataclass(frozen=True)
class GenerateConfig:
    model_dir: str  # a saved model folder (vaemodels.save_model: config.json + model.safetensors)
    out: str  # output folder; "{date}" becomes today's date (YYYY-MM-DD) for scheduled daily runs
    num_samples: int | None = None  # total samples; a conditional model gets uniform labels (seeded)
    per_class: int | None = None  # samples of every class (conditional models); set exactly one of the two
    model_uri: str = ""  # where the model came from (e.g. models:/NAME@ALIAS), kept in rows; "" = model_dir
    model_name: str = ""  # registered model name (provenance)
    model_version: str = ""  # registered model version (provenance)
    # fixes labels and noise: same request -> byte-identical files. None: derived from the date when out holds
    # {date} (a fresh, reproducible seed per scheduled day: pipelines.batch.generate.date_seed), else 0
    seed: int | None = None
    temperature: float = 1.0  # prior noise scale: z ~ N(0, T^2 I); below 1 trades variety for typicality
    pixel_temperature: float = DEFAULT_PIXEL_TEMPERATURE  # images = mean of p(x|z)^(1/T); 1 = plain decoder mean
    image_format: str = "png"  # images besides the Parquet rows: png (a file per sample) | shards (tar per block) | none
    batch_size: int = 256  # samples decoded at once on a worker
    block_size: int = 1000  # samples per seeded block (the unit of work, resume and files)
    workers: int = 2  # Ray Data actor pool size (one model copy each)
    use_gpu: bool = False  # one GPU per worker
    class_names: tuple[str, ...] | None = None  # image folder names by label; None = the label number
    overwrite: bool = False  # replace another request's data in out (a finished same request is a no-op)
    # keep only samples this saved reference classifier (`vaepipe evaluate`'s OUT/reference_classifier/)
    # gives their label with probability >= filter_confidence; set both or neither (conditional models)
    filter_classifier: str | None = None
    filter_confidence: float | None = None
    date: str | None = None  # the day {date} in out stands for (YYYY-MM-DD); None = today (local date of the run)
    # lineage: with a tracking URI (--tracking-uri, the job config's tracking_uri, MLFLOW_TRACKING_URI) every
    # generation is an MLflow run in this experiment (pipelines/registry/lineage.py); track: false opts out
    experiment: str = "vaepipe-generation"
    track: bool = True
    evaluate_against: str | None = None  # real dataset (manifest or folder): evaluate the written data against it
    # EvaluateConfig keys for that evaluation (e.g. classifier_steps, seeds, augmentation_fractions); checked
    # against EvaluateConfig before anything is written
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)
    plots_per_class: int = 0  # series models: PNG plots of this many windows per class and block (0 = none)
    latent_prior: str = "model"  # model | mixture (needs prior_data): see LATENT_PRIORS
    prior_data: str | None = None  # real dataset (manifest or folder) the mixture is fitted to (its train split)
    prior_components: int = 50  # Gaussians per class in the mixture
    prior_images: int = 20_000  # at most this many train images are encoded for the fit (a seeded uniform sample)

    def __post_init__(self) -> None:
        if (self.num_samples is None) == (self.per_class is None):
            got = "both" if self.num_samples is not None else "neither"
            raise config_error()(f"set exactly one of num_samples and per_class (got {got})")
        checks = [
            (bool(self.model_dir), "model_dir must name a saved model folder"),
            (bool(self.out), "out must name a folder"),
            (self.num_samples is None or self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.per_class is None or self.per_class >= 1, f"per_class must be >= 1, got {self.per_class}"),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.date is None or _is_iso_date(self.date), f"date must be YYYY-MM-DD, got {self.date!r}"),
            (self.date is None or "{date}" in self.out, f"date {self.date} is given but out {self.out!r} has no {{date}}"),
            (bool(self.experiment), "experiment must name an MLflow experiment"),
            (self.evaluate_against is None or bool(self.evaluate_against),
             "evaluate_against must name a dataset manifest or its folder"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0, got {self.temperature}"),
            (math.isfinite(self.pixel_temperature) and self.pixel_temperature > 0,
             f"pixel_temperature must be > 0, got {self.pixel_temperature}"),
            (self.image_format in IMAGE_FORMATS,
             f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            ((self.filter_classifier is None) == (self.filter_confidence is None),
             "filter_classifier and filter_confidence go together (--filter-classifier DIR --filter-confidence P): "
             f"got only {'filter_classifier' if self.filter_classifier is not None else 'filter_confidence'}"),
            (self.filter_classifier is None or bool(self.filter_classifier),
             "filter_classifier must name a saved reference classifier folder"),
            (self.plots_per_class >= 0, f"plots_per_class must be >= 0, got {self.plots_per_class}"),
            (self.latent_prior in LATENT_PRIORS,
             f"latent_prior must be one of {', '.join(LATENT_PRIORS)}, got {self.latent_prior!r}"),
            (self.latent_prior != "mixture" or bool(self.prior_data),
             "latent_prior=mixture needs prior_data (--prior-data DATA: the real dataset to fit the mixture to)"),
            (self.prior_data is None or self.latent_prior == "mixture",
             f"prior_data is only read with latent_prior=mixture (--latent-prior mixture), got latent_prior="
             f"{self.latent_prior!r}"),
            (self.prior_components >= 1, f"prior_components must be >= 1, got {self.prior_components}"),
            (self.prior_images >= 20, f"prior_images must be >= 20, got {self.prior_images}"),
            (self.filter_confidence is None or 0 < self.filter_confidence < 1,
             f"filter_confidence must be in (0, 1), got {self.filter_confidence}"),
        ]
        for ok, message in checks:
            if not ok:
                raise config_error()(message)
        if self.class_names is not None:
            bad = [n for n in self.class_names if not n or n in (".", "..") or "/" in n or "\\" in n]
            if bad or len(set(self.class_names)) != len(self.class_names):
                raise config_error()(f"class_names must be unique, non-empty folder names without '/', got "
                                  f"{list(self.class_names)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerateConfig":
        import datetime

        if isinstance(data.get("date"), datetime.date):  # YAML reads `date: 2026-03-09` (and --set date=...) as a date
            data = {**data, "date": data["date"].isoformat()}
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

