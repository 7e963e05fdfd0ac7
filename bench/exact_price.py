"""The price of exactness: today's exact engine against an earlier revision's, same run.

    python bench/exact_price.py                       # SmolLM2 and Qwen2.5 shapes, 4096 rows
    python bench/exact_price.py --baseline caaeff2 --rows 1024 --shapes smollm2
    python bench/exact_price.py --shapes smollm2 --data smollm2    # SmolLM2-135M's rows

Checks the baseline revision out into a temporary git worktree and runs this
tree's bench/lens.py kernel measurements against each tree's engine (the same
measuring code for both), alternating, each in a fresh subprocess, best of 3
(bf16 weights; random rows and head, or SmolLM2-135M's real ones with
``--data smollm2``): ``fused`` (top-10 overall and per
segment, log-sum-exp, masses, ranks of 12 targets per row, pooled top-10 +
ranks over groups of 8 rows) and ``fused-topk`` (top-10 only, what the
explorer asks). Prints the ratio exact / baseline per method and shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The last revision before the exact engine (bf16-rounded comparisons).
DEFAULT_BASELINE = "caaeff2"


def measure(tree: Path, shape: str, rows: int, method: str, data: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    script = str(tree / "bench" / "lens.py")
    out = subprocess.run(
        [sys.executable, script, "--worker", "kernel", method, shape, str(rows), data],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "qwen2.5"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["fused", "fused-topk"],
        help="fused: the whole contract (ranks of 12 targets, pooling); fused-topk: top-10 only",
    )
    parser.add_argument("--data", choices=["random", "smollm2"], default="random")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.baseline],
            check=True,
            capture_output=True,
        )
        for name in ("lens.py", "harness.py"):  # one measuring code for both engines
            shutil.copy(ROOT / "bench" / name, old / "bench" / name)
        try:
            print(
                f"| method | shape ({args.data} rows) | rows | baseline {args.baseline} s "
                "| exact s | exact / baseline |"
            )
            print("| --- | --- | --- | --- | --- | --- |")
            for method in args.methods:
                for shape in args.shapes:
                    base = measure(old, shape, args.rows, method, args.data)
                    exact = measure(ROOT, shape, args.rows, method, args.data)
                    print(
                        f"| {method} | {shape} | {args.rows} | {base:.3f} | {exact:.3f} "
                        f"| {exact / base:.2f} |",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])


if __name__ == "__main__":
    main()
