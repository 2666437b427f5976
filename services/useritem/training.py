"""Matrix factorisation in PyTorch: minibatch gradient steps (Adam) with L2 regularisation.

Explicit: predicted rating = global mean + user bias + item bias + dot(user, item), squared error.
Implicit: score = dot(user, item) + item bias, BPR loss (each interaction ranked above sampled items).
Both minimise loss + l2 x (sum of squares of every vector and bias), the MAP estimate under a Gaussian
prior, by Adam on minibatches.
A share of the interactions is held out: validation RMSE (explicit: the model is for ratings) or
NDCG@10 (implicit: the model is for ranking) decides when to stop, and the best epoch's parameters are
kept; every epoch reports validation recall@10 and NDCG@10 (ranking.py) besides. Deterministic for a seed (same data, same thread count).

Explicit ratings are trained divided by their unit (scale.rating_unit: the scale's width over 4.5) and
the parameters are scaled back after, so the learning rate, the initial vectors and the L2 penalty
(chosen on MovieLens' 0.5 to 5 stars) mean the same on every scale, and a scale of 0 to 1 or 0 to 1000
trains like one of 0.5 to 5 (whose unit is exactly 1: its numbers are untouched).

A loss, a validation RMSE or a parameter that is not finite ends training with TrainingDiverged:
nothing of such a model is kept.
"""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import Cancelled, FailedPrecondition
from services.useritem.interactions import Dataset
from services.useritem.model import Metrics, TrainedModel
from services.useritem.ranking import RankingFigures, ranking_figures, seen_lists


@dataclass(frozen=True)
class TrainConfig:
    factors: int
    epochs: int
    batch_size: int
    learning_rate: float
    l2: float
    init_std: float
    seed: int
    validation_fraction: float
    patience: int
    implicit_negatives: int


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    validation_rmse: float
    validation_recall_at_10: float
    validation_ndcg_at_10: float = 0.0


class FitCancelled(Cancelled):
    """The Fit's caller went away: training stopped between two steps."""


class TrainingDiverged(FailedPrecondition):
    """Training produced a number that is not finite (a loss, the validation RMSE or a parameter): the
    data are valid, but the worker's training settings cannot train them."""

    def __init__(self, what: str, value: float, epoch: int, learning_rate: float) -> None:
        super().__init__(
            f"training diverged: {what} became {value} in epoch {epoch}; nothing was saved and the serving "
            f"version is unchanged. The training settings cannot train these data: lower "
            f"USERITEM_LEARNING_RATE (now {learning_rate:g}) or USERITEM_INIT_STD, or raise USERITEM_L2"
        )


class _Factorisation(torch.nn.Module):
    def __init__(self, users: int, items: int, factors: int, init_std: float, mean: float) -> None:
        super().__init__()
        self.users = torch.nn.Parameter(torch.randn(users, factors) * init_std)
        self.items = torch.nn.Parameter(torch.randn(items, factors) * init_std)
        self.user_bias = torch.nn.Parameter(torch.zeros(users))
        self.item_bias = torch.nn.Parameter(torch.zeros(items))
        self.mean = mean

    def rating(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.users[users] * self.items[items]).sum(dim=1)
        return self.mean + self.user_bias[users] + self.item_bias[items] + dot

    def ranking(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.users[users] * self.items[items]).sum(dim=-1) + self.item_bias[items]


def split(data: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation row numbers. Validation rows whose user or item would be left with no
    training interaction go back to training (a model cannot be judged on ids it never saw)."""
    rng = np.random.default_rng(seed)
    held = rng.random(len(data)) < fraction
    train = ~held
    for rows in (data.user_rows, data.item_rows):
        known = np.zeros(rows.max() + 1, dtype=bool)
        known[rows[train]] = True
        back = held & ~known[rows]
        # One held-out interaction per unknown id is enough to make it known.
        _, first = np.unique(rows[back], return_index=True)
        train[np.flatnonzero(back)[first]] = True
        held = ~train
    return np.flatnonzero(train).astype(np.int32), np.flatnonzero(held).astype(np.int32)


def train(
    data: Dataset,
    config: TrainConfig,
    implicit: bool,
    report: Callable[[EpochReport], None],
    cancelled: threading.Event,
    unit: float = 1.0,
) -> tuple[dict[str, np.ndarray], Metrics]:
    """Parameters of the best epoch (users, items, user_bias, item_bias as arrays, mean) and metrics, in
    the ratings' own units; explicit ratings are trained divided by `unit` (scale.rating_unit).

    torch's deterministic kernels are on while it trains: the multi-threaded scatter-add of embedding
    gradients otherwise sums in a varying order, and the same data and seed would give a new version."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(data, config, implicit, report, cancelled, unit)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(
    data: Dataset,
    config: TrainConfig,
    implicit: bool,
    report: Callable[[EpochReport], None],
    cancelled: threading.Event,
    unit: float,
) -> tuple[dict[str, np.ndarray], Metrics]:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_rows, valid_rows = split(data, config.validation_fraction, config.seed)
    users = torch.from_numpy(data.user_rows)
    items = torch.from_numpy(data.item_rows)
    scaled = data.ratings if unit == 1.0 else (data.ratings / np.float32(unit)).astype(np.float32)
    ratings = torch.from_numpy(scaled)
    mean = 0.0 if implicit else float(scaled[train_rows].mean())
    model = _Factorisation(len(data.users), len(data.items), config.factors, config.init_std, mean)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    train_index = torch.from_numpy(train_rows)

    best: tuple[float, dict[str, np.ndarray], EpochReport] | None = None
    stale = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, count = 0.0, 0
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        for start in range(0, len(order), config.batch_size):
            if cancelled.is_set():
                raise FitCancelled("the Fit was cancelled")
            batch = order[start : start + config.batch_size]
            u, i = users[batch], items[batch]
            if implicit:
                negatives = torch.randint(
                    len(data.items), (len(batch), config.implicit_negatives), generator=generator
                )
                positive = model.ranking(u, i)[:, None]
                negative = model.ranking(u[:, None], negatives)
                fit = -torch.nn.functional.logsigmoid(positive - negative).mean()
            else:
                fit = ((model.rating(u, i) - ratings[batch]) ** 2).mean()
            # The Gaussian prior of MAP estimation: l2 x every squared parameter against the sum of the
            # errors, so a batch carries its share. Rarely seen users and items are held near zero (an item
            # rated once, 5 stars, does not top every list), often seen ones are free to move.
            prior = sum(parameter.pow(2).sum() for parameter in model.parameters())
            loss = fit + config.l2 * prior / len(train_index)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = fit.item()
            if not math.isfinite(value):
                raise TrainingDiverged("the train loss", value, epoch, config.learning_rate)
            total += value * len(batch)
            count += len(batch)

        model.eval()
        _check_finite(model, epoch, config.learning_rate)
        with torch.no_grad():
            rmse = 0.0
            if not implicit and len(valid_rows):
                v = torch.from_numpy(valid_rows)
                rmse = math.sqrt(float(((model.rating(users[v], items[v]) - ratings[v]) ** 2).mean()))
                if not math.isfinite(rmse):
                    raise TrainingDiverged("the validation RMSE", rmse, epoch, config.learning_rate)
            ranking = _ranking(model, data, train_rows, valid_rows)
        # reported in the ratings' units (x 1.0 leaves a number as it is)
        epoch_report = EpochReport(
            epoch,
            config.epochs,
            total / max(count, 1) * unit**2,
            rmse * unit,
            ranking.recall_at_10,
            ranking.ndcg_at_10,
        )
        report(epoch_report)
        if not len(valid_rows):
            best = (0.0, _snapshot(model), epoch_report)
            continue
        error = -ranking.ndcg_at_10 if implicit else rmse
        if best is None or error < best[0]:
            best, stale = (error, _snapshot(model), epoch_report), 0
        else:
            stale += 1
            if stale >= config.patience:
                break

    assert best is not None
    _, parameters, chosen = best
    if unit != 1.0:  # back to the ratings' units: predictions scale by unit, so do biases, and dots
        for name, factor in (("users", math.sqrt(unit)), ("items", math.sqrt(unit))):
            parameters[name] *= np.float32(factor)
        for name in ("user_bias", "item_bias"):
            parameters[name] *= np.float32(unit)
        mean *= unit
    parameters["mean"] = np.array(mean, dtype=np.float64)
    metrics = Metrics(
        validation_rmse=chosen.validation_rmse,
        validation_recall_at_10=chosen.validation_recall_at_10,
        validation_ndcg_at_10=chosen.validation_ndcg_at_10,
        train_loss=chosen.train_loss,
        epochs=chosen.epoch,
        train_seconds=time.perf_counter() - started,
        interactions=len(data),
    )
    return parameters, metrics


_PARAMETERS = {
    "users": "the user vectors",
    "items": "the item vectors",
    "user_bias": "the user biases",
    "item_bias": "the item biases",
}


def _check_finite(model: _Factorisation, epoch: int, learning_rate: float) -> None:
    with torch.no_grad():
        for name, what in _PARAMETERS.items():
            parameter = getattr(model, name)
            finite = torch.isfinite(parameter)
            if not bool(finite.all()):
                value = float(parameter[~finite][0])
                raise TrainingDiverged(f"a parameter ({what})", value, epoch, learning_rate)


def _snapshot(model: _Factorisation) -> dict[str, np.ndarray]:
    return {
        name: getattr(model, name).detach().numpy().astype(np.float32).copy()
        for name in ("users", "items", "user_bias", "item_bias")
    }


def _ranking(
    model: _Factorisation, data: Dataset, train_rows: np.ndarray, valid_rows: np.ndarray
) -> RankingFigures:
    """Validation recall@10 and NDCG@10 of the ranking by dot + item bias (the order of both kinds of
    score: an explicit prediction adds only the user's constant)."""

    def scores(users: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return (model.users[torch.from_numpy(users)] @ model.items.T + model.item_bias).numpy()

    return ranking_figures(
        scores, data.user_rows, data.item_rows, train_rows, valid_rows, len(data.users), len(data.items)
    )


def build_model(
    name: str,
    data: Dataset,
    parameters: dict[str, np.ndarray],
    metrics: Metrics,
    implicit: bool,
    scale: tuple[float, float],
    l2: float,
    unit: float = 1.0,
) -> TrainedModel:
    offsets, seen_items = seen_lists(data.user_rows, data.item_rows, len(data.users))
    return TrainedModel(
        name=name,
        implicit=implicit,
        rating_min=scale[0],
        rating_max=scale[1],
        global_mean=float(parameters["mean"]),
        users=data.users,
        items=data.items,
        user_vectors=parameters["users"],
        item_vectors=parameters["items"],
        user_bias=parameters["user_bias"],
        item_bias=parameters["item_bias"],
        seen_offsets=offsets,
        seen_items=seen_items,
        metrics=metrics,
        created=time.time(),
        l2=l2,
        rating_unit=unit,
    )
