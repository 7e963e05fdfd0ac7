"""Speech units: HuBERT + k-means (SIMS/Slam), dedup, spans (Spirit LM's quantizer: ``spirit``).

Word spans follow slamkit's rule: with ``end_time[k] = cumsum(durations)[k] *
frame_s`` for deduplicated unit k, a word [start, end] owns the units with
``bisect_left(end_time, start) <= k < bisect_right(end_time, end)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import AlignedWord

FRAME_S = 0.04  # 25 Hz units: 640-sample hop at 16 kHz
PAD_SAMPLES = 40  # zero padding on each side, as the released tokenizer does


def dedup(frames: Sequence[int]) -> tuple[list[int], list[int]]:
    """Remove consecutive repeats; return (units, run lengths in frames)."""
    units: list[int] = []
    durations: list[int] = []
    for f in frames:
        f = int(f)
        if units and units[-1] == f:
            durations[-1] += 1
        else:
            units.append(f)
            durations.append(1)
    return units, durations


def unit_spans(
    words: Sequence[AlignedWord], durations: Sequence[int], frame_s: float = FRAME_S
) -> list[tuple[int, int] | None]:
    """Half-open unit index span [first, stop) of each word, or None when it owns no unit."""
    end_time = list(np.cumsum(np.asarray(durations, dtype=np.int64)) * frame_s)
    spans: list[tuple[int, int] | None] = []
    for w in words:
        first = bisect.bisect_left(end_time, w.start_s)
        stop = bisect.bisect_right(end_time, w.end_s)
        spans.append((first, stop) if stop > first else None)
    return spans


def load_centroids(path: str | Path) -> np.ndarray:
    """A [n_units, dim] float32 centroid array saved by ``slm-lens convert-kmeans`` (.npy)."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2:
        raise ValueError(f"{path}: centroids must be 2-D [n_units, dim], got {arr.shape}")
    return arr.astype(np.float32)


def convert_kmeans(src: str | Path, dst: str | Path, *, allow_pickle: bool = False) -> np.ndarray:
    """Turn a released joblib/sklearn k-means pickle into a plain .npy centroid file.

    Loading the pickle executes code from it, so it happens only with
    ``allow_pickle=True`` (``--allow-pickle``); the output loads without pickle.
    """
    if not allow_pickle:
        raise PermissionError(
            f"{src} is a pickle: loading it runs code from the file. Pass allow_pickle=True "
            "(--allow-pickle) if you trust it; the converted .npy is safe to share"
        )
    import joblib  # optional extra: scikit-learn/joblib

    model = joblib.load(src)
    centers = np.asarray(getattr(model, "cluster_centers_", model), dtype=np.float32)
    if centers.ndim != 2:
        raise ValueError(f"{src}: expected k-means centroids [n, dim], got shape {centers.shape}")
    np.save(dst, centers, allow_pickle=False)
    return centers


def small_hubert_config(hidden: int = 64, layers: int = 2, heads: int = 4, conv: int = 32):
    """A small HuBERT config with the real 25 Hz geometry (total conv stride 640 samples).

    For demos and tests: the conv stack of HuBERT base plus one stride-2 layer, as
    the released 25 Hz tokenizer has, at a fraction of the width.
    """
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        conv_dim=(conv,) * 8,
        conv_stride=(5, 2, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=heads,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )


def check_head(model, layer: int, width: int, what: str, error=ValueError) -> None:
    """A units head (centroids, quantizer) reads ``width``-wide features of an existing layer."""
    if width != model.config.hidden_size:
        raise error(
            f"{what} width {width} does not match HuBERT hidden size {model.config.hidden_size}"
        )
    if layer > model.config.num_hidden_layers:
        raise ValueError(f"layer {layer} > HuBERT's {model.config.num_hidden_layers} layers")


def hubert_frames(model, n_samples: int) -> int:
    """Frames HuBERT's convolutional front end makes from ``n_samples`` (+ the padding)."""
    import torch

    length = torch.tensor([n_samples + 2 * PAD_SAMPLES])
    return int(model._get_feat_extract_output_lengths(length)[0])


def _pad_batch(batch: Sequence[np.ndarray]):
    """Zero-pad each clip by PAD_SAMPLES on both sides and to the longest: (x, mask, lengths)."""
    import torch

    lengths = [len(a) + 2 * PAD_SAMPLES for a in batch]
    x = torch.zeros(len(batch), max(lengths))
    mask = torch.zeros(len(batch), max(lengths), dtype=torch.long)
    for i, audio in enumerate(batch):
        x[i, PAD_SAMPLES : PAD_SAMPLES + len(audio)] = torch.from_numpy(audio)
        mask[i, : lengths[i]] = 1
    return x, mask, lengths


def _to_sequences(model, frames, lengths: list[int]) -> list[UnitSequence]:
    """Keep each clip's own frames (padding dropped), then deduplicate."""
    out = []
    for i, n in enumerate(lengths):
        valid = hubert_frames(model, n - 2 * PAD_SAMPLES)
        units, durations = dedup(frames[i, :valid].tolist())
        out.append(UnitSequence(units, durations, valid))
    return out


def kmeans(x, k: int, iters: int = 25, seed: int = 0):
    """Lloyd's k-means in torch with k-means++-style seeding: [n, d] -> [k, d] centroids.

    For the small unit inventories slm-lens fits itself (demo and organism tokenizers);
    released tokenizers bring their centroids (see :func:`convert_kmeans`).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=gen)]
    while len(centers) < k:
        d2 = torch.cdist(x, centers).min(1).values ** 2
        centers = torch.cat([centers, x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centers[j] = members.mean(0)
    return centers


@dataclass
class UnitSequence:
    """Deduplicated units of one utterance and their frame counts."""

    units: list[int]
    durations: list[int]
    n_frames: int


class HubertKMeansTokenizer:
    """HuBERT features at a configurable layer + nearest k-means centroid.

    ``model`` is a transformers ``HubertModel``; input is zero-padded by
    :data:`PAD_SAMPLES` on both sides; features are ``hidden_states[layer]``.
    HuBERT runs one utterance at a time, so a clip's units never depend on what
    it was batched with: group-norm HuBERT (mHuBERT-25Hz) normalises over the
    whole padded input and takes no attention mask, and even with one, a batched
    GEMM sums in another order. A list of clips is accepted for convenience.
    """

    def __init__(self, model, centroids: np.ndarray, layer: int = 11, device: str = "cpu") -> None:
        import torch

        self.model = model.to(device).eval()
        self.layer = layer
        self.device = device
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32, device=device)
        self.centroid_sq = (self.centroids**2).sum(1)
        check_head(model, layer, self.centroids.shape[1], "centroid")

    @property
    def hop(self) -> int:
        return int(np.prod(self.model.config.conv_stride))

    def n_frames(self, n_samples: int) -> int:
        return hubert_frames(self.model, n_samples)

    def __call__(self, batch: Sequence[np.ndarray]) -> list[UnitSequence]:
        import torch

        out = []
        for audio in batch:
            x, _, lengths = _pad_batch([audio])
            with torch.no_grad():
                hidden = self.model(x.to(self.device), output_hidden_states=True).hidden_states
            feats = hidden[self.layer].float()  # [1, T, D]
            # Nearest centroid by L2: argmin ||f||^2 - 2 f.c + ||c||^2 (||f||^2 is constant).
            scores = feats @ self.centroids.T * -2 + self.centroid_sq
            out += _to_sequences(self.model, scores.argmin(-1).cpu(), lengths)
        return out
