"""The lens on a CUDA GPU: exactness against float64, speed against cuBLAS, self-check cost.

    python bench/gpu_lens.py                    # everything, ~3 minutes on one H100/H200
    python bench/gpu_lens.py --only exact       # one part (exact, entry, kernel, ...)

Needs a CUDA GPU (no CPU path: this is what CI cannot run). Parts:

exact     Ranks and top-k ids of each engine (triton, torch) against the float64
          reference, in bf16, fp16 and fp32, on SmolLM2-shaped random heads (d=576,
          V=49,152, a 502-entry speech segment) with exact ties planted (pairs of
          duplicate unembedding rows, one of each pair a target) and targets drawn
          at exact ranks 0, 5, 8-12, 40 and 400. Prints wrong counts: all must be 0.
entry     Exact values of 65,536 random entries (d = 576, bf16 and fp32): torch's ops
          (gather, products, the fixed-order float64 sum) against the one-launch
          Triton kernel of extractor/lens/triton_exact.py; both must agree bit for bit.
          The compiled kernels' registers and spills (their TTGIR and PTX under
          $OUT/entry_asm when $OUT is set); the torch engine with either at 4096 rows.
kernel    Median times (triton.testing.do_bench, CUDA events) at 4096 rows, bf16, for
          SmolLM2 and Qwen2.5 shapes: the bare cuBLAS bf16 GEMM of the same size
          (the floor), the Triton kernel alone, the whole Triton engine and the whole
          torch engine (top-10 overall and per segment, ranks of 12 targets per row,
          pooled top-10 and ranks over groups of 8 rows), and the top-k-only calls;
          a sweep of the kernel's tiles, warps and pipeline stages; the torch engine
          with its exact values from torch's ops (the baseline of the entry kernel).
chunks    The torch engine's (row_chunk, vocab_chunk) on a 16,384-row problem: ms and
          peak memory per pair against 4,096 x 16,384 in the same run, ranks and top-k
          ids against its (must be equal), and the default this GPU gets.
selfcheck The per-actor self-check (sample of 48 rows against float64) against one
          4096-row lens call.
model     A SmolLM2-shaped random Llama in bf16 (weights cannot travel; speed does not
          depend on them): forward with every layer's hidden states, then the lens on
          all 31 layers' rows, in tokens/s per engine.
worker    The worker's real call: all 31 layers of 4,096 positions in one call, 4 targets
          a position, speech positions pooled per word; per engine seconds, peak memory
          and the self-check's cost, and the engines' ranks and ids against each other.
profile   torch.profiler's top operators for one 4096-row call of each engine.

Every ratio compares numbers from this same run on this same GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SHAPES = {"smollm2": (576, 49_152), "qwen2.5": (896, 152_167)}
N_SPEECH = 502
TARGETS, POOL, POOL_TARGETS, K = 12, 8, 4, 10
RANKS_TO_DRAW = (0, 5, 8, 9, 10, 11, 12, 40, 400)


def _segments(v: int):
    from extractor.lens import VocabSegments

    return VocabSegments.from_ranges(v, {"speech": [(v - N_SPEECH, v)]})


def _problem(d: int, v: int, n: int, dtype, seed: int = 0, *, full: bool = True):
    from extractor.lens import LensInputs

    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, d, generator=gen) / d**0.5 * 4).to("cuda", dtype)
    h = torch.randn(n, d, generator=gen).to("cuda", dtype)
    if not full:
        return LensInputs(hidden=h, unembed=w, k=K)
    return LensInputs(
        hidden=h,
        unembed=w,
        k=K,
        segments=_segments(v),
        targets=torch.randint(0, v, (n, TARGETS), generator=gen).cuda(),
        pool_groups=(torch.arange(n) // POOL).cuda(),
        pool_targets=torch.randint(
            0, v, ((n + POOL - 1) // POOL, POOL_TARGETS), generator=gen
        ).cuda(),
    )


def _tied_problem(dtype, seed: int, n: int = 256):
    """SmolLM2-shaped head with duplicate rows planted; targets at exact ranks and on ties."""
    from extractor.lens import LensInputs
    from extractor.lens.exact import dense_logits

    d, v = SHAPES["smollm2"]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=gen) / d**0.5 * 4
    src = torch.randperm(v, generator=gen)[:4000]
    w[src[2000:]] = w[src[:2000]]  # 2,000 exact ties
    w = w.to("cuda", dtype)
    h = torch.randn(n, d, generator=gen).to("cuda", dtype)
    base = LensInputs(hidden=h, unembed=w, k=K, segments=_segments(v))
    exact = dense_logits(h, base)
    order = exact.argsort(dim=1, descending=True)
    at_ranks = order[:, list(RANKS_TO_DRAW)]
    tied = src[torch.randint(0, 4000, (n, 3), generator=gen)].cuda()
    targets = torch.cat([at_ranks, tied], 1)
    return LensInputs(
        hidden=h,
        unembed=w,
        k=K,
        segments=_segments(v),
        targets=targets,
        pool_groups=(torch.arange(n) // POOL).cuda(),
        pool_targets=targets[::POOL, :POOL_TARGETS].contiguous(),
    )


def _wrong(got, ref) -> dict:
    got = got.to("cpu")
    out = {
        "ranks": int((got.target_ranks != ref.target_ranks).sum()),
        "topk_ids": int((got.topk_ids != ref.topk_ids).any(1).sum()),
        "pooled_ranks": int((got.pooled_target_ranks != ref.pooled_target_ranks).sum()),
    }
    for name in ref.target_segment_ranks:
        out[f"{name}_ranks"] = int(
            (got.target_segment_ranks[name] != ref.target_segment_ranks[name]).sum()
        )
        out[f"{name}_topk"] = int(
            (got.segment_topk_ids[name] != ref.segment_topk_ids[name]).any(1).sum()
        )
    out["pooled_topk_ids"] = int((got.pooled_topk_ids != ref.pooled_topk_ids).any(1).sum())
    for name in ref.pooled_target_segment_ranks:
        out[f"pooled_{name}_ranks"] = int(
            (got.pooled_target_segment_ranks[name] != ref.pooled_target_segment_ranks[name]).sum()
        )
        out[f"pooled_{name}_topk"] = int(
            (got.pooled_segment_topk_ids[name] != ref.pooled_segment_topk_ids[name]).any(1).sum()
        )
    out["lse_err"] = float((got.logsumexp.double() - ref.logsumexp).abs().max())
    out["of_ranks"] = int(ref.target_ranks.numel())
    return out


def part_exact() -> list[dict]:
    from extractor.lens import fused_logit_lens, reference_lens
    from extractor.lens.triton_lens import KERNEL_MODES, triton_lens

    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        inputs = _tied_problem(dtype, seed=1)
        ref = reference_lens(inputs)
        engines = {"torch": lambda x: fused_logit_lens(**x.__dict__, backend="torch")}
        for mode, kw in KERNEL_MODES.items():
            engines[f"triton-{mode}"] = lambda x, kw=kw: triton_lens(x, **kw)
        for engine, run in engines.items():
            try:
                got = run(inputs)
                row = {"dtype": str(dtype).split(".")[1], "engine": engine, **_wrong(got, ref)}
            except Exception as exc:  # report and go on: the other parts still run
                row = {"dtype": str(dtype), "engine": engine, "error": repr(exc)[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _with_torch_dots(fn):
    """``fn()`` with exact values from torch's ops instead of the Triton kernel (the
    baseline for :mod:`extractor.lens.triton_exact`, in the same run)."""
    from extractor.lens import exact

    cuda_dots = exact.entry_dots_cuda
    exact.entry_dots_cuda = exact.entry_dots_torch
    try:
        return fn()
    finally:
        exact.entry_dots_cuda = cuda_dots


def _compiled_entry_kernels() -> list[dict]:
    """Registers and spills of every compiled exact-values kernel (Triton's JIT cache), and
    their TTGIR/PTX under $OUT/entry_asm when $OUT is set: what the GPU really runs."""
    import os

    from extractor.lens import triton_exact

    out, asm_dir = [], os.environ.get("OUT")
    try:  # Triton's cache layout is not a public API: report, never fail the part
        for cache in getattr(triton_exact._entry_dots_kernel, "device_caches", {}).values():
            for key, kernel in cache[0].items():
                meta = {"key": str(key)[-160:], "n_regs": kernel.n_regs}
                out.append({**meta, "n_spills": kernel.n_spills})
                if asm_dir:
                    folder = Path(asm_dir) / "entry_asm"
                    folder.mkdir(exist_ok=True)
                    for stage in ("ttgir", "ptx"):
                        (folder / f"kernel{len(out)}.{stage}").write_text(kernel.asm[stage])
    except Exception as exc:
        out.append({"error": repr(exc)[:300]})
    print(json.dumps(out), flush=True)
    return out


def part_entry(e: int = 65_536) -> list[dict]:
    """Exact values of ``e`` random entries at d = 576: torch's ops against the kernel; the
    kernel's registers and spills; then the torch engine with either."""
    from extractor.lens import fused_logit_lens
    from extractor.lens.exact import entry_dots_torch
    from extractor.lens.triton_exact import entry_dots

    d, v = SHAPES["smollm2"]
    gen = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        h = torch.randn(4096, d, generator=gen).to("cuda", dtype)
        w = torch.randn(v, d, generator=gen).to("cuda", dtype)
        rows = torch.randint(0, 4096, (e,), generator=gen).cuda()
        cols = torch.randint(0, v, (e,), generator=gen).cuda()
        row = {
            "dtype": str(dtype),
            "entries": e,
            "bitwise_equal": torch.equal(
                entry_dots(h, w, rows, cols), entry_dots_torch(h, w, rows, cols)
            ),
            "torch_ms": _bench(lambda a=(h, w, rows, cols): entry_dots_torch(*a)),
            "triton_ms": _bench(lambda a=(h, w, rows, cols): entry_dots(*a)),
        }
        row["speedup"] = round(row["torch_ms"] / row["triton_ms"], 2)
        print(json.dumps(row), flush=True)
        out.append(row)
    out.append({"compiled": _compiled_entry_kernels()})
    for dtype in (torch.bfloat16, torch.float32):
        full = _problem(d, v, 4096, dtype)

        def engine(inputs=full):
            return fused_logit_lens(**inputs.__dict__, backend="torch")

        row = {
            "dtype": str(dtype),
            "torch_engine_ms": _bench(engine),
            "torch_engine_torch_dots_ms": _bench(lambda: _with_torch_dots(engine)),
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _kernel_row(shape: str, n: int) -> dict:
    """One shape: cuBLAS's bare GEMM (the floor), the Triton kernel alone and the Triton
    engine in each of its modes (``triton_lens.KERNEL_MODES``), and the torch engine; ms
    per ``n``-row call, in one run. Block sizes were swept in earlier sessions
    (bench/README.md): the defaults stand."""
    from extractor.lens import fused_logit_lens
    from extractor.lens import triton_lens as tlens
    from extractor.lens.chunked import normed_rows
    from extractor.lens.exact import target_logits, thresholds

    d, v = SHAPES[shape]
    full = _problem(d, v, n, torch.bfloat16)
    bare = _problem(d, v, n, torch.bfloat16, full=False)
    h, w = full.hidden, full.unembed
    targets = full.resolved_targets().long().contiguous()
    hn = normed_rows(full).contiguous()
    t64 = target_logits(hn, targets, full)
    names = full.resolved_segments().names
    b = tlens.CUDA_BLOCKS

    def kernel_call(candidates: str):
        """The kernel alone, with its mode's shape."""
        band = tlens._band(full, hn, b["BK"])
        lo, hi = (x.contiguous() for x in thresholds(t64, band))
        shp = tlens._Shape(
            n=n,
            d=d,
            t=targets.shape[1],
            tp=tlens._next_pow2(targets.shape[1]),
            sp=tlens._next_pow2(len(names)),
            kp=tlens._next_pow2(K + tlens.TOPK_MARGIN),
            bm=b["BM"],
            bn=b["BN"],
            bk=b["BK"],
            group=tlens.CANDIDATE_GROUP if candidates == "groups" else 0,
        )
        return lambda: tlens._launch(full, hn, targets, lo, hi, shp, None)

    timings = {
        "cublas_bf16_gemm": lambda: h @ w.T,
        "cublas_bf16_gemm_fp32_out": lambda: torch.mm(h, w.T, out_dtype=torch.float32),
        "torch_engine": lambda: fused_logit_lens(**full.__dict__, backend="torch"),
        "torch_topk_only": lambda: fused_logit_lens(**bare.__dict__, backend="torch"),
    }
    for mode, kw in tlens.KERNEL_MODES.items():
        timings[f"kernel_{mode}"] = kernel_call(**kw)
        timings[f"engine_{mode}"] = lambda kw=kw: tlens.triton_lens(full, **kw)
        timings[f"topk_only_{mode}"] = lambda kw=kw: tlens.triton_lens(bare, **kw)
    ms = {}
    for name, fn in timings.items():
        try:
            ms[name] = _bench(fn)
        except Exception as exc:
            ms[name] = float("nan")
            print(f"{shape} {name}: {exc!r}"[:400], flush=True)
        print(json.dumps({"shape": shape, "rows": n, "method": name, "ms": ms[name]}), flush=True)
    floor = ms["cublas_bf16_gemm"]
    row = {"shape": shape, "rows": n, **{k: round(x, 3) for k, x in ms.items()}}
    for mode, kw in tlens.KERNEL_MODES.items():
        row[f"kernel_{mode}_over_gemm"] = round(ms[f"kernel_{mode}"] / floor, 2)
        row[f"engine_{mode}_over_torch_engine"] = round(
            ms[f"engine_{mode}"] / ms["torch_engine"], 3
        )
        out = kernel_call(**kw)()
        row[f"in_band_per_target_{mode}"] = round(len(out.near_rows) / max(1, targets.numel()), 3)
    return row


def part_profile(n: int) -> dict:
    """Where a 4096-row torch-engine call spends its GPU and host time (top operators)."""
    from torch.profiler import ProfilerActivity, profile

    from extractor.lens import fused_logit_lens

    d, v = SHAPES["smollm2"]
    full = _problem(d, v, n, torch.bfloat16)
    tables = {}
    for engine in ("torch", "triton"):
        fused_logit_lens(**full.__dict__, backend=engine)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fused_logit_lens(**full.__dict__, backend=engine)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
        print(f"== profile {engine}\n{table}\n{gpu}", flush=True)
        tables[engine] = table
        tables[f"{engine}_by_gpu_time"] = gpu
    return tables


def part_kernel(n: int) -> list[dict]:
    return [_kernel_row(shape, n) for shape in SHAPES]


def part_selfcheck(n: int) -> dict:
    from extractor.lens import fused_logit_lens
    from extractor.lens.selfcheck import choose_engine

    d, v = SHAPES["smollm2"]
    full = _problem(d, v, n, torch.bfloat16)
    engines = {
        "torch": lambda x: fused_logit_lens(**x.__dict__, backend="torch"),
        "triton": lambda x: fused_logit_lens(**x.__dict__, backend="triton"),
    }
    choose_engine(full, "triton", engines)  # warm (compiles)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    check = choose_engine(full, "triton", engines)
    torch.cuda.synchronize()
    check_s = time.perf_counter() - t0
    call_ms = _bench(lambda: engines[check.engine](full))
    return {
        "selfcheck_s": round(check_s, 3),
        "engine": check.engine,
        "passed": check.passed,
        "detail": check.detail,
        "one_call_ms": round(call_ms, 3),
        "selfcheck_over_call": round(check_s * 1000 / call_ms, 1),
    }


#: (row_chunk, vocab_chunk) pairs for the torch engine on a GPU; the first (the former
#: default, before rows grew with the device's memory) is the baseline of the others.
CHUNK_SWEEP = ((4096, 16384), (8192, 16384), (16384, 16384), (8192, 49152))


def part_chunks(n: int = 16_384) -> list[dict]:
    """The torch engine's block sizes on a GPU: ms per ``n``-row call (SmolLM2 shape, bf16,
    everything asked), each pair against the first (4,096 x 16,384) in the same run, and its
    ranks and top-k ids against the first's (exact: they must not move). The engine's host
    syncs are per block, so larger blocks mean fewer of them, at more memory."""
    from extractor.lens import fused_logit_lens
    from extractor.lens.exact import default_chunks

    print(json.dumps({"default_chunks": default_chunks("cuda")}), flush=True)

    d, v = SHAPES["smollm2"]
    full = _problem(d, v, n, torch.bfloat16)
    out, first = [], None
    for rows, vocab in CHUNK_SWEEP:
        torch.cuda.reset_peak_memory_stats()

        def call(r=rows, c=vocab):
            return fused_logit_lens(**full.__dict__, backend="torch", row_chunk=r, vocab_chunk=c)

        row = {"rows": n, "row_chunk": rows, "vocab_chunk": vocab, "ms": _bench(call)}
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["over_first"] = round(row["ms"] / out[0]["ms"], 3) if out else 1.0
        # Exact at any block size: every rank and top-k id as at the first pair's.
        got = call()
        first = got if first is None else first
        row["wrong_vs_first"] = {
            k: v for k, v in _wrong(got, first.to("cpu")).items() if k != "lse_err"
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def _smollm2_model(device: str = "cuda", dtype=torch.bfloat16, layers: int = 30):
    """A SmolLM2-shaped random Llama (weights cannot travel; speed does not depend on them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49_152 + N_SPEECH,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def part_model(batch: int, seq: int) -> list[dict]:
    from extractor.lens import fused_logit_lens

    model = _smollm2_model()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    w = model.lm_head.weight
    v = w.shape[0]
    segs = _segments(v)
    rows = []
    for engine in ("triton", "torch"):

        @torch.no_grad()
        def run(engine=engine):
            out = model(input_ids=ids, output_hidden_states=True)
            for layer in out.hidden_states:
                flat = layer.reshape(-1, layer.shape[-1])
                norm = None if layer is out.hidden_states[-1] else model.model.norm
                fused_logit_lens(
                    flat,
                    norm,
                    w,
                    K,
                    segments=segs,
                    targets=ids.reshape(-1, 1),
                    backend=engine,
                )

        ms = _bench(run)
        with torch.no_grad():
            fwd = _bench(lambda: model(input_ids=ids, output_hidden_states=True))
        tokens = batch * seq
        rows.append(
            {
                "engine": engine,
                "tokens": tokens,
                "layers": 31,
                "ms": round(ms, 1),
                "forward_ms": round(fwd, 1),
                "tokens_per_s": round(tokens / ms * 1000),
                "lens_rows_per_s": round(tokens * 31 / (ms - fwd) * 1000),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


#: The worker's call (extractor/service/worker.py): per position the current, next and
#: control word's token and the next token (4 targets, -1 outside words); speech positions
#: of spoken words pooled per word (~8 unit positions a word at 25 units/s) with the three
#: word targets per group; every layer's rows in one call, layer-major.
WORKER_TARGETS, WORKER_POOL_TARGETS, WORD_POSITIONS = 4, 3, 8


def worker_inputs(hidden: torch.Tensor, w: torch.Tensor, final_norm, seed: int = 0):
    """LensInputs shaped like one worker call over ``hidden`` [layers, positions, d]."""
    from extractor.lens import LensInputs

    layers, positions, _ = hidden.shape
    v = w.shape[0]
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (positions, WORKER_TARGETS), generator=gen)
    in_word = torch.rand(positions, generator=gen) < 0.8
    targets[~in_word, :3] = -1
    # Half the positions are speech units of spoken words: groups of WORD_POSITIONS,
    # numbered densely, then per layer (as rows.pooled_groups does).
    word = torch.arange(positions) // WORD_POSITIONS
    spoken = (word % 2 == 0) & in_word
    _, dense = torch.unique(word[spoken], return_inverse=True)
    per_layer = int(dense.max()) + 1 if len(dense) else 0
    group = torch.full((positions,), -1)
    group[spoken] = dense
    layer = torch.arange(layers).repeat_interleave(positions)
    tiled = group.repeat(layers)
    pool_groups = torch.where(tiled >= 0, layer * per_layer + tiled, -1)
    pool_targets = torch.randint(0, v, (layers * per_layer, WORKER_POOL_TARGETS), generator=gen)
    device = w.device
    return LensInputs(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        unembed=w,
        k=K,
        final_norm=final_norm,
        segments=_segments(v),
        targets=targets.repeat(layers, 1).to(device),
        pool_groups=pool_groups.to(device),
        pool_targets=pool_targets.to(device),
    )


def _worker_call(batch: int, seq: int, device: str, dtype):
    """The lens inputs of one worker call over a SmolLM2-shaped random Llama's layers."""
    from extractor.models import capture_layers, model_parts

    model = _smollm2_model(device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    parts = model_parts(model)
    with torch.no_grad():
        hidden = capture_layers(parts, ids, torch.ones_like(ids, dtype=torch.bool))
    return worker_inputs(hidden, parts.unembed.detach(), parts.final_norm)


def part_profile_worker(batch: int = 8, seq: int = 512) -> dict:
    """Where the Triton engine spends the worker's call (what ``auto`` runs on CUDA): its
    pooled rows (the torch engine, on the pooled rows only) timed alone against the whole
    call, then a profile of the whole call by GPU and by host time."""
    from torch.profiler import ProfilerActivity, profile

    from extractor.lens import triton_lens as tlens

    inputs = _worker_call(batch, seq, "cuda", torch.bfloat16)
    calls = {
        "whole_s": lambda: tlens.triton_lens(inputs),
        "pooled_rows_s": lambda: tlens._pooled(inputs, None, None, True),
    }
    out = {}
    for name, fn in calls.items():
        fn()
        seconds = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        out[name] = round(min(seconds), 4)
    print(json.dumps(out), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tlens.triton_lens(inputs)
        torch.cuda.synchronize()
    for sort in ("self_cuda_time_total", "self_cpu_time_total"):
        out[sort] = prof.key_averages().table(sort_by=sort, row_limit=16)
        print(out[sort], flush=True)
    return out


def part_worker(batch: int = 8, seq: int = 512, device: str = "cuda", dtype=torch.bfloat16):
    """The engines on the worker's real call shape: what ``lens.engine: auto`` should pick.

    Every layer's residual stream as the worker captures it (``capture_layers``: block
    outputs, the final norm left to the lens) of a SmolLM2-shaped random Llama over
    ``batch x seq`` positions, the worker's targets and pooling (:func:`worker_inputs`),
    one call per engine: seconds (best of 3), peak memory of the calls, the self-check's
    seconds on these rows (may include a compile for its sample), and the Triton engine's
    ranks and top-k ids, pooled ones included, against the torch engine's (both exact:
    0 must differ).
    """
    from extractor.lens import fused_logit_lens
    from extractor.lens.selfcheck import choose_engine
    from extractor.lens.triton_lens import KERNEL_MODES, triton_lens

    inputs = _worker_call(batch, seq, device, dtype)
    engines = {
        e: (lambda x, e=e: fused_logit_lens(**x.__dict__, backend=e)) for e in ("torch", "triton")
    }
    for width in (16, 8):  # the Triton engine's column-group candidates
        kw = {**KERNEL_MODES["groups"], "group_width": width}
        engines[f"triton-groups{width}"] = lambda x, kw=kw: triton_lens(x, **kw)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out, results = [], {}
    for engine, run in engines.items():
        row = {"engine": engine, "rows": inputs.n_rows, "groups": len(inputs.pool_targets)}
        try:
            run(inputs)  # compile, warm
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                results[engine] = run(inputs)
                sync()
                seconds.append(time.perf_counter() - t0)
            # On the host, so the next engine's peak memory does not count this result.
            results[engine] = results[engine].to("cpu")
            row["s"] = round(min(seconds), 3)
            row["lens_rows_per_s"] = round(inputs.n_rows / min(seconds))
            if device == "cuda":
                row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if engine in ("torch", "triton"):  # the engines a worker may choose today
                t0 = time.perf_counter()
                check = choose_engine(inputs, engine, engines)
                sync()
                row["selfcheck_s"] = round(time.perf_counter() - t0, 3)
                row["selfcheck_passed"] = check.passed
        except Exception:  # one engine failing must not lose the other's numbers
            row["error"] = traceback.format_exc()[-1500:]
        out.append(row)
        print(json.dumps(row), flush=True)
    if "torch" in results:
        ref = results["torch"].to("cpu")
        for row in out[1:]:
            if row["engine"] in results:
                row["over_torch"] = round(row["s"] / out[0]["s"], 3)
                wrong = _wrong(results[row["engine"]], ref)
                row["vs_torch"] = {k: v for k, v in wrong.items() if k != "lse_err"}
                print(json.dumps({row["engine"]: row["vs_torch"]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=[
            "exact",
            "entry",
            "kernel",
            "chunks",
            "selfcheck",
            "model",
            "worker",
            "profile",
            "profile-worker",
        ],
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_lens.py needs a CUDA GPU")
    import triton

    props = torch.cuda.get_device_properties(0)
    results = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    print(json.dumps(results), flush=True)
    parts = {
        "exact": part_exact,
        "entry": part_entry,
        "kernel": lambda: part_kernel(args.rows),
        "chunks": part_chunks,
        "selfcheck": lambda: part_selfcheck(args.rows),
        "model": lambda: part_model(8, 512),
        "worker": part_worker,
        "profile": lambda: part_profile(args.rows),
        "profile-worker": part_profile_worker,
    }
    for name, fn in parts.items():
        if args.only and name != args.only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()[-2000:]}
            print(results[name]["error"], flush=True)
        print(f"== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
