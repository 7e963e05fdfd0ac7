"""A light acoustic unit tokenizer trained here: log-mel frames at 25 Hz + k-means.

Stands in for HuBERT + k-means where no pretrained speech encoder exists: 40
log-mel bands per 40 ms frame (640-sample hop at 16 kHz, the SIMS unit rate),
standardised, assigned to the nearest centroid, consecutive repeats removed.
Saved as one ``.npz`` (centroids, mean, std) that loads without pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .units import FRAME_S, UnitSequence, dedup, kmeans

HOP = round(FRAME_S * SAMPLE_RATE)  # 640 samples: the 25 Hz unit frame
N_FFT = 1024
N_MELS = 40


def log_mel(audio: np.ndarray) -> torch.Tensor:
    """[frames, N_MELS] for ``len(audio) // HOP`` frames (frame k covers [k, k+1) x 40 ms)."""
    import torchaudio

    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    n = len(x) // HOP
    if n == 0:
        return torch.zeros(0, N_MELS)
    # Center each window on its frame's middle: pad so window k starts at k*HOP - (N_FFT-HOP)/2.
    pad = (N_FFT - HOP) // 2
    x = torch.nn.functional.pad(x[: n * HOP], (pad, pad + HOP))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, center=False
    )(x)
    return torch.log(mel + 1e-6).T[:n]


class FbankKMeansTokenizer:
    """Batched like the HuBERT tokenizer (a list of 16 kHz clips in, unit sequences out)."""

    def __init__(self, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.device = "cpu"

    @classmethod
    def load(cls, path: str | Path) -> FbankKMeansTokenizer:
        data = np.load(path, allow_pickle=False)
        return cls(data["centroids"], data["mean"], data["std"])

    def save(self, path: str | Path) -> None:
        np.savez(
            path, centroids=self.centroids.numpy(), mean=self.mean.numpy(), std=self.std.numpy()
        )

    @classmethod
    def fit(
        cls, clips: Sequence[np.ndarray], n_units: int, seed: int = 0, iters: int = 30
    ) -> FbankKMeansTokenizer:
        feats = torch.cat([log_mel(c) for c in clips])
        mean, std = feats.mean(0), feats.std(0) + 1e-5
        centers = kmeans((feats - mean) / std, min(n_units, len(feats)), iters=iters, seed=seed)
        return cls(centers.numpy(), mean.numpy(), std.numpy())

    def n_frames(self, n_samples: int) -> int:
        return n_samples // HOP

    def frames(self, audio: np.ndarray) -> list[int]:
        feats = (log_mel(audio) - self.mean) / self.std
        if len(feats) == 0:
            return []
        return torch.cdist(feats, self.centroids).argmin(1).tolist()

    def __call__(self, batch: Sequence[np.ndarray]) -> list[UnitSequence]:
        out = []
        for audio in batch:
            frames = self.frames(audio)
            units, durations = dedup(frames)
            out.append(UnitSequence(units, durations, len(frames)))
        return out
