"""Run ids and shard plans: deterministic, so the same inputs always mean the same work."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

from extractor.config import RunConfig
from extractor.models.fingerprint import fingerprint_checkpoint
from extractor.models.hub import is_hub_uri, parse_hub_uri, resolve_commit
from extractor.speech.dataset import ManifestSource, RowLocations, index_manifest


@dataclass(frozen=True)
class Plan:
    run_id: str
    revision: str
    dataset: str
    head_revision: str | None  # fingerprint of lens.head's checkpoint, when one is set
    shards: dict[int, RowLocations]  # shard number -> its rows (ids and where they are)
    manifest_errors: list[tuple[str, str, str]]  # (utterance id, error, message)
    config: RunConfig  # with every hf:// reference pinned to a commit
    source: ManifestSource  # the manifest's parts and control pool, for every worker


def pin_hub_revisions(cfg: RunConfig) -> RunConfig:
    """Every ``hf://`` reference of ``cfg`` pinned to the commit its revision names now.

    Workers then load exactly what the run id was computed from, even if a branch
    moves mid-run, and ``runs.config`` records the commits.
    """

    def pin(uri: str | None) -> str | None:
        if not is_hub_uri(uri):
            return uri
        ref = parse_hub_uri(uri)
        if re.fullmatch(r"[0-9a-f]{40}", ref.revision):
            return uri
        return ref.at(resolve_commit(uri))

    return replace(
        cfg,
        model=replace(cfg.model, path=pin(cfg.model.path), tokenizer=pin(cfg.model.tokenizer)),
        lens=replace(cfg.lens, head=pin(cfg.lens.head)),
        speech=replace(
            cfg.speech,
            model=pin(cfg.speech.model),
            centroids=pin(cfg.speech.centroids),
            quantizer=pin(cfg.speech.quantizer),
        ),
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "model"


def make_plan(cfg: RunConfig) -> Plan:
    """Fingerprint the model and dataset, derive the run id, cut the dataset into shards.

    Only the manifest's ids are read here (:mod:`extractor.speech.dataset`): rows are
    read, parsed and validated by the worker that runs their shard.
    """
    cfg = pin_hub_revisions(cfg)
    revision = fingerprint_checkpoint(cfg.model.path)
    index = index_manifest(cfg.dataset.manifest)
    name = cfg.model.name or cfg.model.path.rstrip("/").rsplit("/", 1)[-1].split("@")[0]
    key = f"{index.fingerprint}:{cfg.content_hash()}"
    head_revision = fingerprint_checkpoint(cfg.lens.head) if cfg.lens.head else None
    if head_revision:  # the head's weights change the numbers as the model's do
        key += f":{head_revision}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    run_id = f"{_slug(name)}-{revision[:8]}-{digest}"
    size = cfg.shard_size
    rows = index.rows
    shards = {1 + i // size: rows[i : i + size] for i in range(0, len(rows), size)}
    errors = [(e.utterance_id, type(e).__name__, str(e)) for e in index.errors]
    dataset = cfg.dataset.name or cfg.dataset.manifest
    return Plan(run_id, revision, dataset, head_revision, shards, errors, cfg, index.source)
