"""User-item worker settings, from USERITEM_* environment variables."""

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.encoder.settings import EncoderSettings
from services.useritem.scale import scale_problem


class UserItemSettings(EncoderSettings):
    """The Encoder settings every worker has (with defaults of its own: ids are cheap to look up, training
    gains nothing from more threads), plus training, serving and storage."""

    model_config = SettingsConfigDict(env_prefix="USERITEM_", extra="ignore")

    port: int = Field(50063, description="gRPC port.")
    metrics_port: int = Field(9163, description="Prometheus /metrics port; 0 disables it.")
    data_dir: str = Field(
        "data/useritem", description="Directory of the trained models (one folder per model and version)."
    )
    default_model: str = Field("mf", description="Model that Fit trains and calls use when none is named.")
    default_kind: Literal["ease", "mf"] = Field(
        "ease",
        description="Kind of model a Fit trains when its FitRequest names none: ease (ranks best: the one to "
        "recommend with) or mf (matrix factorisation: the one to predict ratings with).",
    )
    ease_l2: float = Field(
        250.0,
        gt=0,
        allow_inf_nan=False,
        description="EASE's L2 penalty, times the mean squared interaction weight (so one value suits ratings and "
        "implicit feedback): larger favours popular items, smaller fits rare co-occurrences. Chosen on "
        "MovieLens (README's recommendation section).",
    )
    ease_max_items: int = Field(
        10_000,
        gt=0,
        description="Most distinct items of an EASE Fit: its items x items float32 matrix takes 4 x items^2 "
        "bytes (400 MB at 10,000), once while it is solved and once per serving version (see the Limits "
        "table).",
    )
    keep_versions: int = Field(
        3, ge=1, description="Versions of each model kept on disk (the serving one included)."
    )
    fit_dir: str = Field(
        "data/fit",
        description="Directory Fit may read interaction files from (FitRequest.path is relative to it and "
        "confined to it); empty: Fit takes streamed interactions only.",
    )
    factors: int = Field(32, gt=0, description="Dimension of the user and item vectors.")
    epochs: int = Field(30, gt=0, description="Most passes over the training interactions.")
    batch_size: int = Field(1024, gt=0, description="Interactions per gradient step.")
    learning_rate: float = Field(0.01, gt=0, le=1, description="Adam learning rate.")
    l2: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="L2 penalty: this times the sum of squares of all vectors and biases is added to the sum "
        "of squared errors (a Gaussian prior; larger keeps rarely rated items and users nearer the mean).",
    )
    implicit_l2: float = Field(
        0.3,
        ge=0,
        allow_inf_nan=False,
        description="The L2 penalty of implicit fits, on the same terms as USERITEM_L2 (the BPR loss is on "
        "another scale than squared rating errors).",
    )
    init_std: float = Field(
        0.05, gt=0, allow_inf_nan=False, description="Standard deviation of the initial random vectors."
    )
    seed: int = Field(0, description="Seed of the split, the initial vectors and the batch order.")
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description="Share of interactions held out to measure validation RMSE and recall@10 (and to stop "
        "early); 0: train on everything, no validation figures.",
    )
    patience: int = Field(
        3,
        gt=0,
        description="MF: stop after this many epochs without a better validation figure (RMSE for explicit fits, "
        "NDCG@10 for implicit ones); keep the best epoch.",
    )
    rating_min: float = Field(0.5, description="Lowest valid rating, unless a Fit declares its own scale.")
    rating_max: float = Field(5.0, description="Highest valid rating, unless a Fit declares its own scale.")
    implicit_negatives: int = Field(
        4, gt=0, description="Implicit fits: sampled unseen items ranked against each interaction (BPR loss)."
    )
    fold_in_alpha: float = Field(
        20.0,
        description="Implicit fold-in: weight of an interacted item against an unseen one in the least "
        "squares fit.",
    )
    min_interactions: int = Field(20, ge=1, description="Fewest interactions a Fit accepts.")
    max_interactions: int = Field(
        20_000_000,
        gt=0,
        description="Most interactions one Fit accepts (memory: see the Limits table, with USERITEM_MAX_IDS).",
    )
    max_ids: int = Field(
        500_000,
        gt=0,
        lt=2**31,
        description="Most distinct users plus distinct items in one Fit (each costs memory while it trains: "
        "see the Limits table).",
    )
    fit_idle_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A Fit whose caller sends no message for this long while the Fit reads its stream ends "
        "with ABORTED and changes nothing, so a stalled caller cannot hold the worker's one Fit slot.",
    )
    max_id_bytes: int = Field(512, description="Longest user or item id, in UTF-8 bytes.")
    max_k: int = Field(1000, description="Largest k of Recommend, SimilarItems and FoldIn.")
    max_inputs_per_request: int = Field(
        1024, description="Most inputs in one Encode, or interactions in one FoldIn."
    )
    torch_threads: int = Field(
        1,
        description="torch threads for training; 0: one per core (MovieLens-sized fits gain nothing from more, "
        "and on a busy machine threads that wait for each other made a 1 s Fit take up to 36 s).",
    )

    @model_validator(mode="after")
    def _check_scale(self) -> "UserItemSettings":
        problem = scale_problem(self.rating_min, self.rating_max)
        if problem is not None:
            raise ValueError(
                f"USERITEM_RATING_MIN..USERITEM_RATING_MAX [{self.rating_min:g}, {self.rating_max:g}] is "
                f"not a rating scale training can use: {problem}"
            )
        return self
