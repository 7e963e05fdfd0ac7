"""Models, tokenizers and speech tokenizers from the Hugging Face Hub: ``hf://org/name[@rev][/path]``.

``rev`` is a branch, tag or commit (default ``main``); ``path`` a file or folder
inside the repository. Files come through ``huggingface_hub`` into its cache,
so ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_ENDPOINT`` work as everywhere
else, and ``HF_TOKEN`` is read by the client from the environment: slm-lens
never passes, logs or stores it. A reference resolves to a commit sha, which is
what a run records as its revision: a branch that moves is a new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HF_PREFIX = "hf://"


class HubError(OSError):
    """A Hub reference that cannot be resolved or fetched; names the reference."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str
    path: str  # inside the repository; "" for its root

    def at(self, revision: str) -> str:
        tail = f"/{self.path}" if self.path else ""
        return f"{HF_PREFIX}{self.repo_id}@{revision}{tail}"


def is_hub_uri(uri: str | None) -> bool:
    return isinstance(uri, str) and uri.startswith(HF_PREFIX)


def parse_hub_uri(uri: str) -> HubRef:
    parts = uri.removeprefix(HF_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1] or parts[1].startswith("@"):
        raise HubError(f"{uri!r}: a Hub reference is hf://org/name[@revision][/path]")
    name, _, revision = parts[1].partition("@")
    return HubRef(f"{parts[0]}/{name}", revision or "main", "/".join(parts[2:]))


def _ignored(allow_pickle: bool) -> list[str]:
    """Files never fetched: other frameworks' weights, training state, pickles unless allowed."""
    ignore = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "optimizer*", "*.ckpt"]
    if not allow_pickle:
        ignore += ["*.bin", "*.pth"]
    return ignore


def _errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError)


def download(
    uri: str, *, allow_pickle: bool = False, only: tuple[str, ...] | None = None
) -> tuple[str, str]:
    """(local path of the referenced file or folder, the commit sha it resolved to).

    ``only``: file name patterns to fetch from the folder (e.g. config and
    tokenizer files for a driver that never loads the weights).
    """
    from huggingface_hub import snapshot_download

    ref = parse_hub_uri(uri)
    prefix = f"{ref.path}/" if ref.path else ""
    if only:
        allow = [prefix + pattern for pattern in only]
    else:
        allow = [ref.path, f"{ref.path}/*"] if ref.path else None
    try:
        folder = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            allow_patterns=allow,
            ignore_patterns=_ignored(allow_pickle),
        )
    except _errors() as exc:
        raise HubError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}") from exc
    target = Path(folder) / ref.path
    if not target.exists():
        raise HubError(f"{uri}: {ref.repo_id} at {Path(folder).name[:12]} has no {ref.path!r}")
    return str(target), Path(folder).name


def resolve_commit(uri: str) -> str:
    """The commit sha ``uri``'s revision points at now (from the cache when offline).

    Resolved through ``snapshot_download`` with a pattern no file matches: online
    it asks the Hub and records the branch's commit in the cache (so an offline
    run later resolves the same branch), offline it reads that record.
    """
    from huggingface_hub import snapshot_download

    ref = parse_hub_uri(uri)
    try:
        folder = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=["slm-lens-resolves-only"]
        )
    except _errors() as exc:
        raise HubError(f"cannot resolve {uri}: {type(exc).__name__}: {exc}") from exc
    return Path(folder).name


def branch_heads(uri: str) -> dict[str, str]:
    """Branch name -> commit sha of the repository ``uri`` names (for the watcher)."""
    from huggingface_hub import HfApi

    ref = parse_hub_uri(uri)
    try:
        refs = HfApi().list_repo_refs(ref.repo_id)
    except _errors() as exc:
        raise HubError(f"cannot list branches of {uri}: {type(exc).__name__}: {exc}") from exc
    return {b.name: b.target_commit for b in refs.branches}
