"""The per-device self-check: an engine is kept only if it reproduces float64 here."""

from __future__ import annotations

import pytest
import torch

from extractor.lens import LensInputs, VocabSegments, fused_logit_lens
from extractor.lens.selfcheck import choose_engine


def _inputs() -> LensInputs:
    gen = torch.Generator().manual_seed(5)
    n, d, v = 40, 32, 500
    return LensInputs(
        hidden=torch.randn(n, d, generator=gen).bfloat16(),
        unembed=torch.randn(v, d, generator=gen).bfloat16(),
        k=5,
        segments=VocabSegments.from_ranges(v, {"speech": [(400, v)]}),
        targets=torch.randint(0, v, (n, 3), generator=gen),
        pool_groups=torch.arange(n) // 4,
        pool_targets=torch.randint(0, v, (n // 4, 2), generator=gen),
    )


def _torch(inputs):
    return fused_logit_lens(**inputs.__dict__, backend="torch")


def test_the_exact_engine_passes_on_this_device():
    check = choose_engine(_inputs(), "torch", {"torch": _torch})
    assert check.passed and check.engine == "torch"
    assert check.telemetry()["self_check"] == "passed"


@pytest.mark.parametrize("fault", ["rank", "topk", "crash"])
def test_a_disagreeing_engine_falls_back_with_a_warning(fault):
    def broken(inputs):
        if fault == "crash":
            raise RuntimeError("no kernel for this device")
        res = _torch(inputs)
        if fault == "rank":
            res.pooled_target_ranks = res.pooled_target_ranks + 1
        else:
            res.topk_ids = res.topk_ids.flip(1)
        return res

    with pytest.warns(UserWarning, match="using the 'torch' engine"):
        check = choose_engine(_inputs(), "triton", {"torch": _torch, "triton": broken})
    assert check.engine == "torch" and check.tried == "triton" and not check.passed
    assert check.telemetry()["self_check"] == "failed"
