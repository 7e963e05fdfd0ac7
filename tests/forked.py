"""Running a test's work in a child forked from the test process (the C kernels' fork tests)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable


def in_a_forked_child(target: Callable, *args, timeout: float = 120):
    """What ``target(queue, *args)`` put in its queue, run in a forked child; fails if the
    child hangs (killed after ``timeout`` seconds) or exits with an error."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(queue, *args))
    child.start()
    child.join(timeout=timeout)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung (on the parent's thread pool or OpenMP team?)"
    assert child.exitcode == 0, f"the forked child exited with {child.exitcode}"
    return queue.get(timeout=5)
