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
    done = 0
    while done < n_boot:
        w = utterance_weights(n_utts, min(CHUNK, n_boot - done), rng).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            for s, (num, den) in enumerate(ratios):
                out[done : done + len(w), s] = (w @ np.asarray(num, float)) / (
                    w @ np.asarray(den, float)
                )
        done += len(w)
    return out


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ``level`` percentile bounds over the first axis (NaN-aware)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(replicates, [alpha, 1 - alpha], axis=0)
    return lo, hi


def peak_layer_interval(
    replicates: np.ndarray, layers: np.ndarray, level: float
) -> tuple[float, float]:
    """Percentile interval of the layer where each replicate's curve [B, L] peaks."""
    filled = np.where(np.isnan(replicates), -np.inf, replicates)
    peaks = layers[np.argmax(filled, axis=1)].astype(float)
    lo, hi = percentile_interval(peaks[:, None], level)
    return float(lo[0]), float(hi[0])
