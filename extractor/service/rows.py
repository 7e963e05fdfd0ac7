"""From built sequences to lens targets, and from lens results to store rows, without Python loops.

Two pure steps around the lens call, so each can be tested on its own against an
independent computation:

- :func:`pack_targets`: for every selected position, the ids whose ranks the lens
  reports (the current word's variants, the next word's, the control word's, and the
  next token) and the spoken-word group it is pooled into;
- :func:`lens_tables`: the lens result as Arrow ``lens`` and ``word_lens`` rows.

Both work on whole-batch numpy arrays: at a GPU's lens rate, a microsecond of Python
per row would be the whole budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from analysis import schema
from extractor.speech.sequence import BuiltSequence

#: The word targets a lens row carries, in this order, each ``v_max`` wide.
WORD_TARGETS = schema.WORD_TARGETS
MODALITY_CODE = {m: i for i, m in enumerate(schema.MODALITIES)}


@dataclass(frozen=True)
class LensTargets:
    """What the lens is asked about a batch's selected positions (row ``s`` = position ``s``).

    ``words[name]``: [S, v_max] variant ids of that word (-1 padded); ``next_token``:
    [S] the id at the following position (-1 at a sequence's end); ``group_of``: [S]
    the pooled group of the position (-1: not pooled); ``group_keys``: [G, 2]
    (sequence, word index) of each group; ``group_words``: [G, 3 * v_max] its targets;
    ``word_index`` and ``modality``: [S] the position's word (-1: none) and its index
    in ``schema.MODALITIES``.
    """

    batch_index: np.ndarray
    position: np.ndarray
    word_index: np.ndarray
    modality: np.ndarray
    v_max: int
    words: dict[str, np.ndarray]
    next_token: np.ndarray
    group_of: np.ndarray
    group_keys: np.ndarray
    group_words: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.position)

    def row_targets(self) -> np.ndarray:
        """[S, 3 * v_max + 1]: the word targets side by side, then the next token."""
        parts = [self.words[name] for name in WORD_TARGETS] + [self.next_token[:, None]]
        return np.concatenate(parts, axis=1)

    def slice_of(self, name: str) -> slice:
        """Columns of ``name`` (a word target, or ``next_token``) in :meth:`row_targets`."""
        if name == "next_token":
            return slice(3 * self.v_max, 3 * self.v_max + 1)
        i = WORD_TARGETS.index(name)
        return slice(i * self.v_max, (i + 1) * self.v_max)


def _variant_matrix(lists: Sequence[Sequence[int] | None], width: int) -> np.ndarray:
    out = np.full((len(lists), width), -1, dtype=np.int64)
    lengths = np.fromiter((len(v or ()) for v in lists), dtype=np.int64, count=len(lists))
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = [i for v in lists for i in (v or ())]
    out[rows, cols] = np.asarray(flat, dtype=np.int64)
    return out


def pack_targets(
    seqs: Sequence[BuiltSequence], batch_index: np.ndarray, position: np.ndarray
) -> LensTargets:
    """Targets of the selected positions ``(batch_index[s], position[s])`` of ``seqs``.

    A position is pooled when it is a speech position of a spoken word; a word's
    group collects all its pooled positions (groups numbered by first appearance).
    """
    batch_index, position = np.asarray(batch_index), np.asarray(position)
    words = [w for seq in seqs for w in seq.words]
    v_max = max([1] + [len(v or ()) for w in words for v in (w.variant_ids, w.ctrl_variant_ids)])
    per_word = {
        "cur": _variant_matrix([w.variant_ids for w in words], v_max),
        "next": _variant_matrix([w.next_variant_ids for w in words], v_max),
        "ctrl": _variant_matrix([w.ctrl_variant_ids for w in words], v_max),
    }
    spoken_word = np.array([w.modality == "speech" for w in words], dtype=bool)
    # Every sequence's per-position arrays, concatenated; offsets index into them.
    lengths = np.array([len(seq) for seq in seqs], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    word_starts = np.cumsum([len(seq.words) for seq in seqs]) - [len(seq.words) for seq in seqs]
    tokens = np.concatenate([np.asarray(seq.token_ids, dtype=np.int64) for seq in seqs])
    local_word = np.concatenate(
        [np.array([-1 if w is None else w for w in seq.word_index], dtype=np.int64) for seq in seqs]
    )
    modality = np.concatenate(
        [np.array([MODALITY_CODE[m] for m in seq.modality], dtype=np.int32) for seq in seqs]
    )
    at = starts[batch_index] + position
    has_next = position + 1 < lengths[batch_index]
    next_token = np.where(has_next, tokens[np.minimum(at + 1, len(tokens) - 1)], -1)
    word = np.where(local_word[at] >= 0, word_starts[batch_index] + local_word[at], -1)
    in_word = word >= 0
    targets = {}
    for name, matrix in per_word.items():
        rows = np.full((len(at), v_max), -1, dtype=np.int64)
        rows[in_word] = matrix[word[in_word]]
        targets[name] = rows
    pooled = in_word & (modality[at] == MODALITY_CODE["speech"])
    pooled[in_word] &= spoken_word[word[in_word]]
    group_of = np.full(len(at), -1, dtype=np.int64)
    if pooled.any():
        first_rows = np.flatnonzero(pooled)
        unique, first, inverse = np.unique(word[pooled], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # groups numbered by first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        group_of[first_rows] = rank[inverse]
        group_word = unique[order]
        seq_of_word = np.repeat(np.arange(len(seqs)), [len(seq.words) for seq in seqs])
        group_keys = np.stack(
            [seq_of_word[group_word], group_word - word_starts[seq_of_word[group_word]]], axis=1
        )
        group_words = np.concatenate([per_word[n][group_word] for n in WORD_TARGETS], axis=1)
    else:
        group_keys = np.zeros((0, 2), dtype=np.int64)
        group_words = np.zeros((0, 3 * v_max), dtype=np.int64)
    return LensTargets(
        batch_index,
        position,
        local_word[at],
        modality[at],
        v_max,
        targets,
        next_token,
        group_of,
        group_keys,
        group_words,
    )


def pooled_groups(targets: LensTargets, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(group of each lens row, targets of each group) over all layers, layer-major."""
    n_groups = len(targets.group_keys)
    layer = np.repeat(np.arange(n_layers), targets.rows)
    group = np.tile(targets.group_of, n_layers)
    rows = np.where(group >= 0, layer * n_groups + group, -1)
    return rows, np.tile(targets.group_words, (n_layers, 1))


def rank_columns(
    ranks: np.ndarray, text_ranks: np.ndarray, targets: LensTargets, has_text: bool
) -> dict[str, pa.Array]:
    """``{cur,next,ctrl}_word_rank`` and ``..._text_rank``: the best rank over the variants.

    Without a text segment (a Slam-style vocabulary) text ranks are null, not 0.
    """
    cols = {}
    for name in WORD_TARGETS:
        span = targets.slice_of(name)
        cols[schema.rank_column(name)] = _min_rank(ranks[:, span])
        text = text_ranks[:, span] if has_text else np.full_like(ranks[:, span], -1)
        cols[schema.rank_column(name, "text")] = _min_rank(text)
    return cols


def _min_rank(ranks: np.ndarray) -> pa.Array:
    """Best rank over a word's variants (-1 pads ignored); null when it has none."""
    big = np.iinfo(np.int64).max
    masked = np.where(ranks >= 0, ranks, big)
    best = masked.min(axis=1) if ranks.shape[1] else np.full(len(ranks), big)
    missing = best == big
    return pa.array(np.where(missing, 0, best).astype(np.int32), mask=missing)


def _lists(values: np.ndarray, k: int, dtype) -> pa.Array:
    offsets = np.arange(0, len(values) * k + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1).astype(dtype)))


def _repeat_strings(values: Sequence[str], index: np.ndarray, times: int) -> pa.Array:
    """``values[index]`` tiled ``times`` (layers), as a dictionary-decoded string array."""
    codes = pa.array(np.tile(index, times).astype(np.int32))
    return pa.DictionaryArray.from_arrays(codes, pa.array(values, pa.string())).cast(pa.string())


def lens_tables(
    result,
    targets: LensTargets,
    seqs: Sequence[BuiltSequence],
    n_layers: int,
    k: int,
    has_text: bool,
) -> tuple[pa.Table, pa.Table]:
    """The lens result (numpy-convertible tensors, rows layer-major) as store rows."""
    utterance_ids = [seq.utterance_id for seq in seqs]
    word_tiled = np.tile(targets.word_index, n_layers)
    ranks = result.target_ranks.numpy()
    text_ranks = result.target_segment_ranks["text"].numpy()
    next_lp = result.target_logprobs[:, targets.slice_of("next_token").start].numpy()
    lens = pa.table(
        {
            "utterance_id": _repeat_strings(utterance_ids, targets.batch_index, n_layers),
            "position": pa.array(np.tile(targets.position, n_layers).astype(np.int32)),
            "layer": pa.array(np.repeat(np.arange(n_layers), targets.rows).astype(np.int16)),
            "word_index": pa.array(word_tiled.astype(np.int32), mask=word_tiled < 0),
            "modality": _repeat_strings(list(schema.MODALITIES), targets.modality, n_layers),
            "topk_ids": _lists(result.topk_ids.numpy(), k, np.int32),
            "topk_logprobs": _lists(result.topk_logprobs.numpy(), k, np.float32),
            "text_topk_ids": _lists(result.segment_topk_ids["text"].numpy(), k, np.int32),
            "text_topk_logprobs": _lists(
                result.segment_topk_logprobs["text"].numpy(), k, np.float32
            ),
            "logsumexp": pa.array(result.logsumexp.numpy().astype(np.float32)),
            "speech_logmass": pa.array(result.segment_logmass["speech"].numpy().astype(np.float32)),
            "text_logmass": pa.array(result.segment_logmass["text"].numpy().astype(np.float32)),
            **rank_columns(ranks, text_ranks, targets, has_text),
            "next_token_logprob": pa.array(next_lp.astype(np.float32), mask=np.isnan(next_lp)),
        }
    )
    n_groups = len(targets.group_keys)
    if not n_groups:
        return lens, schema.TABLES["word_lens"].empty_table()
    keys = np.tile(targets.group_keys, (n_layers, 1))
    word_lens = pa.table(
        {
            "utterance_id": _repeat_strings(utterance_ids, targets.group_keys[:, 0], n_layers),
            "word_index": pa.array(keys[:, 1].astype(np.int32)),
            "layer": pa.array(np.repeat(np.arange(n_layers), n_groups).astype(np.int16)),
            "pooled_topk_ids": _lists(result.pooled_topk_ids.numpy(), k, np.int32),
            "pooled_text_topk_ids": _lists(
                result.pooled_segment_topk_ids["text"].numpy(), k, np.int32
            ),
            **rank_columns(
                result.pooled_target_ranks.numpy(),
                result.pooled_target_segment_ranks["text"].numpy(),
                targets,
                has_text,
            ),
        }
    )
    return lens, word_lens
