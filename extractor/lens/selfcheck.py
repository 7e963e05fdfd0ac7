"""Check a lens engine against the float64 definition on the device that runs it.

An engine is only trusted on a device after it has reproduced the reference on
real rows there: at its first lens call, before any result is stored, an actor runs
its preferred engine on a sample of that call's rows (spread over its layers) and
compares every rank and top-k id for equality, pooled and per segment too (log-sum-exp
within its proven bound). On any mismatch it falls back to the
exact torch engine and says so in the shard telemetry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .contract import LensInputs, LensResult
from .exact import (
    device_kernels,
    kernel_enabled,
    logsumexp_error_bound,
    mma_error_factor,
    rank_free_low_precision,
    set_kernel_enabled,
)
from .reference import reference_lens

#: Rows of the first lens call that the self-check runs (the reference materialises
#: [rows x V]).
SAMPLE_ROWS = 48
#: Runs of consecutive rows they come in, spread evenly over the call: a worker's call
#: stacks its rows layer by layer, and its first 48 rows were all layer 0's (a review).
SAMPLE_RUNS = 4
Engine = Callable[[LensInputs], LensResult]


@dataclass(frozen=True)
class SelfCheck:
    """What the check found: the engine kept, and how its candidate fared."""

    engine: str
    tried: str
    passed: bool
    worst_lse_error: float
    detail: str

    def telemetry(self) -> dict:
        return {
            "engine": self.engine,
            "self_check": "passed" if self.passed else "failed",
            "self_check_engine": self.tried,
            "self_check_worst_lse_error": self.worst_lse_error,
            "self_check_detail": self.detail,
        }


def sample(inputs: LensInputs, rows: int = SAMPLE_ROWS, runs: int = SAMPLE_RUNS) -> LensInputs:
    """At most ``rows`` rows of a lens problem, in ``runs`` runs of consecutive rows spread
    evenly over it (its first and last rows among them: a worker's first and last layers),
    with only the pool groups they touch.

    The groups are renumbered ``0..G'-1`` in order and their targets cut with them: the
    reference materialises [groups x V], and a batch's other groups (1,271 in a demo
    shard, against a handful in the sample) made the check cost more than the shard. A
    group a run cuts is pooled over the rows sampled, by the engine and the reference
    alike.
    """
    n = inputs.n_rows
    if n <= rows:
        keep = slice(0, n)
    else:
        runs = max(1, min(runs, rows))
        length = rows // runs
        starts = torch.arange(runs) * (n - length) // max(runs - 1, 1)  # exact integers
        keep = (starts[:, None] + torch.arange(length)).flatten().unique()
    cut = inputs.rows(keep)
    groups = cut.pool_groups
    if groups is None:
        return cut
    present = groups[groups >= 0].unique()  # sorted, so group order is kept
    renumber = torch.full((max(inputs.n_groups, 1),), -1, dtype=groups.dtype, device=groups.device)
    renumber[present] = torch.arange(len(present), dtype=groups.dtype, device=groups.device)
    kept = torch.where(groups >= 0, renumber[groups.clamp(min=0)], groups)
    targets = None if cut.pool_targets is None else cut.pool_targets[present]
    return replace(cut, pool_groups=kept, pool_targets=targets)


def with_close_targets(probe: LensInputs) -> LensInputs:
    """The probe with one more target a row: the lower of the two entries whose fp32 logits
    are closest without being equal. The other is then inside its band and above it, so a
    kernel that lost or misplaced in-band entries changes a rank (a sample's own targets,
    near the top in late layers, can leave every band empty; found by a review)."""
    if probe.n_rows == 0 or probe.vocab_size < 2:
        return probe
    from .chunked import normed_rows  # the engine's module imports this one

    with torch.no_grad():
        h = normed_rows(probe).float()
        values, ids = (h @ probe.unembed.to(h.device).float().T).sort(dim=1)
    gaps = values[:, 1:] - values[:, :-1]
    gaps = torch.where(gaps > 0, gaps, torch.inf)  # ties and -inf pairs say nothing
    lower = ids.gather(1, gaps.argmin(dim=1, keepdim=True))
    old = probe.resolved_targets().to(lower.device).long()
    return replace(probe, targets=torch.cat([old, lower], 1).to(probe.hidden.device))


def lse_bound(engine: str, inputs: LensInputs) -> float:
    """The largest log-sum-exp error ``engine`` may honestly make on ``inputs``: the Triton
    kernel's band is its matrix unit's (:func:`~.exact.mma_error_factor`), its sums span
    the whole vocabulary."""
    if engine == "triton":
        factor = mma_error_factor(inputs.unembed.shape[1])
        return logsumexp_error_bound(inputs, inputs.vocab_size, factor)
    return logsumexp_error_bound(inputs)


def compare(
    inputs: LensInputs,
    got: LensResult,
    bound: float | None = None,
    ref: LensResult | None = None,
) -> tuple[bool, float, str]:
    """(agrees, worst log-sum-exp error, first disagreement) against :func:`reference_lens`
    (``ref``, when already computed); ``bound``: the log-sum-exp error allowed (default: the
    torch engine's)."""
    ref = reference_lens(inputs) if ref is None else ref
    got = got.to("cpu")
    exact_fields = [
        ("target_ranks", got.target_ranks, ref.target_ranks),
        ("topk_ids", got.topk_ids, ref.topk_ids),
        *[
            (f"{name} ranks", got.target_segment_ranks[name], ref.target_segment_ranks[name])
            for name in ref.target_segment_ranks
        ],
        *[
            (f"{name} topk_ids", got.segment_topk_ids[name], ref.segment_topk_ids[name])
            for name in ref.segment_topk_ids
        ],
    ]
    if inputs.pool_groups is not None and ref.pooled_topk_ids.shape[0]:
        groups = inputs.pool_groups.cpu()
        present = torch.zeros(ref.pooled_topk_ids.shape[0], dtype=torch.bool)
        present[groups[groups >= 0].unique()] = True
        exact_fields += [
            ("pooled ranks", got.pooled_target_ranks[present], ref.pooled_target_ranks[present]),
            ("pooled topk_ids", got.pooled_topk_ids[present], ref.pooled_topk_ids[present]),
            *[
                (f"pooled {name} ranks", got.pooled_target_segment_ranks[name][present], r[present])
                for name, r in ref.pooled_target_segment_ranks.items()
            ],
            *[
                (f"pooled {name} topk_ids", got.pooled_segment_topk_ids[name][present], i[present])
                for name, i in ref.pooled_segment_topk_ids.items()
            ],
        ]
    worst = float((got.logsumexp.double() - ref.logsumexp).abs().max()) if inputs.n_rows else 0.0
    for name, have, want in exact_fields:
        bad = have != want
        if bool(bad.any()):
            return False, worst, f"{name}: {int(bad.sum())} of {bad.numel()} differ"
    bound = logsumexp_error_bound(inputs) if bound is None else bound
    if not worst <= bound:
        return False, worst, f"logsumexp off by {worst:.3g} (bound {bound:.3g})"
    return True, worst, "ranks and top-k ids equal the float64 reference"


def choose_engine(
    inputs: LensInputs, preferred: str, engines: dict[str, Engine], fallback: str = "torch"
) -> SelfCheck:
    """Run ``preferred`` on a sample of ``inputs``; keep it if it agrees, else ``fallback``.

    The fallback is checked too, on the same sample, and a disagreement warns. It trusts
    kernels beyond torch's IEEE ops (:func:`~.exact.device_kernels`: its exact values from
    the C loop on a CPU or a Triton kernel on CUDA; on a CPU, oneDNN's fp32 GEMM, the
    AVX-512 BF16 GEMM and the C pass): if it returned numbers that disagree,
    :func:`_turn_off_culprits` finds which to turn off. The result says what was kept.
    """
    probe = with_close_targets(sample(inputs))
    ref = reference_lens(probe)
    probes = [(probe, ref, "")]
    rank_free = replace(probe, targets=None, pool_groups=None, pool_targets=None)
    if rank_free_low_precision(rank_free):
        # In a bf16 or fp16 model a call that asks no ranks takes another path (the GEMM
        # in the model's dtype, the pass over its logits): checked too, on the same rows.
        probes.append((rank_free, _without_targets(ref), " (a call without targets)"))

    def check(name: str) -> tuple[bool, float, str, bool]:
        """(agrees, worst lse error, detail, whether the engine returned numbers)."""
        worst, detail = 0.0, ""
        for inputs_, ref_, call in probes:
            try:
                got = engines[name](inputs_)
            except Exception as exc:  # an engine that cannot even run here is a failed check
                return False, float("nan"), f"{type(exc).__name__}: {exc}{call}", False
            try:
                ok, error, detail = compare(inputs_, got, lse_bound(name, inputs_), ref_)
            except (KeyError, IndexError, RuntimeError, TypeError) as exc:
                # A result missing a field or shaped otherwise: a failed check, not a crash.
                return False, float("nan"), f"malformed result: {exc!r}{call}", True
            worst = max(worst, error)
            if not ok:
                return False, worst, detail + call, True
        return True, worst, detail, True

    ok, worst, detail, ran = check(preferred)
    if ok:
        return SelfCheck(preferred, preferred, ok, worst, detail)
    if preferred != fallback:
        warnings.warn(
            f"lens engine {preferred!r} disagrees with the float64 reference on this device "
            f"({detail}); using the {fallback!r} engine",
            stacklevel=2,
        )
        fallback_ok, _, fallback_detail, ran = check(fallback)
    else:
        fallback_ok, fallback_detail = ok, detail
    if fallback_ok:
        return SelfCheck(fallback, preferred, False, worst, detail)
    note = f"{fallback}: {fallback_detail}"
    kernels = [k for k in device_kernels(probe.unembed.device) if kernel_enabled(k)]
    if ran and kernels:
        off, plain = _turn_off_culprits(kernels, lambda: check(fallback)[:3])
        if off:
            names = " and the ".join(off)
            note = f"{fallback} with the {names}: {fallback_detail}; kernel off, torch's ops agree"
        else:
            note += f" (on torch's ops too: {plain})"
    warnings.warn(
        f"lens engine {fallback!r} disagrees with the float64 reference on this device: {note}",
        stacklevel=2,
    )
    detail = note if preferred == fallback else f"{detail}; {note}"
    return SelfCheck(fallback, preferred, False, worst, detail)


def _without_targets(ref: LensResult) -> LensResult:
    """The reference of the same rows asked no ranks: its top-k and log-sum-exp do not
    depend on the targets (one float64 pass serves both probes)."""
    return replace(
        ref,
        target_logprobs=ref.target_logprobs[:, :0],
        target_ranks=ref.target_ranks[:, :0],
        target_segment_ranks={name: r[:, :0] for name, r in ref.target_segment_ranks.items()},
    )


def _set_all(kernels: list[str], enabled: bool) -> None:
    for kernel in kernels:
        set_kernel_enabled(kernel, enabled)


def _turn_off_culprits(
    kernels: list[str], check: Callable[[], tuple[bool, float, str]]
) -> tuple[list[str], str]:
    """Which of the enabled ``kernels`` to keep off, and ``check``'s detail on torch's ops.

    All are turned off and the engine checked on torch's ops, which the reference shares.
    If it disagrees there too, the kernels were not the cause: all go back on (``[]``).
    Otherwise they are put back one at a time, each kept on only if the engine still
    agrees; if none is caught that way but the kernels still disagree together (or the
    disagreement does not recur), all stay off.
    """
    _set_all(kernels, False)
    plain_ok, _, plain = check()
    if not plain_ok:
        _set_all(kernels, True)
        return [], plain
    off = []
    for kernel in kernels:
        set_kernel_enabled(kernel, True)
        if not check()[0]:
            set_kernel_enabled(kernel, False)
            off.append(kernel)
    if not off or not check()[0]:
        _set_all(kernels, False)
        off = list(kernels)
    return off, plain
