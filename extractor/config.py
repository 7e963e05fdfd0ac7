"""Run configuration: YAML in, a validated, immutable RunConfig out.

Errors name the field (``lens.k: must be a positive integer, got 0``) so a
typo in a cluster job fails before any GPU is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

LENS_ENGINES = ("auto", "torch", "triton")
#: Which positions are lensed: every position; every position of a word (its unit tokens
#: when spoken, its text tokens when written); or each word's last position. Continuations
#: of spoken-knowledge pairs are always lensed, so their likelihood can be scored.
POSITIONS = ("all", "spoken_words", "word_final")
MODES = ("speech", "text", "interleaved")
DTYPES = ("bfloat16", "float16", "float32")
SPEECH_KINDS = ("hubert-kmeans", "spirit-linear", "fbank-kmeans", "none")


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the field."""


@dataclass(frozen=True)
class ModelSection:
    path: str
    dtype: str = "bfloat16"
    layout: Any = "sims"
    tokenizer: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    name: str | None = None


@dataclass(frozen=True)
class SpeechSection:
    kind: str = "none"
    model: str | None = None
    centroids: str | None = None
    quantizer: str | None = None
    layer: int = 11


@dataclass(frozen=True)
class DatasetSection:
    manifest: str
    name: str | None = None


@dataclass(frozen=True)
class PromptSection:
    mode: str = "speech"
    rule: dict = field(default_factory=lambda: {"kind": "alternate", "n": 3})
    control_seed: int = 0
    #: Whether a speech-only prompt opens with the speech marker. Unset, it follows the
    #: layout's family (resolved when the config is parsed, so runs.config records it).
    speech_marker: bool | None = None


@dataclass(frozen=True)
class LensSection:
    positions: str = "spoken_words"
    k: int = 10
    #: auto (Triton on CUDA, torch elsewhere: extractor.lens.auto_engine), torch, or
    #: triton (CUDA; exact too); whichever is asked is self-checked against float64 on
    #: each actor's device at its first lens call, before anything is stored, falling
    #: back to torch on any disagreement.
    engine: str = "auto"
    #: Another checkpoint whose final norm and unembedding decode the hidden states
    #: (the text LM a speech-only model started from); ranks are then over its vocabulary.
    head: str | None = None


@dataclass(frozen=True)
class WorkersSection:
    count: int = 1
    gpus: float = 0.0
    cpus: float = 0.5
    max_retries: int = 3
    in_flight_per_worker: int = 2


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    dataset: DatasetSection
    store: str | None = None
    speech: SpeechSection = field(default_factory=SpeechSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    lens: LensSection = field(default_factory=LensSection)
    workers: WorkersSection = field(default_factory=WorkersSection)
    shard_size: int = 32
    batch_tokens: int = 4096
    target_file_mb: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    def with_store(self, store: str | None) -> RunConfig:
        """This config writing to ``store`` (a local path made absolute: actors have other cwds)."""
        from dataclasses import replace

        store = store or self.store
        if store and "://" not in store:
            store = os.path.abspath(store)
        return replace(self, store=store)

    def content_hash(self) -> str:
        """Hash of everything that changes the results (not the store or worker counts)."""
        d = self.to_dict()
        for volatile in ("store", "workers", "target_file_mb"):
            d.pop(volatile, None)
        d["lens"].pop("engine", None)  # every engine gives the same exact numbers
        if d["lens"].get("head") is None:
            d["lens"].pop("head", None)  # runs from before lens.head keep their ids
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


_SECTIONS = {
    "model": ModelSection,
    "speech": SpeechSection,
    "dataset": DatasetSection,
    "prompt": PromptSection,
    "lens": LensSection,
    "workers": WorkersSection,
}


def _build(section: str, cls, raw: Any):
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: must be a mapping, got {type(raw).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})"
        )
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def _expect(cond: bool, where: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {why}")


def _is(value: Any, kind: str) -> bool:
    """YAML-typed checks: a bool is not an int, an int is a fine float."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str) and bool(value)
    raise AssertionError(kind)


#: (field, type, optional) of every typed field; ranges are checked in _validate.
_TYPES = {
    "model": [
        ("path", "str", False),
        ("dtype", "str", False),
        ("tokenizer", "str", True),
        ("allow_pickle", "bool", False),
        ("trust_remote_code", "bool", False),
        ("name", "str", True),
    ],
    "speech": [
        ("kind", "str", False),
        ("model", "str", True),
        ("centroids", "str", True),
        ("quantizer", "str", True),
        ("layer", "int", False),
    ],
    "dataset": [("manifest", "str", False), ("name", "str", True)],
    "prompt": [
        ("mode", "str", False),
        ("control_seed", "int", False),
        ("speech_marker", "bool", True),
    ],
    "lens": [
        ("positions", "str", False),
        ("k", "int", False),
        ("engine", "str", False),
        ("head", "str", True),
    ],
    "workers": [
        ("count", "int", False),
        ("gpus", "float", False),
        ("cpus", "float", False),
        ("max_retries", "int", False),
        ("in_flight_per_worker", "int", False),
    ],
    "": [
        ("store", "str", True),
        ("shard_size", "int", False),
        ("batch_tokens", "int", False),
        ("target_file_mb", "int", False),
    ],
}
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a non-empty string",
}

#: The modality rule's fields, by kind (typed like the sections).
RULE_FIELDS = {
    "alternate": {"n": "int", "start": "str"},
    "poisson": {"mean_span": "float", "seed": "int", "start": "str"},
    "flags": {"flags": "list"},
}


def _check_types(cfg: RunConfig) -> None:
    for section, fields in _TYPES.items():
        obj = getattr(cfg, section) if section else cfg
        for name, kind, optional in fields:
            value = getattr(obj, name)
            where = f"{section}.{name}" if section else name
            if value is None and optional:
                continue
            _expect(_is(value, kind), where, f"must be {_TYPE_WORDS[kind]}, got {value!r}")


def _check_rule(rule: Any) -> None:
    _expect(isinstance(rule, dict), "prompt.rule", "must be a mapping")
    kind = rule.get("kind", "alternate")
    _expect(kind in RULE_FIELDS, "prompt.rule.kind", f"must be one of {sorted(RULE_FIELDS)}")
    fields = RULE_FIELDS[kind]
    for name, value in rule.items():
        if name == "kind":
            continue
        where = f"prompt.rule.{name}"
        _expect(name in fields, where, f"unknown field for kind {kind} (known: {sorted(fields)})")
        if fields[name] == "list":
            _expect(
                isinstance(value, list) and all(isinstance(f, bool) for f in value),
                where,
                "must be a list of true (spoken) / false (written), one per word",
            )
        else:
            _expect(_is(value, fields[name]), where, f"must be {_TYPE_WORDS[fields[name]]}")
    _expect(_is(rule.get("n", 1), "int") and rule.get("n", 1) >= 1, "prompt.rule.n", "must be >= 1")
    _expect(rule.get("mean_span", 1.0) > 0, "prompt.rule.mean_span", "must be > 0")
    _expect(
        rule.get("start", "text") in ("text", "speech"),
        "prompt.rule.start",
        "must be text or speech",
    )
    if kind == "flags":
        _expect("flags" in rule, "prompt.rule.flags", "is required for kind flags")


def _check_layout(layout: Any) -> None:
    _expect(
        isinstance(layout, str | dict),
        "model.layout",
        f"must be a layout name or a mapping, got {layout!r}",
    )
    from extractor.speech.layouts import LayoutError, layout_from_config

    try:
        layout_from_config(layout)
    except (LayoutError, TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.layout: {exc}") from exc


def parse_config(raw: dict, base_dir: str | Path | None = None) -> RunConfig:
    """Validate a config mapping; relative local paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError("config: must be a mapping at the top level")
    top_known = set(RunConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - top_known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(top_known))})")
    for required in ("model", "dataset"):
        _expect(required in raw, required, "is required")
    sections = {
        name: _build(name, cls, raw[name]) for name, cls in _SECTIONS.items() if name in raw
    }
    scalars = {
        k: raw[k] for k in ("store", "shard_size", "batch_tokens", "target_file_mb") if k in raw
    }
    cfg = RunConfig(**sections, **scalars)
    _check_types(cfg)  # before paths are resolved: a path must be a string first

    def resolve(path: str | None) -> str | None:
        if path is None or "://" in path or base_dir is None or Path(path).is_absolute():
            return path
        return str((Path(base_dir) / path).resolve())

    from dataclasses import replace

    cfg = replace(
        cfg,
        model=replace(
            cfg.model, path=resolve(cfg.model.path), tokenizer=resolve(cfg.model.tokenizer)
        ),
        dataset=replace(cfg.dataset, manifest=resolve(cfg.dataset.manifest)),
        speech=replace(
            cfg.speech,
            model=resolve(cfg.speech.model),
            centroids=resolve(cfg.speech.centroids),
            quantizer=resolve(cfg.speech.quantizer),
        ),
        store=resolve(cfg.store) if cfg.store and "://" not in cfg.store else cfg.store,
    )
    _validate(cfg)
    if cfg.prompt.speech_marker is None:
        marker = family_speech_marker(cfg.model.layout)
        cfg = replace(cfg, prompt=replace(cfg.prompt, speech_marker=marker))
    return cfg


def family_speech_marker(layout: str | dict) -> bool:
    """Whether each family's own code opens a speech-only prompt with its speech marker.

    slamkit (SIMS, Slam) writes speech-only input as bare units; Spirit LM's code
    writes ``[Speech]`` first. A custom layout opens with its marker if it has one.
    """
    if isinstance(layout, dict):
        return bool(layout.get("speech_marker"))
    return layout == "spirit-lm"


def _validate(cfg: RunConfig) -> None:
    _check_rule(cfg.prompt.rule)
    _check_layout(cfg.model.layout)
    _expect(isinstance(cfg.model.path, str) and cfg.model.path, "model.path", "is required")
    _expect(cfg.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
    _expect(
        isinstance(cfg.dataset.manifest, str) and cfg.dataset.manifest,
        "dataset.manifest",
        "is required",
    )
    _expect(cfg.speech.kind in SPEECH_KINDS, "speech.kind", f"must be one of {SPEECH_KINDS}")
    if cfg.speech.kind == "hubert-kmeans":
        _expect(bool(cfg.speech.model), "speech.model", "is required for hubert-kmeans")
        _expect(bool(cfg.speech.centroids), "speech.centroids", "is required for hubert-kmeans")
    if cfg.speech.kind == "fbank-kmeans":
        _expect(
            bool(cfg.speech.centroids),
            "speech.centroids",
            "is required for fbank-kmeans (the organism's acoustic.npz)",
        )
    if cfg.speech.kind == "spirit-linear":
        _expect(bool(cfg.speech.model), "speech.model", "is required for spirit-linear")
        _expect(bool(cfg.speech.quantizer), "speech.quantizer", "is required for spirit-linear")
    _expect(
        isinstance(cfg.speech.layer, int) and cfg.speech.layer >= 0,
        "speech.layer",
        "must be a non-negative integer",
    )
    _expect(cfg.prompt.mode in MODES, "prompt.mode", f"must be one of {MODES}")
    _expect(cfg.lens.positions in POSITIONS, "lens.positions", f"must be one of {POSITIONS}")
    _expect(cfg.lens.engine in LENS_ENGINES, "lens.engine", f"must be one of {LENS_ENGINES}")
    _expect(
        isinstance(cfg.lens.k, int) and cfg.lens.k >= 1,
        "lens.k",
        f"must be a positive integer, got {cfg.lens.k!r}",
    )
    _expect(
        isinstance(cfg.shard_size, int) and cfg.shard_size >= 1,
        "shard_size",
        "must be a positive integer",
    )
    _expect(
        isinstance(cfg.batch_tokens, int) and cfg.batch_tokens >= 16,
        "batch_tokens",
        "must be an integer >= 16",
    )
    _expect(
        isinstance(cfg.workers.count, int) and cfg.workers.count >= 1,
        "workers.count",
        "must be a positive integer",
    )
    _expect(cfg.workers.gpus >= 0, "workers.gpus", "must be >= 0")
    _expect(cfg.workers.cpus > 0, "workers.cpus", "must be > 0")
    _expect(cfg.workers.max_retries >= 0, "workers.max_retries", "must be >= 0")
    _expect(
        cfg.workers.in_flight_per_worker >= 1,
        "workers.in_flight_per_worker",
        "must be >= 1 (shards queued per worker)",
    )
    _expect(cfg.target_file_mb >= 1, "target_file_mb", "must be >= 1")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config from a local path or an object-store URI."""
    text_path = str(path)
    try:
        if "://" in text_path:
            from analysis.storage import read_text, resolve

            fs, inner = resolve(text_path)
            text, base = read_text(fs, inner), None
        else:
            text, base = Path(text_path).read_text(), Path(text_path).parent
        raw = yaml.safe_load(text)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(raw or {}, base_dir=base)


def with_model(cfg: RunConfig, model_path: str | None) -> RunConfig:
    """The same run on another checkpoint (the watcher's per-checkpoint jobs)."""
    from dataclasses import replace

    if not model_path:
        return cfg
    return replace(cfg, model=replace(cfg.model, path=model_path))
