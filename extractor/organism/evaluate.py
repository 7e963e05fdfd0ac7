"""Run the real pipeline on an organism: held-out spoken sentences -> extraction -> metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .grammar import Grammar
from .train import HELDOUT_VOICES, layout_spec


def heldout_manifest(folder: Path, n: int, seed: int = 10_000) -> Path:
    """Held-out sentences: a grammar seed no organism trains on, spoken by espeak-ng in
    voices no organism trains on. Each sentence is its words' clips joined with 60 ms of
    silence (``synthesize``), with exact word timings: not continuous speech."""
    from extractor.speech.synth import speak_sentences, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    # Reused only if made by this recipe: an older folder (other voices, another n) is
    # regenerated, never silently evaluated.
    recipe = json.dumps({"n": n, "seed": seed, "voices": [repr(v) for v in HELDOUT_VOICES]})
    stamp = folder / "heldout.json"
    if manifest.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return manifest
    grammar = Grammar(seed=seed)
    sentences = [
        (f"heldout-{i:04d}", grammar.sentence(), HELDOUT_VOICES[i % len(HELDOUT_VOICES)])
        for i in range(n)
    ]
    write_jsonl(manifest, speak_sentences(folder, sentences))
    stamp.write_text(recipe)
    return manifest


def organism_config(model: Path, manifest: Path, store: str, name: str) -> dict:
    info = json.loads((model / "organism.json").read_text())
    return {
        "model": {
            "path": str(model),
            "dtype": "float32",
            "name": name,
            "layout": layout_spec(info["n_units"]),
        },
        "speech": {"kind": "fbank-kmeans", "centroids": str(model / "acoustic.npz")},
        "dataset": {"manifest": str(manifest), "name": "organism-heldout"},
        # Trained with the marker before speech-only sequences, so analysed with it.
        "prompt": {"mode": "speech", "speech_marker": True},
        "lens": {"positions": "spoken_words", "k": 10},
        "store": store,
        "shard_size": 50,
        "batch_tokens": 4096,
        "workers": {"count": 1, "gpus": 0, "cpus": 1},
    }


def evaluate(
    model: Path,
    data_dir: Path,
    store: str,
    name: str,
    n_sentences: int = 200,
    in_process: bool = True,
) -> pd.DataFrame:
    """Recall curves (current/next word, text rank; k 1/3/10; any/pooled) with controls."""
    from analysis import metrics
    from analysis.store import open_store
    from extractor.config import parse_config
    from extractor.service.driver import run_extraction

    manifest = heldout_manifest(data_dir, n_sentences)
    cfg = parse_config(organism_config(model, manifest, store, name))
    summary = run_extraction(cfg, in_process=in_process, progress=False)
    con = open_store(store, runs=[summary.run_id])
    parts = []
    # A 133-word vocabulary saturates recall@10 (frequent words rank high everywhere, and
    # the control is frequency-matched), so stricter k are reported beside it.
    for k in (1, 3, 10):
        for agg in ("any", "pooled"):
            for target in ("cur", "next"):
                df = metrics.recall_by_layer(con, k, agg, target, "text")
                parts.append(df.assign(target=target, k=k, agg=agg))
    mass = metrics.modality_mass(con)[["run_id", "layer", "speech_mass", "top1_speech_frac"]]
    return pd.concat(parts).merge(mass, on=["run_id", "layer"], how="left")
