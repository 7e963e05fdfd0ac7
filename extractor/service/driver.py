"""The extraction driver: plan shards, run them on Ray actors (or in process), record the run.

Orchestration only. Resume and idempotency come from the store: committed
shards are skipped, a shard's rows appear only when its marker is written, and
a retried shard writes under a fresh attempt id, so nothing is ever duplicated.
Infrastructure failures (a dead actor, a lost node) are retried within a
budget; application errors fail the shard fast and are reported.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from analysis.schema import SETUP_SHARD
from extractor.config import RunConfig
from extractor.speech.dataset import ManifestSource, RowLocations
from extractor.store import StoreWriter
from extractor.store.faults import CRASH_ENV

from .environment import forwarded_env
from .plan import Plan, make_plan
from .probe import StoreProbe, check_probe, remove_probe, write_probe
from .worker import ShardProcessor, ShardStats

log = logging.getLogger("slm_lens.extract")

#: What the driver reads of a model (config and tokenizer): never the weights.
DRIVER_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken")


@dataclass
class RunSummary:
    run_id: str
    store: str
    shards_total: int
    shards_skipped: int
    shards_done: int
    shards_failed: list[int] = field(default_factory=list)
    failures: int = 0
    tokens: int = 0
    lens_rows: int = 0
    seconds: float = 0.0
    retries: int = 0
    words_without_units: int = 0

    @property
    def ok(self) -> bool:
        return not self.shards_failed and self.failures == 0

    def describe(self) -> str:
        lines = [
            f"run {self.run_id} -> {self.store}",
            f"  shards: {self.shards_done} done, {self.shards_skipped} already committed, "
            f"{len(self.shards_failed)} failed of {self.shards_total}",
            f"  tokens: {self.tokens:,}  lens rows: {self.lens_rows:,}  "
            f"time: {self.seconds:.1f} s  retries: {self.retries}",
            f"  failed items: {self.failures}",
        ]
        if self.words_without_units:
            lines.append(f"  spoken words without units (in no recall): {self.words_without_units}")
        if self.shards_failed:
            lines.append(f"  failed shards: {self.shards_failed}")
        return "\n".join(lines)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _model_shape(cfg: RunConfig) -> tuple[int, int]:
    """(n_layers, vocab_size) from the config alone, without loading weights."""
    from transformers import AutoConfig

    from extractor.models.loading import is_unit_lm

    from .resources import materialize

    folder = materialize(cfg.model.path, only=DRIVER_FILES)
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    if is_unit_lm(raw):
        base = raw.get("base_config", {})
        n_layers, vocab_size = int(base.get("num_hidden_layers")), int(raw["vocab_size"])
    else:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
        n_layers, vocab_size = int(config.num_hidden_layers), int(config.vocab_size)
    if cfg.lens.head:  # ranks are over the foreign head's vocabulary
        head = AutoConfig.from_pretrained(materialize(cfg.lens.head, only=DRIVER_FILES))
        vocab_size = int(head.vocab_size)
    return n_layers, vocab_size


def _write_setup_shard(cfg: RunConfig, plan: Plan, store: StoreWriter) -> None:
    """Vocabulary (with each token's modality) and manifest-level failures, as shard 0."""
    from transformers import AutoTokenizer

    from extractor.speech.layouts import layout_from_config, text_modalities

    from .resources import materialize

    if cfg.lens.head:  # the vocabulary the ranks and top-k ids are over: the head's
        tokenizer = AutoTokenizer.from_pretrained(materialize(cfg.lens.head, only=DRIVER_FILES))
        modality = text_modalities(tokenizer)
    else:
        folder = materialize(cfg.model.tokenizer or cfg.model.path, only=DRIVER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=cfg.model.trust_remote_code
        )
        modality = layout_from_config(cfg.model.layout).check(tokenizer).modality_of()
    # Readable strings (" cat", not the byte-level "Ġcat"), as an analyst wants to see them.
    text = tokenizer.batch_decode([[i] for i in range(len(modality))])
    with store.shard(plan.run_id, SETUP_SHARD) as writer:
        writer.write(
            "vocab",
            [
                {"token_id": i, "token": t, "modality": m}
                for i, (t, m) in enumerate(zip(text, modality, strict=True))
            ],
        )
        writer.write(
            "failures",
            [
                {
                    "shard": SETUP_SHARD,
                    "utterance_id": u,
                    "stage": "manifest",
                    "error": e,
                    "message": m,
                }
                for u, e, m in plan.manifest_errors
            ],
        )
        writer.commit({"setup": True})


def run_extraction(
    cfg: RunConfig,
    *,
    address: str | None = None,
    in_process: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Extract ``cfg``'s run into ``cfg.store``; returns what happened (never half-commits)."""
    if not cfg.store:
        raise ValueError("no store given: set store: in the config or pass --store")
    started = time.perf_counter()
    plan = make_plan(cfg)
    cfg = plan.config  # hf:// references pinned to commits, for every worker alike
    store = StoreWriter(cfg.store, target_file_bytes=cfg.target_file_mb << 20)
    run_fields = dict(
        model=cfg.model.name or cfg.model.path,
        revision=plan.revision,
        dataset=plan.dataset,
        k=cfg.lens.k,
        config=cfg.to_dict(),
    )
    if plan.head_revision:
        run_fields["config"]["lens"]["head_revision"] = plan.head_revision
    started_at = _now()
    try:
        n_layers, vocab_size = _model_shape(cfg)
        run_fields.update(n_layers=n_layers, vocab_size=vocab_size)
        store.write_run(plan.run_id, **run_fields, status="running", started_at=started_at)
        summary = _extract(cfg, plan, store, address, in_process, progress)
        summary.failures = _count_failures(store, plan.run_id)
    except BaseException as exc:
        # Every exit path ends the run: a driver that dies leaves no "running" for ever.
        _record_failure(store, plan.run_id, run_fields, started_at, exc)
        raise
    summary.seconds = time.perf_counter() - started
    status = "finished" if summary.ok else "failed"
    store.write_run(
        plan.run_id,
        **run_fields,
        status=status,
        started_at=started_at,
        finished_at=_now(),
        message=json.dumps(asdict(summary), default=str),
    )
    return summary


def _record_failure(store, run_id, run_fields, started_at, exc: BaseException) -> None:
    """Write ``failed`` with the error; a store that is itself down only gets a log line."""
    message = json.dumps({"error": type(exc).__name__, "message": str(exc)[:2000]})
    try:
        store.write_run(
            run_id,
            **run_fields,
            status="failed",
            started_at=started_at,
            finished_at=_now(),
            message=message,
        )
    except Exception as write_error:  # the original error matters more
        log.error(
            "run %s failed (%s) and its status could not be recorded: %s",
            run_id,
            message,
            write_error,
        )


def _extract(cfg, plan, store, address, in_process, progress) -> RunSummary:
    """The run's shards, in process or on Ray (the caller records the outcome)."""
    done = store.committed_shards(plan.run_id)
    if SETUP_SHARD not in done:
        _write_setup_shard(cfg, plan, store)
    todo = {s: rows for s, rows in plan.shards.items() if s not in done}
    summary = RunSummary(
        run_id=plan.run_id,
        store=cfg.store,
        shards_total=len(plan.shards),
        shards_skipped=len(plan.shards) - len(todo),
        shards_done=0,
    )
    log.info(
        "run %s: %d shards to do, %d already committed",
        plan.run_id,
        len(todo),
        summary.shards_skipped,
    )
    bar = tqdm(total=len(todo), desc=f"extract {plan.run_id}", unit="shard", disable=not progress)

    def settle(outcome: Outcome) -> None:
        """Every shard outcome is folded into the summary (and the store) here, only here."""
        if outcome.kind == "wait":  # resubmitted, without using the retry budget
            summary.retries += 1
            return
        if outcome.kind == "retry":
            summary.retries += 1
            log.warning("shard %d: %s; retrying", outcome.shard, outcome.message)
            return
        bar.update(1)
        if outcome.kind == "failed":
            summary.shards_failed.append(outcome.shard)
            log.error("shard %d failed: %s: %s", outcome.shard, outcome.error, outcome.message)
            try:
                store.record_shard_failure(
                    plan.run_id,
                    outcome.shard,
                    todo[outcome.shard].ids,
                    outcome.error,
                    outcome.message,
                )
            except OSError as exc:  # the shard stays uncommitted; a re-run redoes it anyway
                log.error("shard %d: its failure could not be recorded: %s", outcome.shard, exc)
            return
        stats = outcome.stats
        summary.shards_done += 1
        summary.tokens += stats.tokens
        summary.lens_rows += stats.lens_rows
        summary.words_without_units += stats.words_without_units
        bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
        log.info(
            "shard %d: %d tokens, %d lens rows, %.0f tokens/s, %d bytes",
            stats.shard,
            stats.tokens,
            stats.lens_rows,
            stats.tokens_per_s,
            stats.bytes,
        )

    try:
        if in_process:
            processor = ShardProcessor(cfg, plan.run_id, plan.source)
            for outcome in _pipelined(processor, todo, cfg.workers.in_flight_per_worker):
                settle(outcome)
        elif todo:
            _run_on_ray(cfg, plan, todo, address, settle)
    finally:
        bar.close()
    return summary


@dataclass
class Outcome:
    """What became of one attempt at a shard: ``done``, ``retry``, ``wait`` or ``failed``."""

    shard: int
    kind: str
    stats: ShardStats | None = None
    error: str = ""
    message: str = ""

    @classmethod
    def failure(cls, shard: int, exc: BaseException, kind: str = "failed") -> Outcome:
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the real one
        return cls(shard, kind, error=type(cause).__name__, message=str(cause)[:4000])


class ShardScheduler:
    """The one owner of which shards are queued and how many attempts each has had.

    ``done(shard, result)`` turns a finished attempt (stats or the exception it
    raised) into an :class:`Outcome`, queueing the shard again when a lost
    worker left retries in its budget.
    """

    #: How many times a shard may find its actor restarting (about a second apart).
    MAX_WAITS = 600

    def __init__(
        self,
        shards,
        max_retries: int,
        infra_errors: tuple[type, ...],
        unavailable_errors: tuple[type, ...] = (),
    ) -> None:
        self.queue = deque(sorted(shards))
        self.attempts = dict.fromkeys(shards, 0)
        self.waits = dict.fromkeys(shards, 0)
        self.max_retries = max_retries
        self.infra_errors = infra_errors
        self.unavailable_errors = unavailable_errors

    def next(self) -> int | None:
        return self.queue.popleft() if self.queue else None

    def done(self, shard: int, result: ShardStats | BaseException) -> Outcome:
        if not isinstance(result, BaseException):
            return Outcome(shard, "done", stats=result)
        if not isinstance(result, self.infra_errors):
            return Outcome.failure(shard, result)
        if _init_failed(result):
            # A model or tokenizer that cannot load fails everywhere: retrying it
            # shard after shard only hides the real error.
            raise WorkerStartError(f"workers could not start (shard {shard}): {result}") from result
        if isinstance(result, self.unavailable_errors) and self.waits[shard] < self.MAX_WAITS:
            # The actor is restarting (loading its model): not a lost attempt, just early.
            self.waits[shard] += 1
            self.queue.append(shard)
            return Outcome(shard, "wait", error=type(result).__name__, message="actor restarting")
        self.attempts[shard] += 1
        if self.attempts[shard] > self.max_retries:
            outcome = Outcome.failure(shard, result)
            outcome.message = f"worker lost {self.attempts[shard]} times: {outcome.message}"
            return outcome
        self.queue.append(shard)
        outcome = Outcome.failure(shard, result, kind="retry")
        outcome.message = (
            f"worker lost ({outcome.error}), attempt {self.attempts[shard]}/{self.max_retries}"
        )
        return outcome


def _pipelined(processor: ShardProcessor, todo: dict, depth: int):
    """Outcomes of ``todo``'s shards in order, ``depth`` of them in flight at once.

    The in-process twin of a Ray actor with ``max_concurrency=depth``: the next
    shard's front end runs on another thread while this one holds the model.
    """
    from concurrent.futures import ThreadPoolExecutor

    shards = sorted(todo)
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="shard")
    futures: dict = {}
    try:
        for i, shard in enumerate(shards):
            while len(futures) < depth and i + len(futures) < len(shards):
                nxt = shards[i + len(futures)]
                futures[nxt] = pool.submit(processor.process, nxt, todo[nxt])
            try:
                yield Outcome(shard, "done", stats=futures.pop(shard).result())
            except Exception as exc:  # one shard's error; the others still run
                yield Outcome.failure(shard, exc)
    finally:  # an interrupt does not wait for queued shards (a running one still commits)
        pool.shutdown(wait=False, cancel_futures=True)


def _count_failures(store: StoreWriter, run_id: str) -> int:
    """Failure rows of the run, counted from commit markers and shard failure records."""
    from analysis.index import read_index, read_shard_failures

    index = read_index(store.fs, store.root, [run_id])
    committed = sum(c.rows.get("failures", 0) for c in index.commits)
    shard_failures = read_shard_failures(store.fs, store.root, index.committed, [run_id])
    return committed + shard_failures.num_rows


# Ray -------------------------------------------------------------------------------------
class LensActor:
    """A Ray actor around :class:`ShardProcessor`: the model loads once per actor."""

    def __init__(
        self,
        cfg: RunConfig,
        run_id: str,
        source: ManifestSource,
        probe: StoreProbe | None = None,
    ) -> None:
        check_probe(probe)  # before the model loads: a node that writes nowhere useful
        self.processor = ShardProcessor(cfg, run_id, source)

    def process(self, shard: int, rows: RowLocations) -> ShardStats:
        return self.processor.process(shard, rows)

    def pid(self) -> int:
        return os.getpid()


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a cluster (``address``, ``RAY_ADDRESS``) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",  # a fresh local instance, even if `ray start` runs here
            num_cpus=num_cpus or max(2, os.cpu_count() or 2),
            include_dashboard=False,
            log_to_driver=True,
        )


class WorkerStartError(RuntimeError):
    """The actors' own set-up failed (model, tokenizer, speech tokenizer): not a lost node."""


def _init_failed(exc: BaseException) -> bool:
    flag = getattr(exc, "actor_init_failed", False)
    return bool(flag() if callable(flag) else flag)


def _infrastructure_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rx

    names = (
        "RayActorError",
        "ActorDiedError",
        "ActorUnavailableError",
        "NodeDiedError",
        "ObjectLostError",
        "OwnerDiedError",
        "WorkerCrashedError",
        "LocalRayletDiedError",
    )
    return tuple(getattr(rx, n) for n in names if hasattr(rx, n))


def _run_on_ray(cfg, plan, todo, address, settle) -> None:
    import ray

    run_id = plan.run_id

    ensure_ray(address)
    if cfg.workers.gpus > 0 and not ray.cluster_resources().get("GPU"):
        # Not an error: an autoscaling cluster may add GPU nodes once asked.
        log.warning(
            "workers.gpus=%s but the Ray cluster has no GPU right now; actors wait until "
            "GPU nodes join (set workers.gpus: 0 to run on CPUs)",
            cfg.workers.gpus,
        )
    env = forwarded_env(extra=(CRASH_ENV,))  # never credentials: see .environment
    capacity = cfg.workers.in_flight_per_worker
    actor_cls = ray.remote(LensActor).options(
        num_cpus=cfg.workers.cpus,
        num_gpus=cfg.workers.gpus,
        # A threaded actor: one queued shard's front end runs while another holds the
        # model (ShardProcessor admits one shard per stage at a time).
        max_concurrency=capacity,
        max_restarts=-1,
        max_task_retries=0,
        runtime_env={"env_vars": env} if env else None,
    )
    probe = write_probe(cfg.store, run_id)
    source = ray.put(plan.source)  # the control pool, sent once, not once per actor
    actors = [actor_cls.remote(cfg, run_id, source, probe) for _ in range(cfg.workers.count)]
    from ray import exceptions as rx

    unavailable = tuple(e for e in (getattr(rx, "ActorUnavailableError", None),) if e)
    scheduler = ShardScheduler(todo, cfg.workers.max_retries, _infrastructure_errors(), unavailable)
    load = dict.fromkeys(range(len(actors)), 0)
    in_flight: dict = {}
    try:
        while scheduler.queue or in_flight:
            # Backpressure: at most `capacity` shards per actor are ever outstanding.
            while scheduler.queue and (idle := [a for a, n in load.items() if n < capacity]):
                a = min(idle, key=lambda i: load[i])
                shard = scheduler.next()
                in_flight[actors[a].process.remote(shard, todo[shard])] = (shard, a)
                load[a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=5.0)
            for ref in ready:
                shard, a = in_flight.pop(ref)
                load[a] -= 1
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    result = exc
                outcome = scheduler.done(shard, result)
                settle(outcome)
                if outcome.kind == "wait":
                    time.sleep(1.0)  # let the restarting actor load its model
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_probe(probe)
