"""The fused logit-lens contract: inputs, outputs and named errors.

Pure tensors in, tensors out. Every backend (float64 reference, chunked torch,
Triton) takes a :class:`LensInputs` and returns a :class:`LensResult` with the
same shapes and meanings, so tests can hold them against each other.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

TEXT = "text"
SPEECH = "speech"


class LensError(Exception):
    """Base class of every error the lens engine raises on bad input."""


class LensShapeError(LensError, ValueError):
    """Tensors whose shapes do not fit together."""


class LensKError(LensError, ValueError):
    """A top-k that asks for more entries than the vocabulary has."""


class LensRangeError(LensError, ValueError):
    """Hidden states or unembedding rows so large that fp32 logits could overflow."""


class NonFiniteHiddenError(LensError, ValueError):
    """Hidden states holding NaN or inf: the model diverged or the input is corrupt."""


@dataclass(frozen=True)
class VocabSegments:
    """A partition of the vocabulary into named segments (text, speech, marker, ...).

    Stored as one segment index per token, so any layout can be expressed; the
    engines walk it as runs of equal index, which for real layouts (a text block
    followed by a unit block) are few and long.
    """

    names: tuple[str, ...]
    index: torch.Tensor  # [V] int64, values in [0, len(names))

    def __post_init__(self) -> None:
        if self.index.ndim != 1:
            raise LensShapeError(f"segment index must be 1-D, got shape {tuple(self.index.shape)}")
        if len(set(self.names)) != len(self.names):
            raise LensShapeError(f"segment names must be unique, got {self.names}")
        if self.index.numel() and (
            int(self.index.min()) < 0 or int(self.index.max()) >= len(self.names)
        ):
            raise LensShapeError("segment index values must lie in [0, number of names)")

    @property
    def vocab_size(self) -> int:
        return int(self.index.numel())

    @classmethod
    def single(cls, vocab_size: int, name: str = TEXT) -> VocabSegments:
        """Every token in one segment (a plain text LM)."""
        return cls((name,), torch.zeros(vocab_size, dtype=torch.long))

    @classmethod
    def from_ranges(
        cls,
        vocab_size: int,
        ranges: Mapping[str, Sequence[tuple[int, int]]],
        default: str = TEXT,
    ) -> VocabSegments:
        """Build from half-open id ranges; ids in no range fall into ``default``."""
        names = [default, *[n for n in ranges if n != default]]
        index = torch.zeros(vocab_size, dtype=torch.long)
        for name, spans in ranges.items():
            for start, stop in spans:
                if not 0 <= start <= stop <= vocab_size:
                    raise LensShapeError(
                        f"segment {name!r} range [{start}, {stop}) is outside vocab of {vocab_size}"
                    )
                index[start:stop] = names.index(name)
        return cls(tuple(names), index)

    def position(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def runs(self) -> list[tuple[int, int, int]]:
        """Maximal runs ``(start, stop, segment)`` of equal segment index."""
        idx = self.index
        if idx.numel() == 0:
            return []
        change = torch.nonzero(idx[1:] != idx[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), idx.numel()]
        return [(a, b, int(idx[a])) for a, b in itertools.pairwise(bounds)]


Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LensInputs:
    """Everything one fused-lens call needs.

    Shapes: ``hidden`` [N, d] residual-stream rows (any layer, any position);
    ``unembed`` [V, d]; ``bias`` [V] or None; ``targets`` [N, T] token ids whose
    exact rank and log-prob are wanted (-1 pads); ``pool_groups`` [N] group index
    in [0, G) or -1; ``pool_targets`` [G, Tp] (-1 pads).
    """

    hidden: torch.Tensor
    unembed: torch.Tensor
    k: int
    final_norm: Norm | None = None
    bias: torch.Tensor | None = None
    softcap: float | None = None
    segments: VocabSegments | None = None
    targets: torch.Tensor | None = None
    pool_groups: torch.Tensor | None = None
    pool_targets: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.shape[0])

    @property
    def n_groups(self) -> int:
        if self.pool_targets is not None:
            return int(self.pool_targets.shape[0])
        if self.pool_groups is not None and self.pool_groups.numel():
            return int(self.pool_groups.max()) + 1
        return 0

    def rows(self, keep, *, with_targets: bool = True) -> LensInputs:
        """The same problem on a subset of rows (``keep``: slice or index tensor).

        Pool groups are cut with their rows; ``pool_targets`` stay whole (group ids keep
        their meaning). Without ``with_targets`` the per-row targets are dropped.
        """
        groups = self.pool_groups
        return LensInputs(
            hidden=self.hidden[keep],
            unembed=self.unembed,
            k=self.k,
            final_norm=self.final_norm,
            bias=self.bias,
            softcap=self.softcap,
            segments=self.segments,
            targets=self.targets[keep] if with_targets and self.targets is not None else None,
            pool_groups=None if groups is None else groups[keep],
            pool_targets=self.pool_targets,
        )

    def resolved_segments(self) -> VocabSegments:
        return self.segments or VocabSegments.single(self.vocab_size)

    def resolved_targets(self) -> torch.Tensor:
        if self.targets is None:
            return torch.full((self.n_rows, 0), -1, dtype=torch.long, device=self.hidden.device)
        return self.targets

    def resolved_pool_targets(self) -> torch.Tensor:
        if self.pool_targets is None:
            return torch.full((self.n_groups, 0), -1, dtype=torch.long, device=self.hidden.device)
        return self.pool_targets


@dataclass
class LensResult:
    """Per-row and per-group read-out of the lens.

    Per row (N): ``topk_ids``/``topk_logprobs`` [N, k] over the whole vocabulary,
    sorted best first; ``segment_topk_ids``/``segment_topk_logprobs`` name -> [N, k]
    within each segment (-1 / -inf pad a segment smaller than k);
    ``logsumexp`` [N] of the lens logits; ``segment_logmass`` name -> [N], the log
    of the probability mass on the segment; ``target_logprobs`` [N, T] (NaN on
    pads); ``target_ranks`` [N, T] 0-based count of vocabulary entries whose logit
    is strictly greater (-1 on pads); ``target_segment_ranks`` name -> [N, T], the
    same count restricted to the segment.

    Per pool group (G): ``pooled_topk_ids``/``pooled_topk_logits`` [G, k] of the
    element-wise max over the group's rows of the logits, the same per segment,
    and ``pooled_target_ranks`` [G, Tp] with ``pooled_target_segment_ranks``.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    segment_topk_ids: dict[str, torch.Tensor]
    segment_topk_logprobs: dict[str, torch.Tensor]
    logsumexp: torch.Tensor
    segment_logmass: dict[str, torch.Tensor]
    target_logprobs: torch.Tensor
    target_ranks: torch.Tensor
    target_segment_ranks: dict[str, torch.Tensor]
    pooled_topk_ids: torch.Tensor
    pooled_topk_logits: torch.Tensor
    pooled_segment_topk_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled_segment_topk_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled_target_ranks: torch.Tensor | None = None
    pooled_target_segment_ranks: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> LensResult:
        """A copy with every tensor on ``device`` (results are small: k, T, not V)."""

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: v.to(device) for k, v in value.items()}
            return value

        return LensResult(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})


def validate(inputs: LensInputs) -> None:
    """Raise a named :class:`LensError` for anything the engines cannot honour."""
    h, w = inputs.hidden, inputs.unembed
    if h.ndim != 2:
        raise LensShapeError(f"hidden must be [N, d], got shape {tuple(h.shape)}")
    if w.ndim != 2:
        raise LensShapeError(f"unembed must be [V, d], got shape {tuple(w.shape)}")
    if inputs.final_norm is None:
        check_width(h, w)
    n, v = h.shape[0], w.shape[0]
    if not isinstance(inputs.k, int) or inputs.k < 1:
        raise LensKError(f"k must be a positive integer, got {inputs.k!r}")
    if inputs.k > v:
        raise LensKError(f"k={inputs.k} is larger than the vocabulary ({v} entries)")
    if inputs.bias is not None and tuple(inputs.bias.shape) != (v,):
        raise LensShapeError(f"bias must be [{v}], got {tuple(inputs.bias.shape)}")
    if inputs.bias is not None:
        # -inf masks an entry (it is never ranked above anything); NaN and +inf leave the
        # logits undefined, and the engines returned pads for such rows' top-k.
        bad = torch.nonzero(torch.isnan(inputs.bias) | (inputs.bias == float("inf"))).flatten()
        if bad.numel():
            raise LensRangeError(
                f"the bias holds NaN or +inf at {bad.numel()} entries (first: id {int(bad[0])}); "
                "-inf masks an entry, other values must be finite"
            )
    if inputs.softcap is not None and not 0 < inputs.softcap < float("inf"):
        # inf * tanh(x / inf) is NaN: an infinite cap is no cap, so pass None for that.
        raise LensShapeError(f"softcap must be positive and finite, got {inputs.softcap}")
    if inputs.segments is not None and inputs.segments.vocab_size != v:
        raise LensShapeError(
            f"segments cover {inputs.segments.vocab_size} tokens but the vocabulary has {v}"
        )
    if inputs.targets is not None:
        t = inputs.targets
        if t.ndim != 2 or t.shape[0] != n:
            raise LensShapeError(f"targets must be [{n}, T], got {tuple(t.shape)}")
        _check_ids(t, v, "targets")
    if inputs.pool_groups is not None:
        g = inputs.pool_groups
        if tuple(g.shape) != (n,):
            raise LensShapeError(f"pool_groups must be [{n}], got {tuple(g.shape)}")
        if g.numel() and int(g.min()) < -1:
            raise LensShapeError("pool_groups values must be >= -1")
        if (
            inputs.pool_targets is not None
            and g.numel()
            and int(g.max()) >= len(inputs.pool_targets)
        ):
            raise LensShapeError(
                f"pool_groups names group {int(g.max())} but pool_targets has "
                f"{len(inputs.pool_targets)} rows"
            )
    if inputs.pool_targets is not None:
        if inputs.pool_targets.ndim != 2:
            raise LensShapeError("pool_targets must be [G, Tp]")
        _check_ids(inputs.pool_targets, v, "pool_targets")
    check_finite(h, "hidden states hold")


def check_finite(rows: torch.Tensor, what: str) -> None:
    """:class:`NonFiniteHiddenError` naming how many of ``rows`` hold NaN/inf, and the first."""
    if rows.numel() and not bool(torch.isfinite(rows).all()):
        bad = torch.nonzero(~torch.isfinite(rows).all(dim=1)).flatten()
        raise NonFiniteHiddenError(
            f"{what} NaN/inf in {bad.numel()} of {len(rows)} rows (first: row {int(bad[0])})"
        )


def check_width(normed: torch.Tensor, unembed: torch.Tensor) -> None:
    """The head's input width must match (checked after the norm, which may project)."""
    if normed.shape[-1] != unembed.shape[1]:
        raise LensShapeError(
            f"hidden width {normed.shape[-1]} (after the final norm) does not match "
            f"unembedding width {unembed.shape[1]}"
        )


def _check_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        raise LensShapeError(f"{name} must be integer token ids, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab_size):
        raise LensShapeError(f"{name} holds ids outside [-1, {vocab_size}) (-1 pads)")
