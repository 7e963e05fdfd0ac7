"""Bootstrap confidence intervals over utterances: pure numpy, no SQL, no I/O.

Words of one utterance share a speaker, a recording and a context, so they are not
independent draws: the unit resampled is the utterance (a cluster bootstrap). A
replicate draws the run's utterances with replacement and recomputes each ratio
(hits over words) from the drawn utterances' counts; the interval is the percentile
interval of the replicates.

Replicates are seeded per run (``seed`` and the run id), so a run's interval does
not depend on which other runs were in the query.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np

#: Replicates drawn at a time (bounds memory at [chunk x utterances] weights).
CHUNK = 256


def run_rng(seed: int, run_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(run_id.encode())])


def utterance_weights(n_utterances: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_utterances] counts: how often each utterance is drawn per replicate."""
    if n_utterances == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_utterances, np.full(n_utterances, 1.0 / n_utterances), n_boot)


def bootstrap_ratios(
    ratios: list[tuple[np.ndarray, np.ndarray]], n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Replicates [n_boot, S, L] of ``sum_u num[u, l] / sum_u den[u, l]`` for each of the
    S (numerator, denominator) pairs, all [U, L] over the same utterances.

    Every pair is resampled with the same draws (a recall and its control move
    together, as they would in another sample of utterances). A replicate that
    draws no word of a layer gives NaN there.
    """
    n_utts, n_layers = np.shape(ratios[0][1])
    out = np.empty((n_boot, len(ratios), n_layers))
    # A ratio that fewer than two utterances contribute to has no sampling spread to
    # estimate: every replicate that has it at all repeats the one value. NaN, not [x, x].
    thin = [(np.asarray(den) > 0).sum(axis=0) < 2 for _, den in ratios]
    done = 0
    while done < n_boot:
        w = utterance_weights(n_utts, min(CHUNK, n_boot - done), rng).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            for s, (num, den) in enumerate(ratios):
                out[done : done + len(w), s] = (w @ np.asarray(num, float)) / (
                    w @ np.asarray(den, float)
                )
        done += len(w)
    for s, mask in enumerate(thin):
        out[:, s, mask] = np.nan
    return out


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ``level`` percentile bounds over the first axis (NaN-aware)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")
    alpha = (1 - level) / 2
    with warnings.catch_warnings():  # an all-NaN column is a NaN bound, said by the NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(replicates, [alpha, 1 - alpha], axis=0)
    return lo, hi


def peak_layer_interval(
    replicates: np.ndarray, layers: np.ndarray, level: float
) -> tuple[float, float]:
    """Percentile interval of the layer where each replicate's curve [B, L] peaks."""
    filled = np.where(np.isnan(replicates), -np.inf, replicates)
    peaks = layers[np.argmax(filled, axis=1)].astype(float)
    alpha = (1 - level) / 2
    # Inverted-CDF quantiles: a bound is a layer some replicate peaked at, never 3.1.
    lo, hi = np.quantile(peaks, [alpha, 1 - alpha], method="inverted_cdf")
    return float(lo), float(hi)


# Correlations across checkpoints ----------------------------------------------------------
def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN with fewer than two points or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (what Spearman's rho correlates)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y)) if len(x) else float("nan")


#: Up to this many points, the permutation test enumerates every permutation (8! = 40,320).
EXACT_PERMUTATIONS = 8


def permutation_p(
    x: np.ndarray, y: np.ndarray, statistic, rng: np.random.Generator, n_perm: int = 9999
) -> float:
    """Two-sided p-value of ``statistic(x, y)`` against ``y`` shuffled.

    Exact (every permutation) for up to :data:`EXACT_PERMUTATIONS` points, else
    ``(1 + #{|r*| >= |r|}) / (1 + n_perm)`` over seeded random permutations. No
    normality assumed: a handful of checkpoints is the usual case here.
    """
    import itertools

    x, y = np.asarray(x, float), np.asarray(y, float)
    observed = statistic(x, y)
    if np.isnan(observed):
        return float("nan")
    tolerance = 1e-12  # permutations that tie the observed r count as extreme
    if len(x) <= EXACT_PERMUTATIONS:
        values = [statistic(x, y[list(p)]) for p in itertools.permutations(range(len(y)))]
        return float(np.mean(np.abs(values) >= abs(observed) - tolerance))
    values = np.array([statistic(x, rng.permutation(y)) for _ in range(n_perm)])
    return float((1 + np.sum(np.abs(values) >= abs(observed) - tolerance)) / (1 + n_perm))


def bootstrap_correlation(
    x: np.ndarray, y: np.ndarray, statistic, rng: np.random.Generator, n_boot: int, level: float
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over points resampled in pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return float("nan"), float("nan")
    draws = rng.integers(len(x), size=(n_boot, len(x)))
    values = np.array([statistic(x[d], y[d]) for d in draws])
    if np.all(np.isnan(values)):
        return float("nan"), float("nan")
    lo, hi = percentile_interval(values[:, None], level)
    return float(lo[0]), float(hi[0])
