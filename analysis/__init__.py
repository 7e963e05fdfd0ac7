"""DuckDB over the slm-lens store: read-only views, the paper's metrics, reports.

The public API the README names: ``open_store(uri)`` (a read-only DuckDB
connection with the contract's views), ``query(con, sql)`` (refuses writes) and
the ``metrics`` module.

They load lazily: the extractor's workers import this package's pyarrow-only
modules (``storage``, ``schema``), and a GPU worker's image need not carry DuckDB.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["metrics", "open_store", "query"]


def __getattr__(name: str) -> Any:
    if name == "metrics":
        return importlib.import_module(".metrics", __name__)
    if name in ("open_store", "query"):
        return getattr(importlib.import_module(".store", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
