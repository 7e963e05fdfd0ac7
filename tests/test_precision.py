"""The lens holds torch's fp32 precision switches at IEEE for its calls, and gives them back."""

from __future__ import annotations

import threading

import pytest
import torch

from extractor.lens import precision
from extractor.lens.precision import ieee_fp32_matmul

get = getattr(torch._C, "_get_fp32_precision_getter", None)
set_ = getattr(torch._C, "_set_fp32_precision_setter", None)
pytestmark = pytest.mark.skipif(get is None, reason="this torch has no per-backend switches")
LEVELS = [("generic", "all"), ("mkldnn", "all"), ("cuda", "matmul"), ("mkldnn", "matmul")]


@pytest.fixture(autouse=True)
def defaults():
    """Every switch back to torch's default ("none": inherit) around each test."""
    for level in reversed(LEVELS):
        set_(*level, "none")
    yield
    for level in reversed(LEVELS):
        set_(*level, "none")


def switches() -> tuple[str, str]:
    return get("cuda", "matmul"), get("mkldnn", "matmul")


def test_overlapping_calls_keep_ieee_until_the_last_one_leaves():
    """Each call saving and restoring on its own let the first of two overlapping calls put
    the user's bf16 back under the second, and left ``ieee`` behind (found by a review)."""
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    a_in, a_out, b_in, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def call_a():
        with ieee_fp32_matmul():
            a_in.set()
            b_in.wait()
        a_out.set()

    def call_b():
        a_in.wait()
        with ieee_fp32_matmul():
            b_in.set()
            a_out.wait()
            seen["b after a left"] = switches()
        b_done.set()

    threads = [threading.Thread(target=call_a), threading.Thread(target=call_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen["b after a left"] == ("ieee", "ieee")
    assert switches() == ("tf32", "bf16")


def test_a_switch_that_inherited_its_backends_setting_inherits_it_again():
    """The getter resolves "none"; restoring the resolved value pinned it, and the
    backend-level setting no longer reached matmul (found by a review)."""
    torch.backends.mkldnn.fp32_precision = "bf16"
    assert get("mkldnn", "matmul") == "bf16"
    with ieee_fp32_matmul():
        assert switches() == ("ieee", "ieee")
    torch.backends.mkldnn.fp32_precision = "ieee"
    assert get("mkldnn", "matmul") == "ieee", "matmul no longer follows its backend"


def test_users_of_the_legacy_api_keep_it():
    torch.set_float32_matmul_precision("medium")
    with ieee_fp32_matmul():
        torch.get_float32_matmul_precision()  # must not raise: "mixed APIs"
    assert torch.get_float32_matmul_precision() == "medium"


def test_an_exception_inside_still_restores():
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    with pytest.raises(RuntimeError), ieee_fp32_matmul():
        raise RuntimeError("inside a lens call")
    assert get("mkldnn", "matmul") == "bf16"
    assert precision._depth == 0
