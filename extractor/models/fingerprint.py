"""Content fingerprints of checkpoints, so a run id changes whenever any weight does.

Hashing a 15 GB checkpoint on every watcher pass (or reading it from S3 twice) would
be wasteful, so fingerprints are memoised in a small JSON file under the slm-lens
cache, keyed by the checkpoint's listing: every file's name, size and modification
time. Rewriting any file changes its mtime, and so the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from analysis.storage import resolve

from .hub import is_hub_uri, resolve_commit

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


def checkpoint_files(uri: str) -> list[pafs.FileInfo]:
    """The fingerprinted files of a checkpoint folder (local path or object-store URI)."""
    fs, root = resolve(uri)
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


def _memo_path() -> Path:
    from .smollm2 import cache_dir

    return cache_dir() / "fingerprints.json"


def _listing_key(uri: str, files: list[pafs.FileInfo]) -> str:
    parts = [uri] + [f"{i.base_name}:{i.size}:{i.mtime_ns}" for i in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _memo_get(key: str) -> str | None:
    try:
        return json.loads(_memo_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def _memo_put(key: str, value: str) -> None:
    path = _memo_path()
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        memo = {}
    memo[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(memo, f)
    os.replace(tmp, path)  # atomic: concurrent writers lose entries, never the file


def fingerprint_checkpoint(uri: str, *, use_memo: bool = True) -> str:
    """sha256 over (name, size, content) of every fingerprinted file, as 16 hex digits.

    Hashes full contents: a weight edited in place without a size change still
    changes the fingerprint. Memoised by listing (see module doc) unless
    ``use_memo=False``. A Hub reference (``hf://``) is fingerprinted by the commit
    its revision points at: the Hub already names content by hash.
    """
    if is_hub_uri(uri):
        return resolve_commit(uri)
    fs, _ = resolve(uri)
    files = checkpoint_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no checkpoint files to fingerprint")
    key = _listing_key(uri, files)
    if use_memo and all(i.mtime_ns is not None for i in files):
        cached = _memo_get(key)
        if cached:
            return cached
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{info.base_name}\0{info.size}\0".encode())
        with fs.open_input_stream(info.path) as stream:
            while chunk := stream.read(_BLOCK):
                digest.update(chunk)
    value = digest.hexdigest()[:16]
    if use_memo and all(i.mtime_ns is not None for i in files):
        _memo_put(key, value)
    return value
