"""Bring remote model folders to local disk and build the configured speech tokenizer."""

from __future__ import annotations

import hashlib
import os
import shutil

import pyarrow.fs as pafs

from analysis.storage import resolve, with_retries
from extractor.config import SpeechSection
from extractor.models.fingerprint import fingerprint_checkpoint
from extractor.models.hub import download, is_hub_uri
from extractor.models.smollm2 import cache_dir


def materialize(
    uri: str, *, allow_pickle: bool = False, only: tuple[str, ...] | None = None
) -> str:
    """A local path for ``uri``: itself if local, the Hub cache for ``hf://``, else a copy.

    An object-store folder is downloaded into a private ``.partial-PID`` folder and
    renamed into place, so concurrent workers on one node never see (or load) a
    half-copied model. Hub files are fetched by ``huggingface_hub`` (pickled
    weights only with ``allow_pickle``; ``only`` these name patterns, if given).
    """
    if is_hub_uri(uri):
        return download(uri, allow_pickle=allow_pickle, only=only)[0]
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    fs, root = resolve(uri)
    info = with_retries(lambda: fs.get_file_info(root), f"reading {uri}")
    if info.type == pafs.FileType.File:  # one file (centroids, a quantizer): keep its name
        key = hashlib.sha256(f"{uri}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:16]
        infos, target = [info], cache_dir() / "remote" / key
    else:
        infos = [
            i
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=False))
            if i.type == pafs.FileType.File
        ]
        target = cache_dir() / "remote" / fingerprint_checkpoint(uri)
    if not target.is_dir():
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for i in infos:
            with_retries(
                lambda i=i: pafs.copy_files(
                    i.path, str(partial / i.base_name), source_filesystem=fs
                ),
                f"downloading {i.path}",
            )
        try:
            os.rename(partial, target)
        except OSError:  # another worker finished first: use its copy
            shutil.rmtree(partial, ignore_errors=True)
    return str(target / info.base_name) if info.type == pafs.FileType.File else str(target)


def build_speech_tokenizer(section: SpeechSection, device: str):
    """The configured speech tokenizer, or None for precomputed units / text-only data."""
    if section.kind == "none":
        return None
    if section.kind == "fbank-kmeans":
        from extractor.speech.fbank import FbankKMeansTokenizer

        return FbankKMeansTokenizer.load(materialize(section.centroids))
    from transformers import HubertModel

    from extractor.speech.spirit import LinearQuantizerTokenizer, reads_normalized
    from extractor.speech.units import HubertKMeansTokenizer, load_centroids

    folder = materialize(section.model)
    model = HubertModel.from_pretrained(folder, use_safetensors=True)
    if section.kind == "hubert-kmeans":
        centroids = load_centroids(materialize(section.centroids))
        return HubertKMeansTokenizer(model, centroids, layer=section.layer, device=device)
    return LinearQuantizerTokenizer.from_file(
        model,
        materialize(section.quantizer),
        layer=section.layer,
        device=device,
        normalize=reads_normalized(folder),
    )
