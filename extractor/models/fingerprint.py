"""Content fingerprints of checkpoints, so a run id changes whenever any weight does."""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs

#: Files that define what a checkpoint computes; everything else (READMEs,
#: optimizer states, logs) may change without changing the run.
FINGERPRINTED_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_SKIP_PREFIXES = ("optimizer", "training_args", "scheduler", "rng_state")
_BLOCK = 8 << 20


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def checkpoint_files(uri: str) -> list[pafs.FileInfo]:
    """The fingerprinted files of a checkpoint folder (local path or object-store URI)."""
    fs, root = _resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(
        (
            info
            for info in infos
            if info.type == pafs.FileType.File
            and info.base_name.endswith(FINGERPRINTED_SUFFIXES)
            and not info.base_name.startswith(_SKIP_PREFIXES)
        ),
        key=lambda info: info.base_name,
    )


def fingerprint_checkpoint(uri: str) -> str:
    """sha256 over (name, size, content) of every fingerprinted file, as 16 hex digits.

    Hashes full contents: a weight edited in place without a size change still
    changes the fingerprint.
    """
    fs, _ = _resolve(uri)
    files = checkpoint_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no checkpoint files to fingerprint")
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{info.base_name}\0{info.size}\0".encode())
        with fs.open_input_stream(info.path) as stream:
            while chunk := stream.read(_BLOCK):
                digest.update(chunk)
    return digest.hexdigest()[:16]
