"""One worker's job: turn a shard of utterances into committed store rows.

Knows models, the speech front end, the lens and the store writer, but not Ray:
the Ray actor (:mod:`.driver`) and the in-process loop both call
:meth:`ShardProcessor.process`, so the two paths cannot drift apart.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch

from extractor.config import RunConfig
from extractor.lens import LensInputs, LensResult, auto_engine, fused_logit_lens
from extractor.lens.selfcheck import SelfCheck, choose_engine
from extractor.models import capture_layers, load_causal_lm, model_parts
from extractor.models.head import HeadMismatchError, foreign_head, hidden_size, own_head
from extractor.speech.dataset import ManifestSource, RowLocations, read_rows
from extractor.speech.frontend import SpeechFrontEnd
from extractor.speech.layouts import LayoutError, layout_from_config, segments_of, text_modalities
from extractor.speech.records import SpeechInputError, Utterance
from extractor.speech.sequence import BuiltSequence, ControlSampler, ModalityRule, build_sequence
from extractor.store import StoreWriter
from extractor.store.faults import crash_point

from .resources import build_speech_tokenizer, materialize
from .rows import lens_tables, pack_targets, pooled_groups

#: ``SLM_LENS_COMPILE=0`` runs the torch engine's reduction eager (a machine without a
#: working compiler): an operator's switch, read here, passed to the lens explicitly.
LENS_COMPILE = os.environ.get("SLM_LENS_COMPILE", "1") != "0"


def _engine(backend: str):
    def run(inputs: LensInputs) -> LensResult:
        return fused_logit_lens(**inputs.__dict__, backend=backend, compile=LENS_COMPILE)

    return run


#: The engines a worker may run, by ``lens.engine`` name (tests swap in broken ones).
LENS_ENGINES = {"torch": _engine("torch"), "triton": _engine("triton")}


class ShardAccountingError(RuntimeError):
    """An utterance ended in neither ``utterances`` nor ``failures``: a bug; never committed."""


def _check_accounted(shard: int, wanted: list[str], done: list[str], failures: list[dict]) -> None:
    """Every utterance of the shard must end in exactly one place (as Ray's stages check)."""
    accounted = set(done) | {f["utterance_id"] for f in failures}
    lost = [u for u in wanted if u not in accounted]
    if lost:
        raise ShardAccountingError(
            f"shard {shard}: {len(lost)} utterance(s) in neither utterances nor failures, "
            f"e.g. {lost[:3]}"
        )


@dataclass
class ShardStats:
    shard: int
    utterances: int
    failures: int
    tokens: int
    lens_rows: int
    seconds: float
    bytes: int
    #: Spoken words whose timings cover no unit frame: lensed nowhere, so absent from
    #: every recall (too short for the 40 ms frames, or outside the audio's units).
    words_without_units: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class PreparedShard:
    """A shard through the CPU front end, waiting for the model."""

    shard: int
    ids: list[str]
    seqs: list[tuple[Utterance, BuiltSequence]]
    failures: list[dict]
    started: float  # epoch seconds, when its front end began
    frontend_seconds: float


@dataclass
class StageClock:
    """Seconds per part of the model stage, for the shard's telemetry.

    ``forward`` and ``lens`` are the model's own work; ``rows`` (target packing and
    Arrow row building) and ``write`` (Parquet) are the CPU cost per lens row that the
    model stage carries; ``frontend`` ran before, outside the model lock.
    """

    frontend_started: float
    frontend: float
    model_started: float
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def telemetry(self) -> dict:
        parts = {p: self.seconds.get(p, 0.0) for p in ("forward", "lens", "rows", "write")}
        return {
            "frontend_started_at": self.frontend_started,
            "frontend_seconds": self.frontend,
            "model_started_at": self.model_started,
            "model_finished_at": time.time(),
            **{f"{p}_seconds": v for p, v in parts.items()},
        }


class ShardProcessor:
    """Loads the model and tokenizers once; processes shards on demand.

    The manifest is never loaded whole: each shard reads its own rows from
    ``source`` (``source.control_pool`` holds the corpus sample control words come from).
    """

    def __init__(
        self,
        config: RunConfig,
        run_id: str,
        source: ManifestSource,
        device: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.cfg = config
        self.run_id = run_id
        if device is None:
            device = "cuda" if torch.cuda.is_available() and config.workers.gpus > 0 else "cpu"
        self.device = device
        model_dir = materialize(config.model.path, allow_pickle=config.model.allow_pickle)
        self.model = load_causal_lm(
            model_dir,
            dtype=getattr(torch, config.model.dtype),
            device=device,
            allow_pickle=config.model.allow_pickle,
            trust_remote_code=config.model.trust_remote_code,
        )
        self.parts = model_parts(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(
            materialize(config.model.tokenizer) if config.model.tokenizer else model_dir,
            trust_remote_code=config.model.trust_remote_code,
        )
        self.layout = layout_from_config(config.model.layout).check(self.tokenizer)
        self._load_head(config, device)
        self.text_segment_size = int((self.segments.index == 0).sum())
        self.frontend = SpeechFrontEnd(build_speech_tokenizer(config.speech, device))
        self.source = source
        self.control = ControlSampler(source.control_pool, seed=config.prompt.control_seed)
        rule = dict(config.prompt.rule)
        if "flags" in rule and rule["flags"] is not None:
            rule["flags"] = tuple(rule["flags"])
        self.rule = ModalityRule(**rule)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.store = StoreWriter(config.store, target_file_bytes=config.target_file_mb << 20)
        self.engine_check: SelfCheck | None = None
        self._frontend_lock = threading.Lock()
        self._model_lock = threading.Lock()

    def _load_head(self, config: RunConfig, device: str) -> None:
        """The head that decodes (the model's own, or ``lens.head``), its vocabulary's
        segments, and the tokenizer whose ids the word targets are."""
        self.head = own_head(self.parts)
        self.target_tokenizer = self.tokenizer
        self.segments = self.layout.segments(self.parts.vocab_size)
        if not config.lens.head:
            return
        from transformers import AutoTokenizer

        folder = materialize(config.lens.head, allow_pickle=config.model.allow_pickle)
        self.head = foreign_head(
            folder,
            model_hidden_size=hidden_size(self.model),
            dtype=self.parts.dtype,
            device=device,
            allow_pickle=config.model.allow_pickle,
        )
        self.target_tokenizer = AutoTokenizer.from_pretrained(folder)
        if len(self.target_tokenizer) > self.head.vocab_size:
            raise HeadMismatchError(
                f"lens.head {config.lens.head}: its tokenizer has {len(self.target_tokenizer)} "
                f"tokens but its unembedding only {self.head.vocab_size} rows"
            )
        self.segments = segments_of(text_modalities(self.target_tokenizer), self.head.vocab_size)

    # ----------------------------------------------------------------------------------
    def process(self, shard: int, rows: RowLocations) -> ShardStats:
        """Run the lens over the shard's utterances and commit its rows (idempotent).

        Thread-safe, and built to be called from two threads at once: the CPU front
        end (:meth:`prepare`) of one shard runs while another shard holds the model
        (:meth:`run`). Each stage admits one shard at a time, so a worker holds at
        most its in-flight shards in memory.
        """
        if self.store.is_committed(self.run_id, shard):
            return ShardStats(shard, 0, 0, 0, 0, 0.0, 0)
        return self.run(self.prepare(shard, rows))

    def prepare(self, shard: int, rows: RowLocations) -> PreparedShard:
        """The CPU stage: read the shard's rows, decode, align, tokenise speech, build
        sequences. Bad items become failure rows; nothing is written yet."""
        with self._frontend_lock:
            started = time.time()
            failures: list[dict] = []
            seqs: list[tuple[Utterance, BuiltSequence]] = []
            read = read_rows(self.source, rows)
            items = self.frontend.prepare([u for u in read if isinstance(u, Utterance)])
            for item in [e for e in read if isinstance(e, SpeechInputError)] + items:
                if isinstance(item, SpeechInputError):
                    failures.append(_failure(shard, item.utterance_id, item.stage, item))
                    continue
                try:
                    seq = build_sequence(
                        item,
                        self.tokenizer,
                        self.layout,
                        self.cfg.prompt.mode,
                        self.rule,
                        self.control,
                        self.max_positions,
                        speech_marker=self.cfg.prompt.speech_marker,
                        target_tokenizer=self.target_tokenizer,
                    )
                except (SpeechInputError, LayoutError) as exc:
                    failures.append(
                        _failure(shard, item.id, getattr(exc, "stage", "sequence"), exc)
                    )
                    continue
                seqs.append((item, seq))
            return PreparedShard(shard, rows.ids, seqs, failures, started, time.time() - started)

    def run(self, prepared: PreparedShard) -> ShardStats:
        """The model stage: forward passes, the lens, store rows, the commit."""
        with self._model_lock:
            shard, seqs, failures = prepared.shard, prepared.seqs, prepared.failures
            clock = StageClock(prepared.started, prepared.frontend_seconds, time.time())
            with self.store.shard(self.run_id, shard) as writer:
                with clock("write"):
                    writer.write("utterances", [_utterance_row(shard, u, s) for u, s in seqs])
                    writer.write("words", [_word_row(s, w) for _, s in seqs for w in s.words])
                    writer.write("tokens", _token_table(seqs))
                tokens = 0
                lens_rows = 0
                for batch in self._batches(seqs):
                    crash_point("mid_shard", shard)
                    lens, word_lens = self._lens_batch(batch, clock)
                    with clock("write"):
                        writer.write("lens", lens)
                        writer.write("word_lens", word_lens)
                    tokens += sum(len(s) for _, s in batch)
                    lens_rows += lens.num_rows
                with clock("write"):
                    writer.write("failures", failures)
                _check_accounted(shard, prepared.ids, [u.id for u, _ in seqs], failures)
                # Busy time: the front end plus this model stage, not the wait between.
                seconds = prepared.frontend_seconds + time.time() - clock.model_started
                unspanned = sum(len(s.unspanned_words) for _, s in seqs)
                stats = ShardStats(
                    shard, len(seqs), len(failures), tokens, lens_rows, seconds, 0, unspanned
                )
                marker = writer.commit(
                    {
                        "tokens": tokens,
                        "lens_rows": lens_rows,
                        "seconds": seconds,
                        "tokens_per_s": stats.tokens_per_s,
                        "utterances": len(seqs),
                        "failures": len(failures),
                        "words_without_units": unspanned,
                        "device": self.device,
                        **clock.telemetry(),
                        **(self.engine_check.telemetry() if self.engine_check else {}),
                    }
                )
                stats.bytes = marker["bytes"]
            return stats

    # ----------------------------------------------------------------------------------
    def _batches(self, seqs):
        """Length-sorted batches whose padded size stays under the token budget."""
        order = sorted(seqs, key=lambda item: len(item[1]))
        batch: list = []
        for item in order:
            width = max([len(item[1])] + [len(s) for _, s in batch])
            if batch and width * (len(batch) + 1) > self.cfg.batch_tokens:
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def _selected(self, seq: BuiltSequence) -> list[int]:
        n = len(seq)
        mode = self.cfg.lens.positions
        if mode == "all":
            chosen = set(range(n))
        elif mode == "word_final":
            chosen = {w.last_position for w in seq.words if w.last_position is not None}
        else:
            chosen = {p for p, w in enumerate(seq.word_index) if w is not None}
        if seq.continuation_start is not None:
            # Spoken-knowledge pairs: score every continuation token at the last layer.
            chosen |= set(range(max(0, seq.continuation_start - 1), n - 1))
        return sorted(chosen)

    def _lens(self, inputs: LensInputs) -> LensResult:
        """The lens through the engine this device has been checked to run exactly.

        The first call runs the configured engine on a sample of these real rows
        against the float64 reference; a disagreement falls back to the torch engine.
        """
        if self.engine_check is None:
            engine = self.cfg.lens.engine
            preferred = auto_engine(self.device) if engine == "auto" else engine
            self.engine_check = choose_engine(inputs, preferred, LENS_ENGINES)
        return LENS_ENGINES[self.engine_check.engine](inputs)

    def _lens_batch(self, batch, clock: StageClock) -> tuple[pa.Table, pa.Table]:
        """One padded forward pass, the lens over every layer, the batch's store rows."""
        seqs = [seq for _, seq in batch]
        width = max(len(seq) for seq in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        select = torch.zeros((len(seqs), width), dtype=torch.bool)
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)] = torch.tensor(seq.token_ids)
            attn[b, : len(seq)] = 1
            select[b, self._selected(seq)] = True
        sel_b, sel_p = torch.nonzero(select, as_tuple=True)
        if len(sel_b) == 0:
            return _empty("lens"), _empty("word_lens")
        with clock("forward"):
            hidden = capture_layers(self.parts, ids, select, attn)  # [L1, S, d]
        n_layers = hidden.shape[0]
        with clock("rows"):
            targets = pack_targets(seqs, sel_b.numpy(), sel_p.numpy())
            if self.head.foreign:  # the model's next token is not an id of this head
                targets = replace(targets, next_token=np.full_like(targets.next_token, -1))
            pool_rows, pool_targets = pooled_groups(targets, n_layers)
        with clock("lens"):
            result = self._lens_call(hidden, targets, pool_rows, pool_targets, n_layers)
        with clock("rows"):
            has_text = self.text_segment_size > 0
            return lens_tables(result, targets, seqs, n_layers, self.cfg.lens.k, has_text)

    def _lens_call(self, hidden, targets, pool_rows, pool_targets, n_layers) -> LensResult:
        return self._lens(
            LensInputs(
                hidden=hidden.reshape(-1, hidden.shape[-1]),
                unembed=self.head.unembed,
                k=self.cfg.lens.k,
                final_norm=self.head.final_norm,
                bias=self.head.bias,
                softcap=self.head.softcap,
                segments=self.segments,
                targets=torch.from_numpy(np.tile(targets.row_targets(), (n_layers, 1))).to(
                    self.device
                ),
                pool_groups=torch.from_numpy(pool_rows).to(self.device),
                pool_targets=torch.from_numpy(pool_targets).to(self.device),
            )
        ).to("cpu")


def _empty(table: str) -> pa.Table:
    from analysis.schema import TABLES

    return TABLES[table].empty_table()


def _failure(shard: int, utt_id: str, stage: str, error: Exception) -> dict:
    return {
        "shard": shard,
        "utterance_id": utt_id,
        "stage": stage,
        "error": type(error).__name__,
        "message": str(error),
    }


def _utterance_row(shard: int, utt: Utterance, seq: BuiltSequence) -> dict:
    return {
        "shard": shard,
        "utterance_id": utt.id,
        "n_tokens": len(seq),
        "duration_s": utt.duration_s,
        "text": utt.text,
        "pair_id": utt.pair_id,
        "pair_role": utt.pair_role,
        "continuation_start": seq.continuation_start,
    }


def _word_row(seq: BuiltSequence, w) -> dict:
    return {
        "utterance_id": seq.utterance_id,
        "word_index": w.word_index,
        "word": w.word,
        "modality": w.modality,
        "start_s": w.start_s,
        "end_s": w.end_s,
        "first_position": w.first_position,
        "last_position": w.last_position,
        "variant_ids": w.variant_ids,
        "next_variant_ids": w.next_variant_ids,
        "ctrl_word": w.ctrl_word,
        "ctrl_variant_ids": w.ctrl_variant_ids,
    }


def _token_table(seqs) -> pa.Table:
    utt, pos, tok, mod, widx = [], [], [], [], []
    for _, s in seqs:
        n = len(s)
        utt += [s.utterance_id] * n
        pos += list(range(n))
        tok += s.token_ids
        mod += s.modality
        widx += s.word_index
    return pa.table(
        {
            "utterance_id": pa.array(utt, pa.string()),
            "position": pa.array(pos, pa.int32()),
            "token_id": pa.array(tok, pa.int32()),
            "modality": pa.array(mod, pa.string()),
            "word_index": pa.array(widx, pa.int32()),
        }
    )
