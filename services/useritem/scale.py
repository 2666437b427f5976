"""A rating scale: which ones training can handle, and the unit explicit ratings are trained in.

Training divides ratings by their scale's width over RATING_UNIT_WIDTH (so every scale trains like 0.5 to
5 stars, see training.py), which makes the width itself free. What remains are the limits of float32,
the type of ratings on the wire and of the model's parameters:

- both bounds finite, rating_min < rating_max;
- magnitudes at most MAX_RATING_MAGNITUDE: the parameters, scaled back to the ratings' units, and the
  squared errors training reports stay far from float32's largest number (3.4e38);
- a width of at least MIN_SCALE_WIDTH (those squared errors stay normal float32 numbers) and of at
  least MIN_RELATIVE_WIDTH of the largest bound's magnitude: float32 keeps about 7 significant digits,
  so a scale narrower than that, far from 0, could not tell its ratings apart (10000 to 10000.001 is one
  float32 step).
"""

import math

import numpy as np

RATING_UNIT_WIDTH = 4.5  # the width of the scale training works in (0.5 to 5 stars)
MAX_RATING_MAGNITUDE = 1e9
MIN_SCALE_WIDTH = 1e-6
MIN_RELATIVE_WIDTH = 1e-4


def scale_problem(low: float, high: float) -> str | None:
    """What is wrong with the rating scale [low, high], or None when training can use it."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "both bounds must be finite numbers"
    if not low < high:
        return (
            "rating_min must be below rating_max (the bounds travel as float32: one below 1.2e-38 in "
            "magnitude arrives as 0)"
        )
    largest = max(abs(low), abs(high))
    if largest > MAX_RATING_MAGNITUDE:
        return f"the bounds must lie within ±{MAX_RATING_MAGNITUDE:g}; rescale the ratings"
    if high - low < max(MIN_SCALE_WIDTH, MIN_RELATIVE_WIDTH * largest):
        return (
            f"the scale must be at least {MIN_SCALE_WIDTH:g} wide and at least {MIN_RELATIVE_WIDTH:g} "
            "times its largest bound's magnitude (float32 ratings keep about 7 digits); rescale the "
            "ratings, or subtract an offset"
        )
    return None


def rating_unit(scale: tuple[float, float]) -> float:
    """What ratings of `scale` are divided by for training (exactly 1.0 for a scale RATING_UNIT_WIDTH
    wide, such as 0.5 to 5)."""
    return (scale[1] - scale[0]) / RATING_UNIT_WIDTH


def interaction_weights(ratings: np.ndarray, implicit: bool, scale: tuple[float, float]) -> np.ndarray:
    """EASE's weight of each interaction (float32): 1 for implicit feedback; for a rating, 1 + its height
    above the scale's bottom in units of rating_unit, so every rating counts as an interaction and a
    higher one counts more (1 to 5.5 on 0.5 to 5 stars, the same spread on every scale). Weighting by the
    rating, rather than counting every rating alike, raised held-out recall@10 on MovieLens from 0.287
    to 0.308 (README, Performance: Recommendations)."""
    if implicit:
        return np.ones(len(ratings), dtype=np.float32)
    heights = (np.asarray(ratings, dtype=np.float64) - scale[0]) / rating_unit(scale)
    return (1.0 + np.clip(heights, 0.0, RATING_UNIT_WIDTH)).astype(np.float32)
