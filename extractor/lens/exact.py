"""Exact lens logits, and the proven error band of the fast fp32-accumulated ones.

The definition (docs/lens.md): a row's exact logits are the float64 product of
the row *as the model's final norm emits it, in the model's dtype* with the
unembedding in the model's dtype, plus the bias, through the soft-cap. Every
engine computes exact values with :func:`entry_logits` only, so a target and a
competitor with equal exact logits (duplicate unembedding rows) always get
bit-identical values: ties never push a rank down.

The fast pass computes ``h @ W^T`` in fp32 instead. For any summation order,
``|fl32(h . w) - h . w| <= gamma_d * sum_i |h_i w_i| <= gamma_d * ||h|| ||w||``
(Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 3.5); summed in
K-blocks the factor shrinks (:func:`gemm_error_factor`). :func:`error_band` turns
that into a per-row half-width, adding the rounding of the fp32 bias addition
and soft-cap, so an entry whose fast logit lies outside ``[t - band, t + band]``
is certainly above or certainly not above the exact value ``t``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch

from .contract import LensInputs

#: Unit roundoff of fp32, the accumulator of every fast GEMM.
U32 = 2.0**-24
#: fp32's smallest normal number: below it products and sums lose absolute, not relative,
#: precision, or are flushed to zero (tensor cores, AMX, oneDNN's DAZ/FTZ modes).
TINY32 = 2.0**-126
#: Entries per batch of exact dot products (bounds the [E, d] float64 temporaries); a GPU
#: takes 32x more per batch, where each batch's launches, not its arithmetic, set the time.
ENTRY_BATCH = 2048
CUDA_ENTRY_BATCH = 32 * ENTRY_BATCH


#: Block sizes (rows, vocabulary entries) by device type. A CPU keeps [512 x 8192] fp32
#: blocks (16 MB, near its caches). On a GPU each block's few dozen launches and host syncs,
#: not its arithmetic, set the time: at the CPU's sizes an H200 spent 290 ms on a 4096-row
#: call whose GEMM takes under 1 ms. There the row chunk grows with the device's memory
#: (:func:`cuda_row_chunk`); this is the smallest.
CHUNKS = {"cpu": (512, 8192), "cuda": (4096, 16384)}

#: Row chunks a GPU may take, largest first. On an H200 a 16,384-row call took 0.46x the
#: time at 16,384 rows per block as at 4,096 (0.56x at 8,192), at 3.7 GB peak against 1.2
#: (bench/README.md, the second of two runs; the first gave 0.55x and 0.73x).
CUDA_ROW_CHUNKS = (16384, 8192, 4096)

#: Bytes a GPU block needs per entry, with margin: that run peaked at 3.6 GB for
#: [16,384 x 16,384] blocks (about 13 bytes per entry: two fp32 buffers, the band mask,
#: the compiled pass's temporaries).
CUDA_BLOCK_BYTES_PER_ENTRY = 16

#: Share of the device's memory one block may take: the model, every layer's hidden
#: states and the caller's own tensors live there too.
CUDA_BLOCK_MEMORY_SHARE = 1 / 16


def cuda_row_chunk(total_memory: int, vocab_chunk: int) -> int:
    """The largest of :data:`CUDA_ROW_CHUNKS` whose block fits the memory share: at the
    default vocabulary chunk, 16,384 rows from 64 GiB (80 GB cards and larger), 8,192 from
    32 GiB (40-48 GB), else 4,096 (a 32 GB card included)."""
    budget = total_memory * CUDA_BLOCK_MEMORY_SHARE
    for rows in CUDA_ROW_CHUNKS:
        if rows * vocab_chunk * CUDA_BLOCK_BYTES_PER_ENTRY <= budget:
            return rows
    return CUDA_ROW_CHUNKS[-1]


def default_chunks(device: torch.device | str, vocab_chunk: int | None = None) -> tuple[int, int]:
    """(row_chunk, vocab_chunk) for a device: :data:`CHUNKS`, the CPU's for any other
    type; on CUDA the row chunk by the device's memory for ``vocab_chunk`` (the caller's,
    or the default) (:func:`cuda_row_chunk`)."""
    device = torch.device(device)
    rows, vocab = CHUNKS.get(device.type, CHUNKS["cpu"])
    vocab = vocab_chunk or vocab
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        rows = cuda_row_chunk(total, vocab)
    return rows, vocab


#: Width of the K-blocks of the fast GEMM (see :func:`gemm_error_factor`).
K_BLOCK = 128


def gemm_error_factor(d: int, block: int = K_BLOCK) -> float:
    """``c`` with ``|fast - exact| <= c ||h|| ||w||`` for the fast GEMM of width ``d``.

    The fast GEMM (``chunked.chunk_logits``) sums ``ceil(d / block)`` fp32 products of
    ``block``-wide slices with plain fp32 additions: each product errs by at most
    ``gamma_block`` times its slice of ``sum |h_i w_i|``, the additions by
    ``gamma_(blocks - 1)`` times the sum of the products' magnitudes, and
    ``sum |h_i w_i| <= ||h|| ||w||``. For d = 576 that is 132u instead of 576u.
    """
    blocks = -(-max(d, 1) // block)
    inner = gamma(min(d, block))
    return inner + gamma(blocks - 1) * (1 + inner) if blocks > 1 else inner


#: Width of the Triton kernel's K-slices on a GPU (its ``BK``; the interpreter's is smaller).
MMA_BLOCK_K = 64


def mma_error_factor(d: int, block: int = MMA_BLOCK_K) -> float:
    """``c`` with ``|fast - exact| <= c ||h|| ||w||`` for the Triton kernel's GEMM of width ``d``.

    The kernel sums ``ceil(d / block)`` matrix-unit dot products of ``block``-wide slices
    with plain fp32 additions (round to nearest), like :func:`gemm_error_factor`. A matrix
    unit's own fp32 accumulation is not IEEE: NVIDIA tensor cores align the significands of
    a fused multi-term sum to the largest exponent and truncate (Fasi, Higham, Mikaitis and
    Pranesh, *Numerical behavior of NVIDIA tensor cores*, PeerJ CS 2021). With fused sums of
    ``m`` products plus the accumulator, each term loses under one ulp of the largest and the
    normalisation one more: at most ``2u (m + 2) / m`` per product of the slice's
    ``sum |h_i w_i|``, which for ``m >= 4`` (every tensor core) is at most ``3u`` per product.
    The bound takes ``4 gamma_block`` for a slice: that, with margin, and also the IEEE fp32
    dots (``gamma_block``) the kernel asks for fp32 inputs. The self-check on the device that
    runs the kernel is what stands behind this model of the hardware.
    """
    blocks = -(-max(d, 1) // block)
    inner = 4 * gamma(min(d, block))
    return inner + gamma(blocks - 1) * (1 + inner) if blocks > 1 else inner


def gamma(d: int) -> float:
    """``gamma_d = d u / (1 - d u)`` for fp32, with a 0.1% margin for the bound's own rounding."""
    nu = max(d, 0) * U32
    if nu >= 0.5:
        raise ValueError(f"hidden width {d} is too large for an fp32 error bound")
    return nu / (1 - nu) * (1 + 2**-10)


_MEMO: dict[tuple, tuple] = {}
T = TypeVar("T")


def remembered(tensor: torch.Tensor, key: tuple, compute: Callable[[], T]) -> T:
    """``compute()`` remembered while ``tensor`` is the same, unchanged object (identity and
    version counter): facts about an actor's W are computed once, not on every call."""
    slot = (id(tensor), *key)
    cached = _MEMO.get(slot)
    if cached is not None and cached[0]() is tensor and cached[1] == tensor._version:
        return cached[2]
    value = compute()
    # Entries of tensors that no longer exist go first: some hold [V]-sized device tensors.
    for dead in [s for s, entry in _MEMO.items() if entry[0]() is None]:
        del _MEMO[dead]
    if len(_MEMO) > 4096:
        _MEMO.clear()
    _MEMO[slot] = (weakref.ref(tensor), tensor._version, value)
    return value


def ordered_sum(products: torch.Tensor) -> torch.Tensor:
    """Float64 sums over the last axis in one fixed pairwise order, on any device and shape.

    ``sum(-1, dtype=float64)`` lets the device choose the order: on CUDA it splits the
    axis over more threads when fewer sums are asked (fp32 products carry 48 bits, so the
    float64 sum rounds, and a target and its exact duplicate computed in calls of
    different sizes could differ by an ulp, a tie broken). Adding neighbours, halving the
    axis each time (a zero appended at a level of odd width), fixes the order by the width
    alone, at about the cost of one reduction.
    """
    x = products.double()
    if x.shape[-1] == 0:
        return x.sum(-1)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (0, 1))
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def entry_logits(
    h_rows: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    inputs: LensInputs,
) -> torch.Tensor:
    """Exact float64 logits of the entries ``(rows[e], cols[e])``: [E].

    ``h_rows`` [R, d] holds the normed rows in the model's dtype. One arithmetic for
    every exact value in the engine: products in float64, exact for bf16, fp16 and fp32
    models (at most 24 + 24 significant bits, and no product of fp32 values leaves
    float64's range; a float64 head's products round, the same way in every engine and
    the reference), each sum in float64 in the same order for every entry
    (:func:`ordered_sum`).
    """
    if h_rows.is_cuda and inputs.unembed.is_cuda:
        dots = entry_dots_cuda(h_rows, inputs.unembed, rows, cols)
    else:
        dots = entry_dots_cpu(h_rows, inputs.unembed, rows, cols)
    return finish(dots, cols, inputs)


def entry_dots_torch(
    h_rows: torch.Tensor, unembed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """:func:`entry_logits`' dot products [E] in torch, in batches of [E, d] products: the
    definition the compiled kernels match bit for bit, and their fallback.

    ``index_select`` gathers, and products formed in float64 straight from the model's
    dtype: 1.5x faster than indexing and fp32 products copied to float64 (bench/README.md).
    """
    h = h_rows.double()
    out = torch.empty(len(rows), dtype=torch.float64, device=h_rows.device)
    batch = CUDA_ENTRY_BATCH if h_rows.device.type == "cuda" else ENTRY_BATCH
    for a in range(0, len(rows), batch):
        b = min(a + batch, len(rows))
        products = torch.index_select(h, 0, rows[a:b])
        products.mul_(torch.index_select(unembed, 0, cols[a:b]))
        out[a:b] = ordered_sum(products)
    return out


#: Compiled kernels that failed to build in this process (each warned once), or that the
#: self-check found disagreeing with the reference (:func:`set_kernel_enabled`).
_FAILED_KERNELS: set[str] = set()
TRITON_DOTS = "Triton kernel for exact lens values"
C_DOTS = "C loop for exact lens values"
#: oneDNN's IEEE fp32 GEMM for the fast logits, beside torch's own (``chunked.chunk_logits``).
ONEDNN_GEMM = "oneDNN fp32 GEMM for fast lens logits"
#: The VDPBF16PS GEMM for the fast logits of bf16 models on a CPU (:mod:`.cpu_gemm`).
BF16_GEMM = "AVX-512 BF16 GEMM for fast lens logits"
#: The C loop over a block of fast logits (:mod:`.cpu_pass`): maxima, exp-sums, the counts
#: above each target's band and the entries inside it.
C_PASS = "C loop for the lens pass over fast logits"


def device_kernels(device: torch.device | str) -> list[str]:
    """What the torch engine on ``device`` trusts beyond torch's IEEE ops: its exact-values
    kernel and, on a CPU, oneDNN's GEMM, the AVX-512 BF16 one and the C pass. The
    self-check can turn each off."""
    if torch.device(device).type == "cuda":
        return [TRITON_DOTS]
    return [C_DOTS, ONEDNN_GEMM, BF16_GEMM, C_PASS]


def kernel_enabled(name: str) -> bool:
    """Whether ``name`` may run in this process (it has neither failed to build nor been
    turned off)."""
    return name not in _FAILED_KERNELS


def set_kernel_enabled(name: str, enabled: bool) -> None:
    """Turn a kernel off (torch's own ops instead, from then on, in this process) or back
    on: what the self-check does when the engine disagrees with the reference on its
    device."""
    if enabled:
        _FAILED_KERNELS.discard(name)
    else:
        _FAILED_KERNELS.add(name)


def compiled_or(
    name: str,
    kernel: Callable[[], T],
    fallback: Callable[[], T],
    failures: type[BaseException] | tuple[type[BaseException], ...],
) -> T:
    """``kernel()``, or ``fallback()`` (torch's ops: the same results, slower) once the
    kernel has failed to build with one of ``failures``: one warning a process."""
    if kernel_enabled(name):
        try:
            return kernel()
        except failures as exc:
            _FAILED_KERNELS.add(name)
            warnings.warn(
                f"the {name} failed ({type(exc).__name__}: {exc}); using torch's ops",
                stacklevel=3,
            )
    return fallback()


def entry_dots_cuda(h_rows, unembed, rows, cols) -> torch.Tensor:
    """The same values from one Triton launch (:mod:`.triton_exact`): torch's ops made a
    GPU call host-bound. Without Triton, or if its compile fails (one warning), torch's."""

    def kernel() -> torch.Tensor:
        from .triton_exact import entry_dots

        return entry_dots(h_rows, unembed, rows, cols)

    # Triton's failures to import or compile come in many types.
    return compiled_or(
        TRITON_DOTS,
        kernel,
        partial(entry_dots_torch, h_rows, unembed, rows, cols),
        Exception,
    )


def entry_dots_cpu(h_rows, unembed, rows, cols) -> torch.Tensor:
    """The same values from one compiled C loop (:mod:`.cpu_exact`): 4.8x to 9.6x faster
    than torch's ops at d = 576 on AMD EPYC (bench/README.md, "Stop 21"). Without a C
    compiler (one warning), torch's."""
    from . import cpu_exact

    fallback = partial(entry_dots_torch, h_rows, unembed, rows, cols)
    if not cpu_exact.supports(h_rows, unembed):
        return fallback()
    return compiled_or(
        C_DOTS,
        lambda: cpu_exact.entry_dots(h_rows, unembed, rows, cols),
        fallback,
        (cpu_exact.KernelUnavailable, OSError),
    )


def dense_logits(h_rows: torch.Tensor, inputs: LensInputs) -> torch.Tensor:
    """Exact float64 logits [R, V] of every entry, with :func:`entry_logits`' arithmetic.

    What the float64 reference materialises: the same products and the same
    float64 reduction as the engines, so a near-tie below float64 resolution
    (a saturated soft-cap, or fp32 products whose sum rounds) is decided the
    same way everywhere.
    """
    h = h_rows.double()
    r, v, d = len(h), inputs.vocab_size, h.shape[1]
    out = torch.empty((r, v), dtype=torch.float64, device=h.device)
    step = max(1, (1 << 23) // max(1, r * d))  # ~64 MB of products at a time
    if d < 2:  # ordered_sum of one product is the product; of none, zero
        for c0 in range(0, v, step):
            out[:, c0 : c0 + step] = ordered_sum(
                h[:, None, :] * inputs.unembed[None, c0 : c0 + step]
            )
        return finish(out, torch.arange(v, device=h.device)[None, :], inputs)
    # ordered_sum's first halving, (h0 w0) + (h1 w1), done on the products as they are made
    # (an odd d's last product plus 0.0, as its padding adds): half the float64 temporaries,
    # 1.8x faster for the self-check's reference, the same bits.
    pad = d % 2
    h_even = h[:, None, 0::2]
    h_odd = torch.nn.functional.pad(h[:, 1::2], (0, pad))[:, None, :]
    for c0 in range(0, v, step):
        w = inputs.unembed[None, c0 : c0 + step].double()
        w_odd = torch.nn.functional.pad(w[..., 1::2], (0, pad))
        out[:, c0 : c0 + step] = ordered_sum(h_even * w[..., 0::2] + h_odd * w_odd)
    cols = torch.arange(v, device=h.device)
    return finish(out, cols[None, :], inputs)


def finish(x64: torch.Tensor, cols: torch.Tensor, inputs: LensInputs) -> torch.Tensor:
    """Bias and soft-cap in float64, exactly as :func:`reference_logits` applies them."""
    if inputs.bias is not None:
        x64 = x64 + inputs.bias.double()[cols]
    if inputs.softcap is not None:
        x64 = inputs.softcap * torch.tanh(x64 / inputs.softcap)
    return x64


def target_logits(
    h_rows: torch.Tensor,
    ids: torch.Tensor,
    inputs: LensInputs,
) -> torch.Tensor:
    """Exact logits [R, T] of ``ids`` [R, T]; pads (-1) give +inf (never above anything)."""
    r, t = ids.shape
    if ids.numel() == 0:
        return torch.empty((r, t), dtype=torch.float64, device=h_rows.device)
    rows = torch.arange(r, device=ids.device).repeat_interleave(t)
    flat = ids.reshape(-1)
    vals = entry_logits(h_rows, rows, flat.clamp(min=0), inputs).view(r, t)
    return torch.where(ids >= 0, vals, torch.inf)


#: Unit roundoff of the GEMM *output* when it is rounded to the model's dtype.
OUTPUT_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rank_free_low_precision(inputs: LensInputs) -> bool:
    """True when a call asks no ranks and the model is bf16/fp16.

    Then the fast logits come from a GEMM in the model's dtype (its output rounded
    to 8 or 11 bits: up to 8x cheaper than fp32 on CPUs with AMX): top-k stays exact
    through certification, only the band is wider.
    """
    no_targets = inputs.targets is None or inputs.targets.shape[1] == 0
    no_pooled = inputs.pool_targets is None or inputs.pool_targets.shape[1] == 0
    return no_targets and no_pooled and inputs.unembed.dtype in OUTPUT_ROUNDING


def error_band(
    row_norms: torch.Tensor,
    w_norm_max: float,
    d: int,
    bias_max: float,
    softcap: float | None,
    output_dtype: torch.dtype | None = None,
    output_max: torch.Tensor | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """Per-row half-width [R] (float64) of ``|fast - exact|`` for one vocabulary chunk.

    ``row_norms``: float64 L2 norms of the normed rows; ``w_norm_max``: an upper bound
    of the chunk's unembedding-row norms; ``bias_max``: the chunk's largest finite |bias|.
    With ``output_dtype`` (bf16/fp16) the GEMM (one, not K-sliced, fp32 accumulation)
    rounded its output to that dtype: add its unit roundoff times ``output_max``
    (the rows' largest |output|, default the Cauchy-Schwarz bound) plus fp16's
    subnormal spacing. ``factor`` replaces the GEMM's own (default: the torch engine's
    K-sliced fp32 GEMM, :func:`gemm_error_factor`).
    """
    scale = row_norms * w_norm_max
    if factor is None:
        factor = gemm_error_factor(d) if output_dtype is None else gamma(d)
    band = factor * scale + underflow_error(d, row_norms, w_norm_max)
    if output_dtype is not None:
        top = scale * (1 + factor) if output_max is None else output_max.double()
        band = band + OUTPUT_ROUNDING[output_dtype] * (1 + 2**-6) * top + 2.0**-24
    if bias_max or softcap is not None:
        # fl32(x + b) rounds once more, by at most u |x + b| <= u (||h|| ||w|| + |b|).
        band = band + 2 * U32 * (scale * (1 + factor) + bias_max)
    if softcap is not None:
        # c * tanh(x / c) is 1-Lipschitz in x; its own fp32 division, tanh and product
        # add a few ulp of max(c, |x / c|) each: 16 ulp of (c + |x|) covers them.
        band = band + 16 * U32 * (softcap + scale + bias_max)
    return band


def underflow_error(d: int, row_norms: torch.Tensor, w_norm_max: float) -> torch.Tensor:
    """What fp32's lower range can add to ``|fast - exact|``, beyond the relative bound.

    A product or sum below :data:`TINY32` loses up to ``TINY32`` (flushed to zero, or
    rounded to a subnormal): ``2 (d + 2)`` such operations with the bias and soft-cap. An
    input below it flushed to zero (DAZ) drops ``|h_i w_i| < TINY32 (|h_i| + |w_i|)`` per
    term, at most ``TINY32 sqrt(d) (||h|| + ||w||)`` in all. Later roundings grow each
    loss by at most ``1 + gamma_d``. Negligible for real logits; without it, hidden
    states of 2^-70 gave wrong ranks.
    """
    terms = 2 * (d + 2) + d**0.5 * (row_norms + w_norm_max)
    return TINY32 * terms * (1 + gamma(d)) * (1 + 2**-10)


def round_up_f32(x64: torch.Tensor) -> torch.Tensor:
    """Smallest fp32 value >= each float64 value."""
    q = x64.float()
    return torch.where(q.double() < x64, torch.nextafter(q, torch.full_like(q, torch.inf)), q)


def round_down_f32(x64: torch.Tensor) -> torch.Tensor:
    """Largest fp32 value <= each float64 value."""
    q = x64.float()
    return torch.where(q.double() > x64, torch.nextafter(q, torch.full_like(q, -torch.inf)), q)


def thresholds(t64: torch.Tensor, band: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(lo, hi)`` [R, T] around exact values ``t64`` [R, T] for per-row ``band`` [R].

    A fast logit ``> hi`` is certainly strictly above ``t``; one ``< lo`` certainly is
    not; only ``lo <= fast <= hi`` needs its exact value. Pads (``+inf``) give
    ``lo = hi = +inf``: no entry is counted for them.
    """
    b = band[:, None]
    with torch.no_grad():
        hi = round_up_f32(torch.where(torch.isfinite(t64), t64 + b, t64))
        lo = round_down_f32(torch.where(torch.isfinite(t64), t64 - b, t64))
    return lo, hi


def unembed_norm_max(unembed: torch.Tensor, start: int, stop: int) -> float:
    """An upper bound of ``max ||W[j]||`` over ``[start, stop)`` (remembered per W), from
    :func:`unembed_row_norms`."""
    if stop <= start:
        return 0.0
    return remembered(
        unembed, ("norm", start, stop), lambda: float(unembed_row_norms(unembed)[start:stop].max())
    )


def unembed_row_norms(unembed: torch.Tensor) -> torch.Tensor:
    """Upper bounds [V] (float64) of every ``||W[j]||`` (remembered per W)."""
    return remembered(unembed, ("row norms",), lambda: _row_norms(unembed))


def _row_norms(rows: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Upper bounds of each row's norm: scaled by its largest |entry| first, so tiny or
    huge rows neither underflow nor overflow fp32; the fp32 rounding is covered by the
    inflation. A block of rows at a time: fp32 copies of a whole W would cost GBs."""
    out = torch.empty(len(rows), dtype=torch.float64, device=rows.device)
    for a in range(0, len(rows), block):
        w = rows[a : a + block].float()
        scale = w.abs().amax(dim=1)
        safe = torch.where(scale > 0, scale, 1.0)
        out[a : a + block] = (w / safe[:, None]).norm(dim=1).double() * scale.double()
    return out * (1 + 2**-10)


def bias_abs_max(bias: torch.Tensor | None, start: int, stop: int) -> float:
    if bias is None or stop <= start:
        return 0.0
    part = bias[start:stop].double().abs()
    part = part[torch.isfinite(part)]
    return float(part.max()) if part.numel() else 0.0


def exact_order(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Column order of each row by (value descending, id ascending), pads (id < 0) last.

    Pads sort as value -inf with the largest id, so they follow every real entry.
    """
    key_ids = torch.where(ids >= 0, ids, torch.iinfo(torch.long).max)
    by_id = torch.argsort(key_ids, dim=1, stable=True)
    vals = torch.where(ids >= 0, values, -torch.inf).gather(1, by_id)
    by_val = torch.argsort(vals, dim=1, descending=True, stable=True)
    return by_id.gather(1, by_val)


def logsumexp_error_bound(
    inputs: LensInputs, vocab_chunk: int | None = None, factor: float | None = None
) -> float:
    """Largest honest |log-sum-exp error| of the torch engine on ``inputs`` (docs/lens.md).

    The band of the fast logits (a shift of every term by at most the band moves
    the log-sum-exp by at most the band), plus fp32 rounding: a sum of at most
    ``vocab_chunk`` positive terms per chunk, the online merges of the chunks, and
    the final log of a value near the largest logit. ``factor``: another engine's GEMM
    error factor (the Triton kernel's, :func:`mma_error_factor`).
    """
    if inputs.n_rows == 0:
        return 0.0
    if vocab_chunk is None:
        vocab_chunk = default_chunks(inputs.unembed.device)[1]
    h = inputs.hidden.to(inputs.unembed.dtype)
    if inputs.final_norm is not None:
        with torch.no_grad():
            h = inputs.final_norm(h)
    norms = h.to(inputs.unembed.dtype).double().cpu().norm(dim=1)
    w = unembed_norm_max(inputs.unembed, 0, inputs.vocab_size)
    b = bias_abs_max(inputs.bias, 0, inputs.vocab_size)
    low = inputs.unembed.dtype if rank_free_low_precision(inputs) else None
    d = inputs.unembed.shape[1]
    if factor is not None:
        low = None
    band = float(error_band(norms, w, d, b, inputs.softcap, low, factor=factor).max())
    n_chunks = inputs.vocab_size // max(1, vocab_chunk) + 4
    terms = min(vocab_chunk, inputs.vocab_size) + 4 * n_chunks
    scale = float(norms.max()) * w + b + 1
    return band + 4 * U32 * terms + 4 * U32 * scale
