"""Speech tokenizer throughput: batched vs one utterance at a time.

    python bench/speech.py [--seconds 60] [--batch-seconds 30]

A base-size (95M parameter) random HuBERT with the 25 Hz geometry plus 500
k-means centroids tokenises the same set of utterances (2-8 s of noise-like
audio, lengths varied) twice: through SpeechFrontEnd-style length-sorted batches
and one at a time. Prints audio seconds per wall second and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractor.speech.units import HubertKMeansTokenizer


def base_hubert():
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(  # HuBERT base, with one more stride-2 conv: 640-sample hop
        conv_dim=(512,) * 8,
        conv_stride=(5, 2, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2, 2),
    )
    return HubertModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total audio")
    parser.add_argument("--batch-seconds", type=float, default=30.0)
    args = parser.parse_args()
    model = base_hubert()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    centroids = np.random.default_rng(0).normal(size=(500, 768)).astype(np.float32)
    tok = HubertKMeansTokenizer(model, centroids, layer=11)
    rng = np.random.default_rng(1)
    clips, total = [], 0.0
    while total < args.seconds:
        n = int(rng.uniform(2, 8) * 16000)
        clips.append(rng.normal(0, 0.1, n).astype(np.float32))
        total += n / 16000
    tok([clips[0][:16000]])  # warm-up

    start = time.perf_counter()
    for clip in clips:
        tok([clip])
    single = time.perf_counter() - start

    order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
    start = time.perf_counter()
    batch, _batch_len = [], 0
    for i in [*order, None]:
        if i is None or (batch and (len(batch) + 1) * len(clips[i]) > args.batch_seconds * 16000):
            tok([clips[j] for j in batch])
            batch = []
        if i is not None:
            batch.append(i)
    batched = time.perf_counter() - start
    print(
        f"HuBERT {n_params:.0f}M params, {len(clips)} utterances, {total:.0f} s of audio, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"one at a time: {total / single:.1f} audio s per wall s")
    print(f"batched ({args.batch_seconds:.0f} s batches): {total / batched:.1f} audio s per wall s")
    print(f"batching speed-up: {single / batched:.2f}x")


if __name__ == "__main__":
    main()
