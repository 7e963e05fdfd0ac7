"""The fused lens in plain torch, exact in every dtype: chunked over rows and vocabulary.

How it stays exact without [N x V] logits (definitions in docs/lens.md):

* Each [rows x vocab-chunk] block of logits is computed once, with fp32
  accumulation and fp32 output (inputs in the model's dtype are exact in fp32),
  and its error against the exact float64 logits is bounded per row by
  :func:`~.exact.error_band`, a bound proven for any summation order.
* Ranks: an entry whose fast logit exceeds the target's exact value by more
  than the band is counted outright; one inside the band is recomputed with
  :func:`~.exact.entry_logits` (the same float64 arithmetic as the target) and
  counted only if strictly greater. Ties therefore never push a rank down.
* Top-k: the best ``k + margin`` (margin 4) fast logits per segment are kept as candidates;
  those that can still be among the k best (fast logit within two bands of the k-th best)
  are recomputed exactly. The list is *certified* when the k-th exact value
  beats every fast logit left out by more than the band; a row (or pooled
  group) that is not certified has its segment rescanned for every entry that
  could still reach the k-th value. Ties are broken by the lower id.
* Log-sum-exp and segment masses come from the fast logits (online, fp32):
  their error is at most the band plus the fp32 summation error.

Vocabulary chunks never straddle a segment boundary, so each block updates one
segment's state. Every call but a rank-free one on the GEMM in the model's dtype walks
each segment run in order of the unembedding-row norm (:class:`ColumnOrder`): a chunk's
band scales with its largest row norm. Nothing larger than [row-chunk x vocab-chunk] logits exists.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from . import cpu_gemm, cpu_pass
from .contract import (
    LensInputs,
    LensRangeError,
    LensResult,
    check_finite,
    check_width,
    validate,
)
from .exact import (
    BF16_GEMM,
    C_PASS,
    K_BLOCK,
    ONEDNN_GEMM,
    bias_abs_max,
    compiled_or,
    default_chunks,
    entry_logits,
    error_band,
    exact_order,
    gemm_error_factor,
    kernel_enabled,
    rank_free_low_precision,
    remembered,
    round_down_f32,
    target_logits,
    thresholds,
    unembed_norm_max,
    unembed_row_norms,
)
from .native import KernelUnavailable
from .precision import ieee_fp32_matmul
from .topk import TOPK_BLOCK, block_topk

NEG_INF = float("-inf")


def vocab_chunks(inputs: LensInputs, vocab_chunk: int) -> list[tuple[int, int, int]]:
    """(start, stop, segment) chunks of at most ``vocab_chunk`` inside one segment run.

    Column ranges: with a :class:`ColumnOrder` (calls that ask ranks) columns ``[start,
    stop)`` hold the entries ``ids[start:stop]`` of the same run, not ids start..stop."""
    chunks = []
    for start, stop, seg in inputs.resolved_segments().runs():
        for c0 in range(start, stop, vocab_chunk):
            chunks.append((c0, min(stop, c0 + vocab_chunk), seg))
    return chunks


@dataclass(frozen=True)
class ColumnOrder:
    """Which vocabulary entry each column of a chunk's logits holds.

    The identity (``ids`` None), or, for calls that ask ranks, each segment run's entries
    sorted by ``||W[j]||`` (:func:`norm_sorted_columns`): a chunk's band scales with its
    largest row norm, so chunks of similar norms put fewer entries in band (on
    SmolLM2-135M's rows with random targets, 5.6 instead of 9.3 a target;
    bench/README.md). ``at`` is the inverse: the column of each entry.
    """

    ids: torch.Tensor | None = None
    at: torch.Tensor | None = None
    #: ``||W[ids[c]]||`` bounds on the host: a chunk's maximum without a device sync.
    norms: torch.Tensor | None = None

    def vocab(self, cols: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of columns (positions in the sorted vocabulary)."""
        return cols if self.ids is None else self.ids[cols]

    def column(self, ids: torch.Tensor) -> torch.Tensor:
        """Columns of vocabulary ids."""
        return ids if self.at is None else self.at[ids]

    def rows(self, x: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """``x``'s rows (W or its bias) for columns ``[c0, c1)``: a slice, or a gather."""
        return x[c0:c1] if self.ids is None else x.index_select(0, self.ids[c0:c1])

    def norm_max(self, unembed: torch.Tensor, c0: int, c1: int) -> float:
        """An upper bound of the chunk's largest ``||W[j]||``."""
        if self.ids is None or c1 <= c0:
            return unembed_norm_max(unembed, c0, c1)
        return float(self.norms[c0:c1].max())

    def bias_max(self, bias: torch.Tensor | None, c0: int, c1: int) -> float:
        """The chunk's largest finite |bias| (0 without a bias)."""
        if bias is None or self.ids is None:
            return bias_abs_max(bias, c0, c1)
        return bias_abs_max(self.rows(bias, c0, c1), 0, c1 - c0)


def norm_sorted_columns(inputs: LensInputs) -> ColumnOrder:
    """Each segment run's entries sorted by row norm (stable), remembered per W and runs."""
    runs = tuple(inputs.resolved_segments().runs())

    def build() -> ColumnOrder:
        norms = unembed_row_norms(inputs.unembed)
        ids = torch.arange(inputs.vocab_size, device=norms.device)
        for start, stop, _ in runs:
            order = torch.argsort(norms[start:stop], stable=True)
            ids[start:stop] = order + start
        at = torch.empty_like(ids)
        at[ids] = torch.arange(len(ids), device=ids.device)
        device = inputs.unembed.device
        return ColumnOrder(ids.to(device), at.to(device), norms[ids].cpu())

    return remembered(inputs.unembed, ("sorted columns", runs), build)


def row_chunks(groups: torch.Tensor, row_chunk: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Order rows so each pool group is contiguous and cut chunks between groups.

    Returns the row order and half-open [a, b) spans into it. A group larger than
    ``row_chunk`` becomes one chunk of its own size: pooling needs all its rows.
    Unpooled rows come first, then groups by (size, id): each chunk holds its pooled
    rows as one contiguous suffix, in runs of equal-sized groups that pool as views.
    """
    if groups.numel() == 0:
        return torch.empty(0, dtype=torch.long), []
    sizes = torch.bincount(groups.clamp(min=0), minlength=1)[groups.clamp(min=0)]
    key = torch.where(groups < 0, -1, sizes * (int(groups.max().clamp(min=0)) + 1) + groups)
    order = torch.argsort(key, stable=True)
    g = groups[order]
    n = int(g.numel())
    # A cut before row i is allowed when it does not split a group.
    allowed = torch.ones(n, dtype=torch.bool)
    allowed[1:] = (g[1:] != g[:-1]) | (g[1:] < 0)
    cuts = [*torch.nonzero(allowed).flatten().tolist()[1:], n]
    spans, start, prev = [], 0, 0
    for cut in cuts:
        if cut - start > row_chunk and prev > start:
            spans.append((start, prev))
            start = prev
        prev = cut
    spans.append((start, n))
    return order, spans


#: The GEMMs that can give a call its fast logits (``chunked_lens(gemm=...)``), each with
#: its own proven band: K-sliced IEEE fp32 through torch's BLAS (MKL on x86) or oneDNN
#: (128-wide slices), or through VDPBF16PS on bf16 operands (64-wide slices: a narrower
#: band; :func:`chunk_logits`, :func:`fast_gemm_factor`), or one GEMM in the model's dtype
#: (:func:`low_precision_logits`, rank-free bf16/fp16 calls only).
IEEE = "ieee"
ONEDNN = "onednn"
AVX512_BF16 = "avx512-bf16"
MODEL_DTYPE = "model-dtype"


def onednn_available(unembed: torch.Tensor) -> bool:
    """Whether the fast logits may come from oneDNN's fp32 GEMM here: a CPU, a torch with
    oneDNN's linear op, and not turned off by the self-check (:data:`~.exact.ONEDNN_GEMM`)."""
    return (
        unembed.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and kernel_enabled(ONEDNN_GEMM)
    )


def fast_gemm_factor(gemm: str, d: int) -> float:
    """``c`` with ``|fast - exact| <= c ||h|| ||w||`` for an fp32-output GEMM's logits:
    K-slices of :data:`~.exact.K_BLOCK` (torch's BLAS and oneDNN) or of
    :data:`.cpu_gemm.SLICE` (the VDPBF16PS kernel), each summed in fp32, added in order."""
    return gemm_error_factor(d, cpu_gemm.SLICE if gemm == AVX512_BF16 else K_BLOCK)


def avx512_bf16_available(unembed: torch.Tensor) -> bool:
    """Whether the fast logits may come from :mod:`.cpu_gemm`'s kernel: a bf16 model on a
    CPU whose VDPBF16PS passed the kernel's probe, and not turned off by the self-check
    (:data:`~.exact.BF16_GEMM`)."""
    return (
        unembed.device.type == "cpu"
        and unembed.dtype == torch.bfloat16
        and kernel_enabled(BF16_GEMM)
        and cpu_gemm.available()
    )


def _onednn_slices(h32: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h32 @ w.T`` in :data:`~.exact.K_BLOCK`-wide slices, each an IEEE fp32 GEMM in
    oneDNN (fpmath strict under :func:`ieee_fp32_matmul`), added in order in fp32: what
    :func:`chunk_logits`' BLAS path computes, up to each slice's summation order.
    Contiguous operands: oneDNN took seconds for a strided weight."""
    logits = None
    for k0 in range(0, h32.shape[1], K_BLOCK):
        part = torch.ops.mkldnn._linear_pointwise(
            h32[:, k0 : k0 + K_BLOCK].contiguous(),
            w[:, k0 : k0 + K_BLOCK].float().contiguous(),  # fp32 weights are a view
            None,
            "none",
            [],
            "",
        )
        logits = part if logits is None else logits.add_(part)
    return logits


#: The largest W (bytes) whose packed copy a call keeps between row chunks (a bigger one
#: is packed again for each: 20% more GEMM time, no second copy of a multi-GB head).
PACK_KEEP_BYTES = 1 << 30


class Scratch:
    """Reusable [rows x vocab-chunk] buffers, one a slot, for a whole call: fresh 16 MB
    blocks per chunk cost page faults that rivalled the GEMM itself."""

    def __init__(self) -> None:
        self._flat: list[torch.Tensor] = []
        self._packed: dict[tuple[int, int], cpu_gemm.PackedColumns] = {}
        #: Whether packed chunks are kept for a later row chunk (:meth:`packed`).
        self.keep_packed = False

    def packed(self, w: torch.Tensor, c0: int, c1: int, columns: ColumnOrder):
        """Columns ``[c0, c1)`` of W packed for :mod:`.cpu_gemm` (the call's column order
        is fixed). Kept while ``keep_packed`` (more row chunks to come, and W no larger than
        :data:`PACK_KEEP_BYTES`): packing a 8,192 x 576 chunk (0.65 ms on one thread) once a
        call, not once a row chunk, for as many bytes as W held until the last row chunk
        frees them."""
        key = (c0, c1)
        packed = self._packed.pop(key, None)
        if packed is None:
            ids = None if columns.ids is None else columns.ids[c0:c1]
            packed = cpu_gemm.pack(w if ids is not None else w[c0:c1], ids)
        if self.keep_packed and w.numel() * w.element_size() <= PACK_KEEP_BYTES:
            self._packed[key] = packed
        return packed

    def get(
        self, i: int, rows: int, cols: int, device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        while len(self._flat) <= i:
            self._flat.append(torch.empty(0, dtype=dtype, device=device))
        flat = self._flat[i]  # a call runs on one device
        if flat.numel() < rows * cols or flat.dtype != dtype:
            self._flat[i] = flat = torch.empty(rows * cols, dtype=dtype, device=device)
        return flat[: rows * cols].view(rows, cols)


def chunk_logits(
    h32: torch.Tensor,
    c0: int,
    c1: int,
    inputs: LensInputs,
    scratch: Scratch | None = None,
    columns: ColumnOrder | None = None,
    gemm: str = IEEE,
) -> torch.Tensor:
    """Fast logits [R, c1 - c0]: an fp32-output GEMM of the rows' exact values, then bias and
    soft-cap in fp32.

    The GEMM runs in :data:`~.exact.K_BLOCK`-wide slices of the hidden width whose
    products are added in fp32: ~10% more time than one GEMM, an error band 4.4x
    narrower at d=576 and 23x at d=3584 (:func:`~.exact.gemm_error_factor`), so that
    many fewer entries need float64. The result lives in ``scratch`` (valid until the
    next call) when one is given. ``columns``: which entries columns ``[c0, c1)`` are.

    ``gemm``: :data:`IEEE` (torch's BLAS), or on a CPU :data:`ONEDNN` (each slice is
    oneDNN's IEEE fp32 GEMM: any summation order keeps a slice inside ``gamma_block``; its
    output is a fresh tensor, not ``scratch``) or :data:`AVX512_BF16` (:mod:`.cpu_gemm`:
    the bf16 rows and W, 64-wide slices each one chain of fp32 accumulations: a narrower
    band, :func:`fast_gemm_factor`). On AMD EPYC (Zen 5) a 512 x 8,192 block took
    29.5 ms through MKL, 14 through oneDNN and 5.4 through VDPBF16PS (bench/README.md).
    """
    scratch = scratch or Scratch()
    columns = columns or ColumnOrder()
    rows, width, d = len(h32), c1 - c0, h32.shape[1]
    if gemm == ONEDNN and rows and width and d:
        if not onednn_available(inputs.unembed):
            raise ValueError("oneDNN's fp32 GEMM is not available here (a CPU torch with oneDNN)")
        logits = _onednn_slices(h32, columns.rows(inputs.unembed, c0, c1))
    elif gemm == AVX512_BF16:
        if not avx512_bf16_available(inputs.unembed):
            raise ValueError(
                "the AVX-512 BF16 GEMM is not available here (a bf16 model on a CPU with "
                f"VDPBF16PS): {cpu_gemm.why_unavailable() or 'turned off'}"
            )
        h = h32.to(torch.bfloat16)
        if not torch.equal(h.float(), h32):  # the band is for these very rows
            raise ValueError("the AVX-512 BF16 GEMM takes rows that are bf16 values")
        logits = scratch.get(0, rows, width, h32.device)
        cpu_gemm.logits(h, scratch.packed(inputs.unembed, c0, c1, columns), logits)
    else:
        w = columns.rows(inputs.unembed, c0, c1).float()
        logits = scratch.get(0, rows, width, h32.device)
        torch.mm(h32[:, :K_BLOCK], w[:, :K_BLOCK].T, out=logits)
        if d > K_BLOCK:
            part = scratch.get(1, rows, width, h32.device)
            for k0 in range(K_BLOCK, d, K_BLOCK):
                torch.mm(h32[:, k0 : k0 + K_BLOCK], w[:, k0 : k0 + K_BLOCK].T, out=part)
                logits += part
    if inputs.bias is not None:
        logits += columns.rows(inputs.bias, c0, c1).float()
    if inputs.softcap is not None:
        logits.div_(inputs.softcap).tanh_().mul_(inputs.softcap)
    return logits


def low_precision_logits(
    h: torch.Tensor, c0: int, c1: int, inputs: LensInputs, scratch: Scratch, need_max: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast logits from one GEMM in the model's dtype (output rounded to it), for calls
    that ask no ranks, and each row's largest |GEMM output|. Without bias, soft-cap or
    pooled rows they are the GEMM output itself, in the model's dtype (an fp32 copy cost
    5-9% of the end-to-end time, bench/README.md), and the max is None: the pass finds it
    for free.
    Otherwise fp32. Either lives in ``scratch``, valid until the next call."""
    x = torch.mm(h, inputs.unembed[c0:c1].T, out=scratch.get(2, len(h), c1 - c0, h.device, h.dtype))
    if not need_max and inputs.bias is None and inputs.softcap is None:
        # The GEMM output itself, no fp32 copy: the pass upcasts inside (sums in fp32),
        # and its own row max/min give max |x| (see _update).
        return x, None
    logits = scratch.get(0, len(h), c1 - c0, h.device)
    logits.copy_(x)
    out_max = x.abs().amax(dim=1).float()
    if inputs.bias is not None:
        logits += inputs.bias[c0:c1].float()
    if inputs.softcap is not None:
        logits.div_(inputs.softcap).tanh_().mul_(inputs.softcap)
    return logits, out_max


def _chunk_stats_eager(
    logits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """One pass over a logit block: row max and min, sum of exp(logit - max), entries certainly
    above each target (``> hi``), the mask (1.0 / 0.0; empty without targets) of
    entries inside any target's band, and the
    maxima of consecutive :data:`TOPK_BLOCK`-wide blocks (``[]`` if the width is not a
    multiple). Pure comparisons against precomputed thresholds, so eager and compiled
    code classify every entry identically.
    """
    row_max = logits.amax(dim=1)
    row_min = logits.amin(dim=1)
    safe = torch.where(torch.isfinite(row_max), row_max, 0)
    # In fp32 whatever the logits' dtype (rank-free ones come in the model's): compiled,
    # the cast fuses into the sum; a bf16 sum made log-sum-exp errors 3.8x larger.
    sumexp = torch.exp(logits.float() - safe[:, None]).sum(dim=1)
    above = (logits.unsqueeze(1) > hi.unsqueeze(2)).sum(-1, dtype=torch.int32)
    # One pointwise expression per target (unrolled), stored as fp32 1/0: Inductor
    # fuses it into one vectorised loop. ``any`` over a middle axis compiled 2x
    # slower, and a bool output 4x slower (its CPU stores are not vectorised).
    near = logits[:, :0]
    if lo.shape[1]:
        near = torch.zeros_like(logits)
        for t in range(lo.shape[1]):
            near = torch.where(
                (logits >= lo[:, t : t + 1]) & (logits <= hi[:, t : t + 1]), 1.0, near
            )
    rows, width = logits.shape
    if width % TOPK_BLOCK == 0:
        blocks = logits.view(rows, width // TOPK_BLOCK, TOPK_BLOCK).amax(-1)
    else:
        blocks = logits[:, :0]
    return row_max, row_min, sumexp, above, near, blocks


_compiled_stats = None
_compile_failed = False


#: Graphs the compiled reduction may build in one process: target counts padded to
#: powers of two (a few buckets) times the guards dynamo adds on the block's shape (its
#: width a multiple of the top-k block or not, above 4096 or not; one row or more). The
#: default of 8 was reached within one demo run, after which torch ran it eager.
RECOMPILE_LIMIT = 64


def _recompile_budget():
    """``torch._dynamo.config`` patched for the duration of one call, never globally."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    return dynamo_config.patch(**{name: RECOMPILE_LIMIT})


def _pad_targets(thresholds: torch.Tensor) -> torch.Tensor:
    """Thresholds [rows, T] widened to the next power of two with ``+inf`` columns.

    The compiled reduction unrolls its loop over targets, so every distinct T is a
    new graph: batches with 12, then 13, then 12 targets recompiled until torch
    hit its recompile limit and ran eager. Padding to powers of two bounds the
    graphs to a handful. A ``+inf`` column classifies nothing: no finite logit is
    above it or inside it (the lens refuses infinite logits).
    """
    t = thresholds.shape[1]
    if t == 0 or t & (t - 1) == 0:
        return thresholds
    pad = (1 << t.bit_length()) - t
    return torch.cat([thresholds, thresholds.new_full((len(thresholds), pad), float("inf"))], 1)


def chunk_stats(logits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, compile: bool = True):
    """:func:`_chunk_stats_eager`, through ``torch.compile`` when ``compile``.

    Eager, the comparisons materialise [rows x targets x chunk]; compiled they fuse
    into one vectorised loop. A compiler failure falls back to eager with one
    warning, never to a wrong answer (the classification is pure comparisons).
    """
    global _compiled_stats, _compile_failed
    if not compile or _compile_failed or not logits.numel():
        return _chunk_stats_eager(logits, lo, hi)
    if _compiled_stats is None:
        _compiled_stats = torch.compile(_chunk_stats_eager, dynamic=True)
    try:
        targets = lo.shape[1]
        lo, hi = _pad_targets(lo), _pad_targets(hi)
        with _recompile_budget():
            row_max, row_min, sumexp, above, near, blocks = _compiled_stats(logits, lo, hi)
        return row_max, row_min, sumexp, above[:, :targets], near, blocks
    except Exception as exc:  # compiler missing or broken: stay correct, get slower
        _compile_failed = True
        warnings.warn(
            f"torch.compile of the lens reduction failed ({type(exc).__name__}: {exc}); "
            "using eager mode",
            stacklevel=2,
        )
        return _chunk_stats_eager(logits, lo, hi)


def _segment_max(data: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Max over consecutive row groups of the given sizes: [sum(sizes), C] -> [G, C].

    Groups come sorted by size (see :func:`row_chunks`), so each run of equal-sized
    groups reduces as one strided view; ``segment_reduce`` was ~5x slower.
    """
    if len(sizes) == len(data):
        return data
    out = torch.empty((len(sizes), *data.shape[1:]), dtype=data.dtype, device=data.device)
    g = row = 0
    while g < len(sizes):
        size, run = sizes[g], 1
        while g + run < len(sizes) and sizes[g + run] == size:
            run += 1
        block = data[row : row + run * size]
        out[g : g + run] = block.view(run, size, *data.shape[1:]).amax(1)
        g += run
        row += run * size
    return out


@dataclass
class _Scope:
    """What ranks and top-k are taken over: single rows, or max-pooled groups of rows.

    ``starts``/``lens`` [G] locate each group's rows (contiguous) in the row chunk;
    ``t64`` [G, T] are the exact target values (the max over the group's rows).
    """

    inputs: LensInputs
    h: torch.Tensor  # [R, d] the chunk's normed rows, in the model's dtype
    starts: torch.Tensor
    lens: torch.Tensor
    t64: torch.Tensor
    first: int  # first row of the scope in the chunk
    singletons: bool
    columns: ColumnOrder = ColumnOrder()  # the vocabulary entry of each logit column
    gemm: str = IEEE  # how chunk_logits computes a rescan's fast logits
    #: A pooled scope's ``lens`` on the host, read once: every chunk pools with it, and
    #: reading a GPU tensor is a host sync (three a chunk before). Unused for singletons.
    sizes: list[int] | None = None

    def __post_init__(self) -> None:
        if self.sizes is None and not self.singletons:
            self.sizes = self.lens.tolist()

    @property
    def n(self) -> int:
        return int(self.starts.numel())

    def pool(self, logits: torch.Tensor) -> torch.Tensor:
        if self.singletons:
            return logits[self.first : self.first + self.n]
        return _segment_max(logits[self.first : self.first + sum(self.sizes)], self.sizes)

    def exact(
        self,
        groups: torch.Tensor,
        cols: torch.Tensor,
        fast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        band: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact (pooled) logits of entries ``(groups[e], cols[e])``.

        With ``fast(rows, cols)`` (the rows' fast logits) and the groups' ``band``,
        rows whose fast logit is more than two bands below the group's best cannot
        hold the exact maximum, and are skipped.
        """
        if self.singletons:
            return entry_logits(self.h, self.starts[groups], cols, self.inputs)
        lens = self.lens[groups]
        offsets = torch.cumsum(lens, 0) - lens
        # One host read of the total: each repeat_interleave told its output size does not
        # read ``lens`` again (on a GPU, four host syncs fewer per call).
        total = int(lens.sum())
        spread = partial(torch.repeat_interleave, repeats=lens, output_size=total)
        within = torch.arange(total, device=lens.device) - spread(offsets)
        owner = spread(torch.arange(len(groups), device=lens.device))
        rows = spread(self.starts[groups]) + within
        entry_cols = spread(cols)
        if fast is not None and band is not None:
            row_fast = fast(rows, entry_cols).double()
            best = torch.full((len(groups),), NEG_INF, dtype=torch.float64, device=lens.device)
            best = best.scatter_reduce(0, owner, row_fast, "amax")
            keep = row_fast >= best[owner] - 2 * band[groups][owner]
            rows, entry_cols, owner = rows[keep], entry_cols[keep], owner[keep]
        vals = entry_logits(self.h, rows, entry_cols, self.inputs)
        out = torch.full((len(groups),), NEG_INF, dtype=torch.float64, device=vals.device)
        return out.scatter_reduce(0, owner, vals, "amax")


@dataclass
class _SegmentState:
    """Running state of one vocabulary segment for one scope of one row chunk."""

    counts: torch.Tensor  # [G, T] entries exactly above each target
    cand_vals: torch.Tensor  # [G, <=kk] fast logits
    cand_ids: torch.Tensor  # [G, <=kk]
    band: torch.Tensor  # [G] float64, the widest band of the segment's chunks
    seen: int = 0  # vocabulary entries walked
    cand_exact: torch.Tensor | None = None  # the final candidates' values (_candidate_exact)
    every_exact: bool = False  # whether cand_exact is exact for every candidate


def _candidate_exact(scope: _Scope, st: _SegmentState, every: bool = False) -> torch.Tensor:
    """Values [G, width] of a segment's final candidates (computed once): exact wherever
    a candidate can still be among the k best, its fast logit elsewhere; exact for every
    candidate with ``every`` (the rank-free log-sum-exp swaps all their terms), and on a
    GPU.

    A candidate whose fast logit lies more than two bands below the k-th largest fast
    logit among the candidates is strictly beaten by those k: its exact value is at most
    ``fast + band``, theirs at least ``kth - band``. Its exact value can change neither
    the top-k nor its order, and its fast value still sorts below those k. A GPU skips
    this pruning: finding the candidates to keep is a host sync (about a millisecond of
    waiting in the last GPU profile), and their float64 values are one launch of the
    exact-values kernel (~0.06 ms) either way.
    """
    if st.cand_exact is not None and (st.every_exact or not every):
        return st.cand_exact
    fast = st.cand_vals.double()
    g, width = fast.shape
    k = scope.inputs.k
    if every or width <= k or fast.is_cuda:
        groups = torch.arange(g, device=fast.device).repeat_interleave(width)
        st.cand_exact = scope.exact(groups, st.cand_ids.reshape(-1)).view(g, width)
        st.every_exact = True
        return st.cand_exact
    kth = fast.topk(k, dim=1).values[:, -1]
    groups, slots = (fast >= (kth - 2 * st.band)[:, None]).nonzero(as_tuple=True)
    values = fast.clone()
    values[groups, slots] = scope.exact(groups, st.cand_ids[groups, slots])
    st.cand_exact, st.every_exact = values, False
    return st.cand_exact


def _new_state(scope: _Scope, device) -> _SegmentState:
    g = scope.n
    return _SegmentState(
        counts=torch.zeros(scope.t64.shape, dtype=torch.long, device=device),
        cand_vals=torch.empty((g, 0), dtype=torch.float32, device=device),
        cand_ids=torch.empty((g, 0), dtype=torch.long, device=device),
        band=torch.zeros(g, dtype=torch.float64, device=device),
    )


def _merge_topk(vals, ids, new_vals, new_ids, kk: int):
    vals = torch.cat([vals, new_vals], dim=1)
    ids = torch.cat([ids, new_ids], dim=1)
    if vals.shape[1] <= kk:
        return vals, ids
    top, where = vals.topk(kk, dim=1, sorted=False)
    return top, ids.gather(1, where)


#: In-band entries resolved at a time. Each carries its row's [T] thresholds and exact
#: targets, and a degenerate row (all zero after the norm) puts its whole block in the
#: band: 16,384 such rows of a GPU block would otherwise need tens of GB at once. (The
#: indices themselves, 16 bytes an entry, stay within what the block already takes.)
BAND_BATCH = 1 << 20


def _classify(values, lo, hi, compile, kk: int) -> tuple[torch.Tensor | None, ...]:
    """The chunk's stats (:func:`chunk_stats`) with, for its targets, the entries certainly
    above each (``> hi``) and the positions ``(g, c)`` of those inside some band, and ``kk``
    largest entries of each row: from one C loop (:mod:`.cpu_pass`) on a CPU, else from the
    compiled pass, a scan of its mask and :func:`block_topk` (also where the loop cannot be
    built: one warning). The same classification, maxima and block maxima either way (pure
    comparisons); the exp-sums agree within their bound, the top entries in value."""

    def by_pass():
        row_max, row_min, sumexp, above, near, blocks = chunk_stats(values, lo, hi, compile)
        # The pass's fp32 1/0 mask, scanned as bool: 1.6 + 0.5 against 2.8 ms a block.
        g_all, c_all = near.bool().nonzero(as_tuple=True) if near.shape[1] else (None, None)
        top_v, top_i = block_topk(values, blocks, kk)
        return row_max, row_min, sumexp, blocks, above, g_all, c_all, top_v, top_i

    def by_loop():
        found = cpu_pass.block_pass(values, lo, hi, kk if kk <= cpu_pass.MAX_KK else 0)
        if kk <= cpu_pass.MAX_KK:
            return found
        return *found[:7], *block_topk(values, found[3], kk)  # torch's top-k: faster there

    if not cpu_pass.supports(values):
        return by_pass()
    return compiled_or(C_PASS, by_loop, by_pass, (KernelUnavailable, OSError))


def _resolve_band(scope, st, g_all, c_all, values, logits, band, lo, hi, c0) -> None:
    """Count, exactly, the in-band entries ``(g_all, c_all)`` strictly above each target."""
    if g_all is None or not len(g_all):
        return
    fast_of = partial(_fast_of, logits, scope.columns, c0)
    for a in range(0, len(g_all), BAND_BATCH):
        g_e, c_e = g_all[a : a + BAND_BATCH], c_all[a : a + BAND_BATCH]
        fast = values[g_e, c_e].unsqueeze(1)
        exact = scope.exact(g_e, scope.columns.vocab(c_e + c0), fast_of, band).unsqueeze(1)
        inside = (fast >= lo[g_e]) & (fast <= hi[g_e])
        st.counts.index_add_(0, g_e, (inside & (exact > scope.t64[g_e])).long())


def _fast_of(logits, columns: ColumnOrder, c0: int, rows, ids) -> torch.Tensor:
    """The fast logits of entries ``(rows, ids)`` in a chunk starting at column ``c0``."""
    return logits[rows, columns.column(ids) - c0]


def _update(scope, st, logits, band, c0, kk, compile) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one chunk's logits into a segment state; returns the scope's (max, sumexp).

    ``band`` may be a function of the chunk's row max and min (rank-free calls on
    low-precision logits, where the largest |logit| sets the band).
    """
    values = scope.pool(logits)
    rows = len(values)
    fixed = band if isinstance(band, torch.Tensor) else values.new_zeros(rows, dtype=torch.float64)
    lo, hi = thresholds(scope.t64, fixed)
    width = values.shape[1]
    found = _classify(values, lo, hi, compile, min(kk, width))
    row_max, row_min, sumexp, _, above, g_all, c_all, top_v, top_i = found
    if not isinstance(band, torch.Tensor):
        band = band(row_max, row_min)
    st.counts += above
    _resolve_band(scope, st, g_all, c_all, values, logits, band, lo, hi, c0)
    st.cand_vals, st.cand_ids = _merge_topk(
        st.cand_vals, st.cand_ids, top_v, scope.columns.vocab(top_i + c0), kk
    )
    st.band = torch.maximum(st.band, band)
    st.seen += width
    return row_max, sumexp


def _segment_topk(scope, st, seg_chunks, h32, k, kk) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k ids and values [G, k] of one segment, certified or rescanned."""
    g = scope.n
    device = st.cand_ids.device
    ids = torch.full((g, k), -1, dtype=torch.long, device=device)
    vals = torch.full((g, k), NEG_INF, dtype=torch.float64, device=device)
    if st.seen == 0 or g == 0:
        return ids, vals
    exact = _candidate_exact(scope, st)
    order = exact_order(exact, st.cand_ids)[:, :k]
    take = order.shape[1]
    ids[:, :take] = st.cand_ids.gather(1, order)
    vals[:, :take] = exact.gather(1, order)
    if st.seen <= kk:
        return ids, vals  # every entry of the segment was a candidate
    # Left-out entries have fast logits <= the lowest candidate's, so exact ones
    # <= that + band: certified when the k-th exact value is strictly above it.
    floor = st.cand_vals.min(dim=1).values.double() + st.band
    kth = vals[:, k - 1]
    redo = torch.nonzero(~(kth > floor)).flatten()
    if len(redo):
        ids[redo], vals[redo] = _rescan_topk(scope, redo, kth[redo], st.band[redo], seg_chunks, h32)
    return ids, vals


def _rescan_topk(scope, groups, kth, band, seg_chunks, h32):
    """Top-k of uncertified groups: every entry whose fast logit could reach the k-th exact one."""
    k = scope.inputs.k
    device = h32.device
    lo = round_down_f32(torch.where(torch.isfinite(kth), kth - band, kth))[:, None]
    lens = scope.lens[groups]
    rows = torch.cat(
        [
            torch.arange(int(s), int(s) + int(n))
            for s, n in zip(scope.starts[groups], lens, strict=True)
        ]
    )
    rows = rows.to(device)
    local = _Scope(
        inputs=scope.inputs,
        h=scope.h[rows],
        starts=torch.cumsum(lens, 0) - lens,
        lens=lens,
        t64=scope.t64[groups],
        first=0,
        singletons=scope.singletons,
        columns=scope.columns,
        gemm=scope.gemm,
    )
    found_g, found_c, found_v = [], [], []
    for c0, c1, _ in seg_chunks:
        logits = chunk_logits(
            h32[rows], c0, c1, scope.inputs, columns=scope.columns, gemm=scope.gemm
        )
        g_e, c_e = (local.pool(logits) >= lo).nonzero(as_tuple=True)
        ids = scope.columns.vocab(c_e + c0)
        found_g.append(g_e)
        found_c.append(ids)
        found_v.append(local.exact(g_e, ids, partial(_fast_of, logits, scope.columns, c0), band))
    g_all, c_all, v_all = torch.cat(found_g), torch.cat(found_c), torch.cat(found_v)
    n = len(groups)
    # Pack each group's entries into one row of a [n, width] table.
    by_group = torch.argsort(g_all, stable=True)
    g_all, c_all, v_all = g_all[by_group], c_all[by_group], v_all[by_group]
    counts = torch.bincount(g_all, minlength=n)
    slot = torch.arange(len(g_all), device=device) - (torch.cumsum(counts, 0) - counts)[g_all]
    width = max(k, int(counts.max()) if n else 0)
    ids = torch.full((n, width), -1, dtype=torch.long, device=device)
    vals = torch.full((n, width), NEG_INF, dtype=torch.float64, device=device)
    ids[g_all, slot] = c_all
    vals[g_all, slot] = v_all
    order = exact_order(vals, ids)[:, :k]
    return ids.gather(1, order), vals.gather(1, order)


def _row_scope(inputs, h, t64, columns: ColumnOrder = ColumnOrder(), gemm: str = IEEE) -> _Scope:
    r = len(h)
    return _Scope(
        inputs=inputs,
        h=h,
        starts=torch.arange(r, device=h.device),
        lens=torch.ones(r, dtype=torch.long, device=h.device),
        t64=t64,
        first=0,
        singletons=True,
        columns=columns,
        gemm=gemm,
    )


def _pooled_scope(
    inputs, h, groups, pool_targets, columns: ColumnOrder = ColumnOrder(), gemm: str = IEEE
) -> tuple[_Scope, torch.Tensor]:
    """The chunk's pooled rows (a contiguous suffix, see :func:`row_chunks`) as a scope."""
    r = len(h)
    first = r - int((groups >= 0).sum())
    g_ids, g_len = torch.unique_consecutive(groups[first:], return_counts=True)
    local = torch.repeat_interleave(torch.arange(len(g_ids), device=h.device), g_len)
    ptg = pool_targets[g_ids]
    t_rows = target_logits(h[first:], ptg[local], inputs)
    sizes = g_len.tolist()
    scope = _Scope(
        inputs=inputs,
        h=h,
        starts=first + torch.cumsum(g_len, 0) - g_len,
        lens=g_len,
        t64=_segment_max(t_rows, sizes) if sizes else t_rows[:0],
        first=first,
        singletons=False,
        sizes=sizes,
        columns=columns,
        gemm=gemm,
    )
    return scope, g_ids


@torch.no_grad()
def chunked_lens(
    inputs: LensInputs,
    *,
    row_chunk: int | None = None,
    vocab_chunk: int | None = None,
    margin: int = 4,
    compile: bool = True,
    refine: bool = True,
    gemm: str | None = None,
) -> LensResult:
    """Fused final-norm + unembedding + exact ranks/top-k/masses, chunked (see module doc).

    Runs on whatever device ``inputs.unembed`` lives on. ``margin`` extra candidates
    per segment make a rescan rare; chunk sizes default by device
    (:func:`~.exact.default_chunks`: on CUDA the row chunk by the device's memory);
    ``compile`` fuses the per-chunk reduction
    through torch.compile (the same classification either way; a compiler that fails
    falls back to eager with a warning). ``refine=False`` skips the
    exact recomputation of in-band entries: ranks are then only as good as fp32
    (tests use it to show that the refinement is what makes them exact).
    ``gemm``: which GEMM gives the fast logits (:data:`IEEE`, :data:`ONEDNN`,
    :data:`AVX512_BF16`, :data:`MODEL_DTYPE`; :func:`gemm_choices` says which this call
    can take); None, the
    fastest of those on this device (:func:`fastest_gemm`). Exact either way.
    """
    validate(inputs)
    rows_default, vocab_chunk = default_chunks(inputs.unembed.device, vocab_chunk)
    row_chunk = row_chunk or rows_default
    if gemm is None:  # times only the GEMMs this call can take
        gemm = fastest_gemm(inputs)
    elif gemm not in gemm_choices(inputs):
        raise ValueError(
            f"gemm={gemm!r} cannot give this call's fast logits; it can take "
            f"{gemm_choices(inputs)} ({MODEL_DTYPE!r}: rank-free bf16/fp16 calls; "
            f"{ONEDNN!r}: a CPU torch with oneDNN; {AVX512_BF16!r}: a bf16 model on a CPU "
            "with AVX-512 BF16)"
        )
    with ieee_fp32_matmul():
        return _run(inputs, row_chunk, vocab_chunk, margin, compile, refine, gemm)


def gemm_choices(inputs: LensInputs) -> list[str]:
    """The GEMMs this call may take: IEEE fp32 through torch's BLAS always, through oneDNN
    on a CPU that has it, VDPBF16PS for a bf16 model on a CPU that has it, one GEMM in the
    model's dtype for rank-free bf16/fp16 calls."""
    choices = [IEEE]
    if onednn_available(inputs.unembed):
        choices.append(ONEDNN)
    if avx512_bf16_available(inputs.unembed):
        choices.append(AVX512_BF16)
    if rank_free_low_precision(inputs):
        choices.append(MODEL_DTYPE)
    return choices


def fastest_gemm(inputs: LensInputs) -> str:
    """The fastest GEMM this call can take on its device.

    A GPU takes the model-dtype GEMM where it can (several times faster there), else IEEE
    fp32. A CPU's ranking depends on its matrix units and its BLAS: with AMX the model-dtype
    GEMM is 7x faster than IEEE fp32; on AMD EPYC (Zen 5, AVX-512 BF16) 5.8x, and oneDNN's
    fp32 GEMM 2.0-2.2x faster than MKL's (bench/README.md); held to AVX-512 BF16 without AMX on
    an Intel CPU, the bf16 GEMM was slower than fp32. So a CPU times each candidate once per
    process, dtype and width (:func:`gemm_seconds`) and takes the fastest.
    """
    choices = gemm_choices(inputs)
    if len(choices) == 1:
        return choices[0]
    if inputs.unembed.device.type != "cpu":
        return MODEL_DTYPE if MODEL_DTYPE in choices else IEEE
    seconds = gemm_seconds(choices, inputs.unembed.dtype, inputs.unembed.shape[1])
    return min(choices, key=seconds.__getitem__)


#: What :func:`gemm_seconds` measured on this machine's CPU, by (GEMM, dtype, width).
_GEMM_SECONDS: dict[tuple[str, torch.dtype, int], float] = {}


def gemm_seconds(gemms: list[str], dtype: torch.dtype, d: int) -> dict[str, float]:
    """Seconds each GEMM's per-chunk code takes for a [512 x 4,096] block, with the copies
    and adds it makes (the fp32 ones copy W and add their K-slices); measured once per
    process, dtype and width. The GEMMs not measured yet run in turn, best of 7 each: timed
    one after the other, a passing load once made oneDNN read as slow as MKL (6.4 against
    6.1 ms, where it is 2x faster). 0.1 to 0.4 s in all on 2 cores. The pass reads half
    the bytes of model-dtype logits, which the timing leaves out."""
    todo = [gemm for gemm in gemms if (gemm, dtype, d) not in _GEMM_SECONDS]
    if todo:
        width = 4096
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(512, d, generator=gen).to(dtype)
        probe = LensInputs(hidden=h, unembed=torch.randn(width, d, generator=gen).to(dtype), k=1)
        scratch = Scratch()
        scratch.keep_packed = True  # as in a call's row chunks: W is packed once a call
        runs = {}
        for gemm in todo:
            if gemm == MODEL_DTYPE:
                runs[gemm] = partial(low_precision_logits, h, 0, width, probe, scratch, False)
            else:
                runs[gemm] = partial(chunk_logits, h.float(), 0, width, probe, scratch, gemm=gemm)
        with ieee_fp32_matmul():
            for gemm, seconds in _best_times(runs).items():
                _GEMM_SECONDS[gemm, dtype, d] = seconds
    return {gemm: _GEMM_SECONDS[gemm, dtype, d] for gemm in gemms}


def _best_times(runs: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Best time of each run, after one warm-up each, the runs taking turns."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def normed_rows(inputs: LensInputs) -> torch.Tensor:
    """Every row as the model's head reads it: cast to the model's dtype, then the final
    norm, once for all rows (a norm with a projection, like OPT's ``project_out``, is a
    GEMM whose last bits depend on the batch; the reference norms all rows at once too)."""
    h = inputs.hidden.to(device=inputs.unembed.device, dtype=inputs.unembed.dtype)
    if inputs.final_norm is not None:
        h = inputs.final_norm(h)
        check_width(h, inputs.unembed)
    h = h.to(inputs.unembed.dtype)
    # Finite hidden states can still overflow the model's dtype (fp16 stops at 65,504) or
    # its norm: every exact value would be NaN, and ranks meaningless.
    check_finite(h, f"cast to {inputs.unembed.dtype} and through the final norm, rows hold")
    return h


def _run(inputs, row_chunk, vocab_chunk, margin, compile, refine, gemm) -> LensResult:
    device = inputs.unembed.device
    dtype = inputs.unembed.dtype
    n, k, v, d = inputs.n_rows, inputs.k, inputs.vocab_size, inputs.unembed.shape[1]
    names = inputs.resolved_segments().names
    normed = normed_rows(inputs)
    # Chunk maxima in id order decide the reach (the same in any order) and the path.
    w_max = [
        unembed_norm_max(inputs.unembed, c0, c1) for c0, c1, _ in vocab_chunks(inputs, vocab_chunk)
    ]
    reach = logit_reach(normed, w_max)
    limit = {torch.float16: 2.0**14, torch.bfloat16: 2.0**120}.get(dtype, 0.0)
    # Beyond the model dtype's range its GEMM could overflow: IEEE fp32 then.
    low = gemm == MODEL_DTYPE and reach < limit
    fp32_gemm = IEEE if gemm == MODEL_DTYPE else gemm  # beyond the reach: IEEE fp32
    factor = fast_gemm_factor(fp32_gemm, d)
    # Low-precision logits have a wider band: more candidates keep rescans rare.
    kk = min(k + (2 * margin if low else margin), v)
    targets = inputs.resolved_targets().to(device).long()
    pool_targets = inputs.resolved_pool_targets().to(device).long()
    n_groups = pool_targets.shape[0]
    groups = (
        inputs.pool_groups.to(device).long()
        if inputs.pool_groups is not None
        else torch.full((n,), -1, dtype=torch.long, device=device)
    )
    chunks = vocab_chunks(inputs, vocab_chunk)
    by_segment = {s: [c for c in chunks if c[2] == s] for s in range(len(names))}
    # Ranks: chunks of similar row norms (narrower bands). Rank-free calls' bands are set
    # by the output rounding, not ||W[j]||, and their GEMM would pay for the gathers.
    columns = ColumnOrder() if low else norm_sorted_columns(inputs)
    if columns.ids is not None:
        w_max = [columns.norm_max(inputs.unembed, c0, c1) for c0, c1, _ in chunks]
    b_max = [columns.bias_max(inputs.bias, c0, c1) for c0, c1, _ in chunks]
    order, spans = row_chunks(groups.cpu(), row_chunk)
    order = order.to(device)
    out = _Outputs(n, k, targets.shape, n_groups, pool_targets.shape, names, device)

    scratch = Scratch()
    for a, b in spans:
        scratch.keep_packed = b < len(order)  # a later row chunk reuses the packed W
        rows = order[a:b]
        h = normed[rows]
        h32 = h.float()
        norms = h.double().norm(dim=1)
        t64 = target_logits(h, targets[rows], inputs)
        scopes = [_row_scope(inputs, h, t64, columns, fp32_gemm)]
        g_ids = None
        if bool((groups[rows] >= 0).any()):
            pooled, g_ids = _pooled_scope(inputs, h, groups[rows], pool_targets, columns, fp32_gemm)
            scopes.append(pooled)
        states = [[_new_state(sc, device) for _ in names] for sc in scopes]
        lse_max = torch.full((len(names), len(rows)), NEG_INF, dtype=torch.float32, device=device)
        lse_sum = torch.zeros((len(names), len(rows)), dtype=torch.float32, device=device)
        for i, (c0, c1, s) in enumerate(chunks):
            if low:
                # With pooled rows too, each row's max |x| is needed before the pass.
                logits, out_max = low_precision_logits(
                    h, c0, c1, inputs, scratch, need_max=len(scopes) > 1
                )
                band = partial(_low_band, norms, w_max[i], d, b_max[i], inputs.softcap, dtype)
                if out_max is not None:
                    band = error_band(norms, w_max[i], d, b_max[i], inputs.softcap, dtype, out_max)
            else:
                logits = chunk_logits(h32, c0, c1, inputs, scratch, columns, fp32_gemm)
                band = error_band(norms, w_max[i], d, b_max[i], inputs.softcap, factor=factor)
            for scope, st in zip(scopes, states, strict=True):
                scope_band = band
                if isinstance(band, torch.Tensor) and not scope.singletons:
                    scope_band = _segment_max(band[scope.first :, None], scope.sizes)[:, 0]
                if not refine:
                    scope_band = torch.zeros(scope.n, dtype=torch.float64, device=device)
                m, se = _update(scope, st[s], logits, scope_band, c0, kk, compile)
                if scope.singletons:
                    _fold_logsumexp(lse_max, lse_sum, s, m, se)
        seg_lse = torch.where(
            torch.isfinite(lse_max), lse_max + torch.log(lse_sum), torch.full_like(lse_max, NEG_INF)
        )
        if low:
            seg_lse = _exact_candidate_terms(scopes[0], states, lse_max, lse_sum, seg_lse)
        out.add_rows(rows, scopes[0], states[0], seg_lse, by_segment, h32, k, kk)
        if g_ids is not None:
            out.add_groups(g_ids, scopes[1], states[1], by_segment, h32, k, kk)
    return out.result(targets, pool_targets)


def logit_reach(normed: torch.Tensor, w_max: list[float]) -> float:
    """The largest |logit| possible, ``max ||h|| * max ||w||`` (every partial sum too).

    Beyond it a fast GEMM could overflow, so the low-precision path is not taken; beyond
    2^120 not even fp32 accumulation holds, and the lens refuses (either engine).
    """
    if not len(normed):
        return 0.0
    reach = float(normed.double().norm(dim=1).max()) * max(w_max, default=0.0)
    if not math.isfinite(reach):  # the rows are finite (normed_rows): W is not
        raise LensRangeError("the unembedding holds NaN or inf: its logits are not defined")
    if reach >= 2.0**120:
        raise LensRangeError(
            f"logits may reach {reach:.3g}, beyond what fp32 accumulation holds exactly "
            "(hidden states or unembedding rows of extreme magnitude)"
        )
    return reach


def _fold_logsumexp(lse_max, lse_sum, s: int, m: torch.Tensor, se: torch.Tensor) -> None:
    """Online log-sum-exp: fold a chunk's (max, sum of exp(x - max)) into segment ``s``."""
    new = torch.maximum(lse_max[s], m)
    safe_new = torch.where(torch.isfinite(new), new, 0)
    # A chunk with no finite logit adds nothing: 0 * exp(0 - new) was NaN once the running
    # max fell below about -88 (exp overflowed).
    added = torch.where(torch.isfinite(m), se * torch.exp(m - safe_new), 0)
    lse_sum[s] = lse_sum[s] * torch.exp(lse_max[s] - safe_new) + added
    lse_max[s] = new


def _exact_candidate_terms(scope, states, lse_max, lse_sum, seg_lse) -> torch.Tensor:
    """Per-segment log-sum-exp with each candidate's rounded term swapped for its exact one.

    The largest terms dominate the sum, so the band then only touches the tail.
    """
    out = seg_lse.clone()
    for s, st in enumerate(states[0]):
        if st.seen == 0 or st.cand_ids.shape[1] == 0:
            continue
        exact = _candidate_exact(scope, st, every=True)
        m = lse_max[s]
        safe = torch.where(torch.isfinite(m), m, 0).double()[:, None]
        approx = torch.exp(st.cand_vals.double() - safe).sum(1)
        exact_terms = torch.exp(exact - safe).sum(1)
        rest = (lse_sum[s].double() - approx).clamp(min=0)
        fixed = safe[:, 0] + torch.log(rest + exact_terms)
        out[s] = torch.where(torch.isfinite(m), fixed.float(), out[s])
    return out


def _low_band(norms, w_max, d, b_max, softcap, dtype, row_max, row_min):
    """The band of rank-free low-precision logits, once the chunk's row max/min are known
    (they bound the GEMM output itself: no bias or soft-cap on this path)."""
    return error_band(norms, w_max, d, b_max, softcap, dtype, torch.maximum(row_max, -row_min))


def best_of_segments(ids: list, vals: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary's exact top-k: the best k of the segments' exact top-k lists."""
    ids, vals = torch.cat(ids, 1), torch.cat(vals, 1)
    best = exact_order(vals, ids)[:, :k]
    return ids.gather(1, best), vals.gather(1, best)


class _Outputs:
    """The result tensors, filled row chunk by row chunk."""

    def __init__(self, n, k, t_shape, n_groups, pt_shape, names, device):
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.long, device=device)
        self.names = names
        self.seg_ids = {name: torch.full((n, k), -1, **i64) for name in names}
        self.seg_lp = {name: torch.full((n, k), NEG_INF, **f32) for name in names}
        self.seg_mass = {name: torch.full((n,), NEG_INF, **f32) for name in names}
        self.seg_ranks = {name: torch.zeros(t_shape, **i64) for name in names}
        self.topk_ids = torch.full((n, k), -1, **i64)
        self.topk_lp = torch.full((n, k), NEG_INF, **f32)
        self.lse = torch.full((n,), NEG_INF, **f32)
        self.target_lp = torch.full(t_shape, float("nan"), **f32)
        self.p_seg_ids = {name: torch.full((n_groups, k), -1, **i64) for name in names}
        self.p_seg_vals = {name: torch.full((n_groups, k), NEG_INF, **f32) for name in names}
        self.p_seg_ranks = {name: torch.zeros(pt_shape, **i64) for name in names}
        self.p_ids = torch.full((n_groups, k), -1, **i64)
        self.p_vals = torch.full((n_groups, k), NEG_INF, **f32)

    def add_rows(self, rows, scope, states, seg_lse, by_segment, h32, k, kk) -> None:
        lse = torch.logsumexp(seg_lse, dim=0)
        self.lse[rows] = lse
        all_ids, all_vals = [], []
        for s, name in enumerate(self.names):
            ids, vals = _segment_topk(scope, states[s], by_segment[s], h32, k, kk)
            self.seg_ids[name][rows] = ids
            self.seg_lp[name][rows] = (vals - lse[:, None].double()).float()
            self.seg_mass[name][rows] = seg_lse[s] - lse
            self.seg_ranks[name][rows] = states[s].counts
            all_ids.append(ids)
            all_vals.append(vals)
        ids, vals = best_of_segments(all_ids, all_vals, k)
        self.topk_ids[rows] = ids
        self.topk_lp[rows] = (vals - lse[:, None].double()).float()
        finite = torch.isfinite(scope.t64)
        self.target_lp[rows] = torch.where(
            finite, scope.t64 - lse[:, None].double(), scope.t64
        ).float()

    def add_groups(self, g_ids, scope, states, by_segment, h32, k, kk) -> None:
        all_ids, all_vals = [], []
        for s, name in enumerate(self.names):
            ids, vals = _segment_topk(scope, states[s], by_segment[s], h32, k, kk)
            self.p_seg_ids[name][g_ids] = ids
            self.p_seg_vals[name][g_ids] = vals.float()
            self.p_seg_ranks[name][g_ids] = states[s].counts
            all_ids.append(ids)
            all_vals.append(vals)
        ids, vals = best_of_segments(all_ids, all_vals, k)
        self.p_ids[g_ids] = ids
        self.p_vals[g_ids] = vals.float()

    def result(self, targets, pool_targets) -> LensResult:
        pad = targets < 0
        self.target_lp[pad] = float("nan")
        ranks = torch.where(pad, -1, sum(self.seg_ranks.values()))
        seg_ranks = {name: torch.where(pad, -1, r) for name, r in self.seg_ranks.items()}
        ppad = pool_targets < 0
        p_ranks = torch.where(ppad, -1, sum(self.p_seg_ranks.values()))
        p_seg_ranks = {name: torch.where(ppad, -1, r) for name, r in self.p_seg_ranks.items()}
        return LensResult(
            topk_ids=self.topk_ids,
            topk_logprobs=self.topk_lp,
            segment_topk_ids=self.seg_ids,
            segment_topk_logprobs=self.seg_lp,
            logsumexp=self.lse,
            segment_logmass=self.seg_mass,
            target_logprobs=self.target_lp,
            target_ranks=ranks,
            target_segment_ranks=seg_ranks,
            pooled_topk_ids=self.p_ids,
            pooled_topk_logits=self.p_vals,
            pooled_segment_topk_ids=self.p_seg_ids,
            pooled_segment_topk_logits=self.p_seg_vals,
            pooled_target_ranks=p_ranks,
            pooled_target_segment_ranks=p_seg_ranks,
        )
