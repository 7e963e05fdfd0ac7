"""Does this CPU's VDPBF16PS round as the lens' bf16-mode band assumes? (docs/lens.md)

The torch engine may run a bf16 model's fast-logit GEMM in oneDNN's bf16 mode
(``chunked.BF16_MATH``) with the IEEE band. That rests on one property of the
instruction that sums bf16 products into fp32: each addition rounds to nearest
(Intel's SDM: accumulator + odd product, rounded, then + even product, rounded).
This compiles a small C probe with the system's compiler, runs 2,000,000 random
VDPBF16PS lanes (exponents spread up to +-20, accumulators of either sign, so
additions cancel and round), and counts the results equal, bit for bit, to:

  sdm     (acc + odd) + even, each rounded to nearest (the SDM's order)
  other   (acc + even) + odd
  single  acc + odd + even rounded once

It also prints the largest ``|error| / (u sum|terms|)`` (at most 2 for two
roundings to nearest). Needs AVX-512 BF16 (``avx512_bf16`` in /proc/cpuinfo).

    python bench/bf16_rounding.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from extractor.lens.cpu_exact import compiler

PROBE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static uint64_t state = 88172645463325252ull;
static uint64_t next(void) {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state;
}
static float widen(uint16_t x) {
    uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f;
}
static uint16_t random_bf16(int spread) {
    int e = 127 + (int)(next() % (2 * spread + 1)) - spread;
    return (uint16_t)(((next() & 1) << 15) | (e << 7) | (next() & 0x7f));
}

int main(void) {
    long total = 0, sdm = 0, other = 0, single = 0;
    double worst = 0;
    for (long it = 0; it < 125000; it++) {
        int spread = 1 + it % 20;
        uint16_t a[32], b[32];
        float acc[16], out[16];
        for (int i = 0; i < 32; i++) { a[i] = random_bf16(spread); b[i] = random_bf16(spread); }
        for (int i = 0; i < 16; i++)
            acc[i] = widen(random_bf16(spread)) * widen(random_bf16(spread))
                     * ((next() & 1) ? 1.0f : 3.0f);
        __m512bh va, vb;
        memcpy(&va, a, 64);
        memcpy(&vb, b, 64);
        _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), va, vb));
        for (int i = 0; i < 16; i++) {
            float even = widen(a[2 * i]) * widen(b[2 * i]);  /* exact: 8 x 8 bits */
            float odd = widen(a[2 * i + 1]) * widen(b[2 * i + 1]);
            volatile float t1 = acc[i] + odd, t2 = acc[i] + even;
            float by_sdm = t1 + even, by_other = t2 + odd;
            double exact = (double)acc[i] + (double)even + (double)odd;
            total++;
            sdm += out[i] == by_sdm;
            other += out[i] == by_other;
            single += out[i] == (float)exact;
            double terms = fabs(acc[i]) + fabs(even) + fabs(odd);
            double ratio = fabs((double)out[i] - exact) / (terms * ldexp(1, -24));
            if (ratio > worst) worst = ratio;
        }
    }
    printf("%ld %ld %ld %ld %.4f\n", total, sdm, other, single, worst);
    return 0;
}
"""


def main() -> None:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = info.split()
    if "avx512_bf16" not in flags:
        raise SystemExit("this CPU has no AVX-512 BF16 (VDPBF16PS): nothing to probe")
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "probe.c", Path(tmp) / "probe"
        source.write_text(PROBE)
        cmd = [*compiler(), "-O2", "-mavx512f", "-mavx512bf16", "-ffp-contract=off"]
        subprocess.run([*cmd, "-o", str(binary), str(source), "-lm"], check=True)
        out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    total, sdm, other, single, worst = out.split()
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    print(f"CPU: {model.split(':', 1)[-1].strip()}")
    print("| lanes | = SDM order | = other order | = one rounding | max err / (u sum|terms|) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {total} | {sdm} | {other} | {single} | {worst} |")
    if sdm != total:
        print("VDPBF16PS does NOT round as the SDM says here: the bf16-mode band is unproven")


if __name__ == "__main__":
    main()
