"""IEEE fp32 GEMMs for the length of a lens call, and the user's settings back after it.

The fast logits' error band (docs/lens.md) holds for IEEE fp32 GEMMs: TF32 on CUDA or
oneDNN's bf16 fpmath would round the inputs. torch's switches for that are process-wide,
so this module holds them at ``ieee`` while any lens call runs (calls may overlap in
threads: the first in sets them, the last out restores them) and gives back exactly what
was there: a switch that inherited its backend's setting inherits it again.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

#: (backend, op) switches of torch's per-backend precision API that fp32 GEMMs read.
SWITCHES = (("cuda", "matmul"), ("mkldnn", "matmul"))

_lock = threading.Lock()
_depth = 0
_saved: list | None = None


def _reset_after_fork() -> None:
    """A forked child starts with no call in flight (a thread of the parent's may have
    been inside one, holding the lock)."""
    global _lock, _depth, _saved
    _lock, _depth, _saved = threading.Lock(), 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _per_backend_api() -> bool:
    return hasattr(torch._C, "_get_fp32_precision_getter") and hasattr(
        torch._C, "_set_fp32_precision_setter"
    )


def _hold_ieee() -> list:
    """Set every switch to ``ieee``; return what restores them."""
    if not _per_backend_api():  # an older torch: only the legacy setting exists
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        return [("legacy", previous)]
    get, set_ = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    saved = []
    for backend, op in SWITCHES:
        value = get(backend, op)
        # The getter resolves "none" to the backend's value: a switch that equals it is
        # put back to "none", so that it follows the backend's setting again.
        inherited = value == get(backend, "all")
        saved.append(((backend, op), "none" if inherited else value))
        set_(backend, op, "ieee")
    return saved


def _restore(saved: list) -> None:
    for switch, value in saved:
        if switch == "legacy":
            torch.set_float32_matmul_precision(value)
        else:
            torch._C._set_fp32_precision_setter(*switch, value)


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """fp32 GEMMs in IEEE fp32 (no TF32 on CUDA, no bf16 or TF32 fpmath in oneDNN) while
    any lens call is inside, then the user's settings again.

    Through torch's per-backend switches where it has them: the legacy getter raised for a
    user who had set precision through them (``torch.backends.cuda.matmul.fp32_precision
    = "tf32"``), and each call saving and restoring on its own let the first of two
    overlapping calls put the user's setting back under the second."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _hold_ieee()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                _restore(_saved)
                _saved = None
