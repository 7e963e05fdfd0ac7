"""Exact dot products of chosen (row, column) entries in one Triton launch, for CUDA.

:func:`~.exact.entry_logits` defines every exact value in the lens: float64 products
(exact for bf16, fp16 and fp32 models), summed in float64 in one fixed pairwise order
(:func:`~.exact.ordered_sum`). In torch
that is a gather, a product and log2(d) passes over [E, d] float64 temporaries: some
twenty launches per batch, which on a GPU made the torch engine host-bound (bench/README.md).

This kernel computes the same values in one launch, bit for bit. Each program loads a
few entries' rows of ``h`` and ``W`` (zero past ``d``, up to the next power of two ``DP``)
and sums the products by halving: element ``2j`` plus element ``2j + 1``, ``log2(DP)``
times. That is ``ordered_sum``'s order: its zero appended at a level of odd width is one
of these trailing zeros, and ``x + 0 == x``. ``enable_fp_fusion=False`` keeps every
product and sum its own IEEE operation.

Its products are float64 like torch's. An fp32 product path (exact for bf16/fp16 inputs in
fp32's normal range, so the same values) made Triton
3.6 put a whole 1,024-wide row in each thread (2,806 spilled registers on an H200): 20.5 ms
against torch's 0.74 ms, where float64 products take 0.088 ms (bench/README.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Float64 products each program holds ([entries, DP]): 4096 keeps a program's registers
#: at 32 doubles per thread with 4 warps, for any width.
PROGRAM_PRODUCTS = 4096


@triton.jit
def _entry_dots_kernel(
    H,
    W,
    ROWS,
    COLS,
    OUT,
    E,
    D,
    stride_h,
    stride_w,
    DP: tl.constexpr,
    LEVELS: tl.constexpr,
    BE: tl.constexpr,
):
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    live = e < E
    r = tl.load(ROWS + e, mask=live, other=0)
    c = tl.load(COLS + e, mask=live, other=0)
    k = tl.arange(0, DP)
    mask = live[:, None] & (k < D)[None, :]
    h = tl.load(H + r[:, None] * stride_h + k[None, :], mask=mask, other=0.0)
    w = tl.load(W + c[:, None] * stride_w + k[None, :], mask=mask, other=0.0)
    p = h.to(tl.float64) * w.to(tl.float64)
    for level in tl.static_range(LEVELS):
        pairs = tl.reshape(p, (BE, DP >> (level + 1), 2))
        even, odd = tl.split(pairs)
        p = even + odd
    tl.store(OUT + e, tl.reshape(p, (BE,)), mask=live)


def entry_dots(
    h: torch.Tensor, unembed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Float64 ``sum_i h[rows[e], i] * unembed[cols[e], i]`` [E], in ``ordered_sum``'s order,
    from exact products: :func:`~.exact.entry_dots_torch`'s values bit for bit."""
    e, d = len(rows), h.shape[1]
    out = torch.empty(e, dtype=torch.float64, device=h.device)
    if e == 0:
        return out
    h, unembed = h.contiguous(), unembed if unembed.stride(1) == 1 else unembed.contiguous()
    dp = 1 << max(0, (d - 1).bit_length())
    be = max(1, min(64, PROGRAM_PRODUCTS // dp))
    _entry_dots_kernel[(triton.cdiv(e, be),)](
        h,
        unembed,
        rows.contiguous(),
        cols.contiguous(),
        out,
        e,
        d,
        h.stride(0),
        unembed.stride(0),
        DP=dp,
        LEVELS=dp.bit_length() - 1,
        BE=be,
        enable_fp_fusion=False,
    )
    return out
