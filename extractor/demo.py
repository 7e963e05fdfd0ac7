"""The embedded default: demo models, a speech tokenizer and data made on this machine.

* Models (``slm-lens demo --model``):
  - ``organism`` (the default): the slm-lens organism, a 6-layer Llama in SIMS layout
    trained here on first use (``ensure_organism``), text first, then interleaved
    speech-text, with its own log-mel k-means units;
  - ``smollm2``: the real SmolLM2-135M with the SIMS vocabulary (``<Un0>``..``<Un499>``,
    ``<speech>``, ``<text>``) added; its unit embeddings are *untrained* (the mean text
    embedding plus noise): a real text LM, not a speech one;
  - ``tiny``: a random LM in SIMS layout, for plumbing and fast tests.
* Speech tokenizer for ``smollm2``/``tiny``: a small random HuBERT with the real 25 Hz
  geometry and random centroids (deterministic seeds): real front-end mechanics,
  meaningless units.
* Data: espeak-ng sentences with exact word timings, and the LibriVox utterances
  of Debian's pocketsphinx-testdata (aligned on the fly with pocketsphinx).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .models.smollm2 import cache_dir, ensure_smollm2

N_UNITS = 500
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SENTENCES = [
    "the cat sat on the mat",
    "a small dog ran to the red house",
    "she gave the old man a cup of tea",
    "paris is the capital of france",
    "the sun rises in the east every morning",
    "we walked along the river after dinner",
]
ORGANISM_NOTE = (
    "The demo model is the slm-lens organism: a 6-layer Llama in SIMS layout trained on this "
    "machine (first use only, 630 steps: ~7 minutes on 2 cores, then cached) on a generated "
    "corpus with espeak-ng speech and log-mel k-means units, text first and then interleaved "
    "speech-text. Held-out spoken sentences go through the real front end, Ray extraction "
    "and the DuckDB store."
)
UNTRAINED_NOTE = (
    "NOTE: the demo model is the real SmolLM2-135M with SIMS speech-unit tokens added, "
    "but its speech-unit embeddings are UNTRAINED and its speech tokenizer is a random "
    "HuBERT: expect no implicit transcription from it. The pipeline, store and analysis "
    "are real; point slm-lens at a trained speech LM (SIMS, Spirit LM) for real findings."
)


def build_demo_model(root: Path | None = None, *, tiny: bool = False) -> Path:
    """A SIMS-layout model folder (safetensors + tokenizer), built once and cached.

    ``tiny=True`` swaps SmolLM2's weights for a 2-layer random Llama over the same
    tokenizer: for fast tests of the plumbing.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .models import load_causal_lm

    root = root or cache_dir() / "models"
    folder = root / ("demo-sims-tiny" if tiny else "demo-sims-smollm2")
    if (folder / "model.safetensors").is_file():
        return folder
    base = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([f"<Un{i}>" for i in range(N_UNITS)] + ["<speech>", "<text>"])
    torch.manual_seed(0)
    if tiny:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
            )
        )
    else:
        model = load_causal_lm(base, dtype=torch.float32)
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            mean, std = emb[:old].mean(0), emb[:old].std(0)
            emb[old:] = mean + 0.5 * std * torch.randn(len(tokenizer) - old, emb.shape[1])
    model = model.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_demo_speech_tokenizer(root: Path | None = None, n_units: int = 200) -> tuple[Path, Path]:
    """(HuBERT folder, centroids .npy): a small random HuBERT (25 Hz geometry) whose
    centroids are k-means over its own features of espeak-ng speech, so units vary with
    the sound the way real units do (they carry no trained phonetic meaning)."""
    import torch
    from transformers import HubertModel

    from .speech.synth import Voice, synthesize
    from .speech.units import PAD_SAMPLES, kmeans, small_hubert_config

    root = root or cache_dir() / "models"
    folder = root / "demo-hubert-25hz-km"
    centroids = folder / "centroids.npy"
    if centroids.is_file():
        return folder, centroids
    torch.manual_seed(0)
    config = small_hubert_config(hidden=64, layers=2, heads=4, conv=32)
    model = HubertModel(config).eval()
    frames = []
    for i, sentence in enumerate(SENTENCES * 2):
        audio, _ = synthesize(sentence.split(), Voice(("en-us", "en-gb")[i % 2], 150 + 10 * i))
        x = torch.nn.functional.pad(torch.from_numpy(audio), (PAD_SAMPLES, PAD_SAMPLES))
        with torch.no_grad():
            frames.append(model(x[None], output_hidden_states=True).hidden_states[2][0])
    feats = torch.cat(frames)
    model.save_pretrained(folder)
    np.save(centroids, kmeans(feats, min(n_units, len(feats) // 2)).numpy().astype(np.float32))
    return folder, centroids


def build_demo_dataset(
    folder: Path, *, sentences: list[str] | None = None, librivox: bool = True
) -> Path:
    """Audio files and a JSONL manifest: espeak-ng sentences (+ LibriVox utterances)."""
    from .speech.synth import Voice, speak_sentences, write_jsonl

    voices = [Voice("en-us", 160, 45), Voice("en-gb", 175, 60)]
    rows = speak_sentences(
        folder,
        [
            (f"espeak-{i:02d}", sentence.split(), voices[i % len(voices)])
            for i, sentence in enumerate(sentences or SENTENCES)
        ],
    )
    if librivox and (LIBRIVOX / "transcription").is_file():
        for line in (LIBRIVOX / "transcription").read_text().splitlines():
            text, _, name = line.rpartition("(")
            name = name.strip(" )")
            text = text.replace("<s>", "").replace("</s>", "").strip()
            rows.append({"id": name, "audio": str(LIBRIVOX / f"{name}.wav"), "text": text})
    return write_jsonl(folder / "manifest.jsonl", rows)


def demo_config(
    store: str,
    data_dir: Path,
    *,
    tiny: bool = False,
    librivox: bool = True,
    sentences: list[str] | None = None,
    workers: int = 1,
) -> dict:
    """The demo run's config mapping (what ``slm-lens demo`` runs)."""
    model = build_demo_model(tiny=tiny)
    hubert, centroids = build_demo_speech_tokenizer()
    manifest = build_demo_dataset(data_dir, sentences=sentences, librivox=librivox)
    return {
        "model": {
            "path": str(model),
            "dtype": "bfloat16",
            "layout": "sims",
            "name": "demo-sims-tiny" if tiny else "demo-sims-smollm2",
        },
        "speech": {
            "kind": "hubert-kmeans",
            "model": str(hubert),
            "centroids": str(centroids),
            "layer": 2,
        },
        "dataset": {"manifest": str(manifest), "name": "demo"},
        "prompt": {"mode": "interleaved", "rule": {"kind": "alternate", "n": 2, "start": "speech"}},
        "lens": {"positions": "spoken_words", "k": 10},
        "store": store,
        "shard_size": 4,
        "batch_tokens": 2048,
        "workers": {"count": workers, "gpus": 0, "cpus": 0.5},
    }


def ensure_organism(steps: int = 630, seed: int = 0, log=print) -> Path:
    """The text-initialised interleaved organism, trained on first use and cached.

    Cached by seed and steps, so a different budget is a different model, never a
    stale one.
    """
    from .organism.train import OrganismSpec, estimated_minutes, train_organism

    spec = OrganismSpec(variant="interleaved", seed=seed, steps=steps)
    folder = cache_dir() / "models" / f"organism-interleaved-s{seed}-{steps}steps"
    if (folder / "organism.json").is_file():
        return folder
    log(
        f"training the demo organism (first use only: {steps} steps, "
        f"~{estimated_minutes(spec):.0f} minutes on 2 cores) ..."
    )
    return train_organism(folder, spec, log=log)


def organism_demo_config(
    store: str, data_dir: Path, n_sentences: int = 60, model: Path | None = None
) -> dict:
    """Held-out spoken sentences through the organism: the demo's run config."""
    from .organism.evaluate import heldout_manifest, organism_config

    model = model or ensure_organism()
    raw = organism_config(
        model, heldout_manifest(data_dir, n_sentences), store, "organism-interleaved"
    )
    raw["shard_size"] = 10
    raw["workers"] = {"count": 1, "gpus": 0, "cpus": 1}
    return raw
