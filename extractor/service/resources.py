"""Bring remote model folders to local disk and build the configured speech tokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from analysis.storage import resolve, with_retries
from extractor.config import SpeechSection
from extractor.models.fingerprint import fingerprint_checkpoint
from extractor.models.smollm2 import cache_dir


def materialize(uri: str) -> str:
    """A local folder for ``uri``: itself if local, else a fingerprinted cache copy."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    target = cache_dir() / "remote" / fingerprint_checkpoint(uri)
    if (target / ".complete").exists():
        return str(target)
    fs, root = resolve(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        for info in infos:
            if info.type == pafs.FileType.File:
                with_retries(
                    lambda i=info: pafs.copy_files(
                        i.path, os.path.join(tmp, i.base_name), source_filesystem=fs
                    ),
                    f"downloading {info.path}",
                )
        Path(tmp, ".complete").touch()
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
            os.makedirs(tmp)  # TemporaryDirectory cleans up the (now empty) name
    return str(target)


def build_speech_tokenizer(section: SpeechSection, device: str):
    """The configured speech tokenizer, or None for precomputed units / text-only data."""
    if section.kind == "none":
        return None
    from transformers import HubertModel

    from extractor.speech.units import (
        HubertKMeansTokenizer,
        LinearQuantizerTokenizer,
        load_centroids,
    )

    model = HubertModel.from_pretrained(materialize(section.model), use_safetensors=True)
    if section.kind == "hubert-kmeans":
        centroids = load_centroids(materialize(section.centroids))
        return HubertKMeansTokenizer(model, centroids, layer=section.layer, device=device)
    return LinearQuantizerTokenizer.from_file(
        model, materialize(section.quantizer), layer=section.layer, device=device
    )
