"""DuckDB over the slm-lens store: read-only views, the paper's metrics, reports.

The public API the README names: ``open_store(uri)`` (a read-only DuckDB
connection with the contract's views), ``query(con, sql)`` (refuses writes) and
the ``metrics`` module.
"""

from . import metrics
from .store import open_store, query

__all__ = ["metrics", "open_store", "query"]
