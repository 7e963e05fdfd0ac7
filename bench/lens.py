"""How fast is the fused lens, against the GEMM floor, the naive recipe and nnsight?

    python bench/lens.py                     # everything (~10 minutes on 2 cores)
    python bench/lens.py --rows 1024 --skip-e2e
    python bench/lens.py --skip-e2e --shapes smollm2 --data smollm2   # real rows and head

Part 1, kernel level, at SmolLM2 (d=576, V=49,152) and Qwen2.5 (d=896,
V=152,167) shapes, bf16 weights:
  floor   the bare bf16 GEMM of the same size (full [rows x V] logits, nothing else)
  fused   slm-lens' engine: top-10 over the vocabulary and per segment, log-sum-exp,
          segment masses, exact ranks + log-probs of 12 targets per row, and
          max-pooled top-10 + ranks over groups of 8 rows
  fused-topk  the engine asked only for what the naive recipe gives (top-10)
  naive   the usual recipe: full fp32 logits, log_softmax, topk(10)
Part 2, end to end: an all-layer logit lens (31 layers, top-10 per position) over
SmolLM2 on the same 512-token text: slm-lens (bf16, hooks + fused engine),
nnsight's logit-lens recipe (fp32 as in its tutorial, and bf16), and a plain
output_hidden_states loop.

Each measurement runs in its own subprocess (for its peak memory); times are the
best of 3 after a warm-up; every ratio compares numbers from this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import PeakRss, best_of, run_worker, table

SHAPES = {"smollm2": (576, 49_152), "qwen2.5": (896, 152_167)}
N_SPEECH = 502  # a SIMS-like speech segment at the end of the vocabulary
TARGETS, POOL, POOL_TARGETS, K = 12, 8, 4, 10


def smollm2_rows(n: int):
    """(rows [n, 576], final norm, unembedding) of SmolLM2-135M in bf16: ``n`` rows drawn
    (seed 0) from every layer's hidden states over :data:`PARAGRAPH`'s first 512 tokens
    (15,872 rows; repeated when more are asked). Real rows differ from random ones where
    exactness costs: how many candidates and entries fall inside the band."""
    import torch
    from transformers import AutoTokenizer

    from extractor.models import capture_layers, load_causal_lm, model_parts
    from extractor.models.smollm2 import ensure_smollm2

    path = ensure_smollm2()
    ids = AutoTokenizer.from_pretrained(path)(PARAGRAPH * 40, return_tensors="pt").input_ids
    parts = model_parts(load_causal_lm(path, dtype=torch.bfloat16))
    ids = ids[:, :512]
    hidden = capture_layers(parts, ids, torch.ones_like(ids, dtype=torch.bool)).flatten(0, 1)
    pick = torch.randperm(len(hidden), generator=torch.Generator().manual_seed(0))
    pick = pick.repeat(-(-n // len(hidden)))[:n]
    return hidden[pick].clone(), parts.final_norm, parts.unembed.detach()


def kernel_worker(method: str, shape: str, rows: int, data: str = "random") -> dict:
    import torch

    from extractor.lens import VocabSegments, fused_logit_lens

    torch.manual_seed(0)
    d, v = SHAPES[shape]
    norm, real = None, None
    if data == "smollm2":
        if shape != "smollm2":
            raise SystemExit("--data smollm2 needs --shapes smollm2")
        real, norm, w = smollm2_rows(rows)
    else:
        w = (torch.randn(v, d) / d**0.5 * 4).bfloat16()
    segments = VocabSegments.from_ranges(v, {"speech": [(v - N_SPEECH, v)]})

    def make(n: int):
        h = torch.randn(n, d).bfloat16() if real is None or n > len(real) else real[:n]
        targets = torch.randint(0, v, (n, TARGETS))
        groups = torch.arange(n) // POOL
        pool_targets = torch.randint(0, v, ((n + POOL - 1) // POOL, POOL_TARGETS))
        if method == "floor":
            return lambda: h @ w.T  # the bare GEMM (no norm), whatever the data
        if method == "fused":
            return lambda: fused_logit_lens(
                h,
                norm,
                w,
                K,
                segments=segments,
                targets=targets,
                pool_groups=groups,
                pool_targets=pool_targets,
            )
        if method == "fused-topk":
            return lambda: fused_logit_lens(h, norm, w, K)
        normed = h if norm is None else norm(h)
        if method == "naive":
            return lambda: torch.log_softmax((normed @ w.T).float(), dim=-1).topk(K, dim=-1)
        raise SystemExit(f"unknown method {method}")

    make(8)()  # compile and initialise on a tiny input, so it cannot hide the real peak
    fn = make(rows)
    with PeakRss() as mem:
        fn()
    seconds = best_of(fn, repeats=3, warmup=0)
    return {"seconds": seconds, "peak_mb": mem.growth_mb}


PARAGRAPH = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting each of the "
    "one hundred and twelve steps, while the sea below rolled grey and patient against the "
    "rocks. In the village people said he had not missed a single night in forty years. "
)


def e2e_worker(method: str, tokens: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from extractor.lens import fused_logit_lens
    from extractor.models import capture_layers, load_causal_lm, model_parts
    from extractor.models.smollm2 import ensure_smollm2

    torch.manual_seed(0)
    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PARAGRAPH * 40, return_tensors="pt").input_ids[:, :tokens]
    dtype = torch.float32 if method in ("nnsight-fp32", "naive-fp32") else torch.bfloat16
    model = load_causal_lm(path, dtype=dtype)

    if method.startswith("slm-lens"):
        parts = model_parts(model)
        select = torch.ones_like(ids, dtype=torch.bool)

        def fn():
            hidden = capture_layers(parts, ids, select)
            return fused_logit_lens(
                hidden.flatten(0, 1), parts.final_norm, parts.unembed, K
            ).topk_ids
    elif method.startswith("nnsight"):
        from nnsight import LanguageModel

        lm = LanguageModel(model, tokenizer=tok)

        def fn():
            # The logit-lens recipe of nnsight's tutorial, with top-k instead of max.
            saved = []
            with torch.no_grad(), lm.trace(ids):
                for layer in lm.model.layers:
                    out = layer.output[0] if isinstance(layer.output, tuple) else layer.output
                    probs = torch.nn.functional.softmax(lm.lm_head(lm.model.norm(out)), dim=-1)
                    saved.append(probs.topk(K, dim=-1).indices.save())
            return saved
    elif method.startswith("naive"):

        def fn():
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
                tops = []
                for h in out.hidden_states[:-1]:  # the last entry is already normed
                    logits = model.lm_head(model.model.norm(h)).float()
                    tops.append(torch.log_softmax(logits, -1).topk(K, -1).indices)
                tops.append(torch.log_softmax(model.lm_head(out.hidden_states[-1]).float(), -1))
            return tops
    else:
        raise SystemExit(f"unknown method {method}")
    fn()
    with PeakRss() as mem:
        fn()
    seconds = best_of(fn, repeats=2, warmup=0)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mb": mem.growth_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument(
        "--data",
        choices=["random", "smollm2"],
        default="random",
        help="kernel part: random rows and head, or SmolLM2-135M's (--shapes smollm2)",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, method, *rest = args.worker
        if kind == "kernel":
            result = kernel_worker(method, rest[0], int(rest[1]), *rest[2:])
        else:
            result = e2e_worker(method, int(rest[0]))
        print(json.dumps(result))
        return

    script = os.path.abspath(__file__)
    if not args.skip_kernel:
        rows_out = []
        for shape in args.shapes:
            for rows in args.rows:
                res = {
                    m: run_worker(script, "kernel", m, shape, str(rows), args.data)
                    for m in ("floor", "fused", "fused-topk", "naive")
                }
                floor, naive = res["floor"], res["naive"]
                for m, r in res.items():
                    rows_out.append(
                        {
                            "shape": shape,
                            "rows": rows,
                            "method": m,
                            "ms": r["seconds"] * 1e3,
                            "x_floor": r["seconds"] / floor["seconds"],
                            "naive_speedup": naive["seconds"] / r["seconds"],
                            "peak_mb": r["peak_mb"],
                            "naive_mem_ratio": naive["peak_mb"] / max(r["peak_mb"], 1e-3),
                        }
                    )
                print(table(rows_out[-4:], list(rows_out[-1])), flush=True)
                print(flush=True)
    if not args.skip_e2e:
        res = {
            m: run_worker(script, "e2e", m, str(args.tokens))
            for m in ("slm-lens-bf16", "nnsight-fp32", "nnsight-bf16", "naive-fp32")
        }
        ours = res["slm-lens-bf16"]["tokens_per_s"]
        rows_out = [
            {
                "method": m,
                "tokens_per_s": r["tokens_per_s"],
                "peak_mb": r["peak_mb"],
                "slm_lens_speedup": ours / r["tokens_per_s"],
            }
            for m, r in res.items()
        ]
        print(f"all-layer logit lens over SmolLM2-135M, {args.tokens} tokens, 31 layers, top-{K}")
        print(table(rows_out, list(rows_out[0])))


if __name__ == "__main__":
    main()
